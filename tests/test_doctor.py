"""``fastface doctor`` as a user runs it: a real subprocess, with real files laid where it looks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_faces_onnx_packs import _fake_hub_cache, _touch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _doctor(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "1"}
    for key in ("FASTFACE_FACE_MODELS", "FASTFACE_FACE_HUB_REPO"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "fastface.cli", "doctor", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory) -> Path:
    """A home with InsightFace's buffalo_l and a hub cache holding the FaceID adapter checkpoint."""
    root = tmp_path_factory.mktemp("doctor")
    pack = root / "home/.insightface/models/buffalo_l"
    _touch(pack / "det_10g.onnx")
    _touch(pack / "w600k_r50.onnx")
    _fake_hub_cache(root / "hub", "h94/IP-Adapter-FaceID", {"ip-adapter-faceid_sdxl.bin": b"checkpoint"})
    return root


def test_doctor_json_reports_what_is_here(laid_out):
    ort = pytest.importorskip("onnxruntime")
    proc = _doctor(laid_out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {"python", "torch", "onnxruntime", "face_backends", "generation_models", "missing"} <= set(report)
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["onnxruntime"]["providers"] == ort.get_available_providers()
    assert report["onnxruntime"]["version"] == ort.__version__
    faces = report["face_backends"]
    assert faces["buffalo_l"]["status"] == "ready"
    assert faces["buffalo_l"]["files"]["det_10g.onnx"] == str(laid_out / "home/.insightface/models/buffalo_l/det_10g.onnx")
    assert faces["antelopev2"]["status"] == "missing"
    # The installed face-recognition-models has the recogniser and the 68-point model: the default
    # dlib backend works, whatever optional files (CNN detector, 5-point model) the release lacks.
    assert faces["dlib"]["status"] == "ready"
    assert not any(line.startswith("face backend dlib") for line in report["missing"])
    assert "glintr100.onnx" in faces["antelopev2"]["how"] and "antelopev2" in faces["antelopev2"]["how"]
    gen = report["generation_models"]
    assert gen["hf_cache"] == str(laid_out / "hub")
    assert gen["adapters"]["faceid"]["status"] == "present"
    assert gen["adapters"]["faceid-plusv2"]["status"] == "missing"  # no CLIP encoder, other checkpoint
    assert "tiny" not in gen["backbones"]
    assert gen["backbones"]["hyper-4"]["status"] == "missing"
    assert any(line.startswith("adapter faceid-plusv2:") for line in report["missing"])
    # Every missing piece names the one `fastface download` command the generation errors name too.
    assert gen["backbones"]["hyper-4"]["how"] == "fastface download hyper-4"
    assert gen["adapters"]["faceid-plusv2"]["how"] == "fastface download faceid-plusv2"
    assert "fastface download --face-pack antelopev2" in faces["antelopev2"]["how"]
    # Scoring models, VAE options and the tiny models are covered as well.
    assert set(gen["scoring"]) == {"CLIP (text alignment, aesthetic features)", "LAION aesthetic head", "ImageReward"}
    assert all(entry["how"] == "fastface download --eval" for entry in gen["scoring"].values())
    assert gen["vaes"]["fp16-fix"]["how"] == "fastface download --vae fp16-fix" and "tiny" in gen["vaes"]
    assert report["tiny_models"]["status"] in ("ready", "missing") and "tiny-sdxl" in report["tiny_models"]["location"]
    assert report["default_combination"] == "fastface download hyper-4 faceid --face-pack buffalo_l"
    assert not any(line.startswith("adapter faceid:") for line in report["missing"])
    torch = pytest.importorskip("torch")
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda"] == torch.cuda.is_available()


def test_doctor_table(laid_out):
    proc = _doctor(laid_out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("face: buffalo_l") and "ready" in line for line in lines)
    assert any(line.startswith("adapter: faceid ") and "present" in line for line in lines)
    assert "missing:" in lines
