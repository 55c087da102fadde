"""Face analysis installs everywhere: cheap imports, and no compiler needed for the [faces] extra."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("onnxruntime", "dlib", "cv2")

_IMPORT_PROBE = """
import json, sys
import fastface, fastface.faces
before = {m: m in sys.modules for m in %(heavy)r}
from fastface.faces import get_backend
get_backend("dlib")
after = {m: m in sys.modules for m in %(heavy)r}
print(json.dumps({"before": before, "after": after}))
"""


def test_importing_fastface_and_faces_loads_no_backend():
    code = _IMPORT_PROBE % {"heavy": HEAVY}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(state["before"].values()), f"imported too early: {state['before']}"
    # the probe can see an import happen: building the dlib backend does load dlib
    assert state["after"]["dlib"] is True
    assert state["after"]["onnxruntime"] is False


_UNREACHABLE = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|Network is unreachable|"
    r"Could not fetch URL|No route to host|Connection refused|ProxyError|timed out", re.IGNORECASE)
_NO_WHEEL = re.compile(r"Could not find a version that satisfies the requirement ([^\s;]+)")


def test_default_faces_and_pulid_extras_resolve_to_wheels_only(tmp_path):
    """``pip install ".[faces,pulid]"`` from the registries needs no compiler: every dependency is a wheel."""
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
        "--disable-pip-version-check", "--report", str(report),
        "-c", str(REPO_ROOT / "constraints.txt"), f"{REPO_ROOT}[faces,pulid]",
    ]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and _UNREACHABLE.search(output) and not _NO_WHEEL.search(output):
        pytest.skip(f"package registry unreachable: {_UNREACHABLE.search(output).group(0)}")
    if proc.returncode != 0:
        missing = _NO_WHEEL.findall(output)
        detail = f"no wheel for {', '.join(missing)} (it would be built from source)" if missing else output[-2000:]
        pytest.fail(f"the [faces,pulid] install does not resolve to wheels only: {detail}")
    items = json.loads(report.read_text())["install"]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in items}
    assert {"onnxruntime", "dlib-bin", "numpy", "pillow"} <= names
    not_wheels = [
        item["metadata"]["name"] for item in items
        if not item["download_info"]["url"].endswith(".whl")
        and not item["download_info"]["url"].startswith(REPO_ROOT.as_uri())  # the project itself
    ]
    assert not not_wheels, f"resolved to source distributions: {not_wheels}"
    assert "insightface" not in names
    # PuLID's research stack stays out of [pulid]
    assert not names & {"torchvision", "timm", "basicsr", "facexlib", "einops", "torchsde"}, names


# Imported by PuLID's own code; none of them may be imported here (torchvision cannot even load
# beside our torch).
PULID_FORBIDDEN = ("torchvision", "timm", "basicsr", "facexlib", "insightface", "einops", "xformers", "apex")

_PULID_PROBE = """
import json, sys
blocked = %(blocked)r
import numpy as np, torch
import fastface
from fastface.faces.types import Identity
from fastface.models.pulid_face import FFHQ_TEMPLATE_512
from fastface.pipeline import FastFacePipeline
portrait = sys.argv[1]
shapes = []
for adapter in ("pulid",):  # v1.1's IDFormer lives in the same modules
    pipe = FastFacePipeline.from_pretrained("tiny", adapter, device="cpu", dtype=torch.float32)
    unit = np.ones(128, np.float32) / np.sqrt(128)
    face = Identity(embedding=unit, embeddings=unit[None], sources=[portrait],
                    keypoints=[(FFHQ_TEMPLATE_512 * 0.5 + 20).astype(np.float32)])
    cond = pipe.encode_identity(face)
    result = pipe("a portrait", cond, steps=1, output_type="latent", progress=False)
    shapes.append([list(cond.cond.shape), bool(torch.isfinite(result.latents).all())])
print(json.dumps({"shapes": shapes, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in blocked),
                  "cv2": "cv2" in sys.modules}))
"""


def test_pulid_needs_none_of_pulids_research_stack(tiny_dir):
    """PuLID end to end (EVA-CLIP, face parsing, encoders, the adapter, a generation) on the tiny models."""
    code = _PULID_PROBE % {"blocked": PULID_FORBIDDEN}
    portrait = REPO_ROOT / "src" / "fastface" / "data" / "portrait.jpg"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTFACE_CACHE": str(tiny_dir.parent), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(portrait)], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["shapes"] == [[[1, 10, 64], True]]
    assert state["loaded"] == []
    assert state["cv2"] is True  # the probe sees imports happen: the alignment did load OpenCV
