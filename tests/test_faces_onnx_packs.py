"""Where ONNX face model packs are found, what happens when they are not, and checksum checks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from fastface.errors import ConfigError, MissingWeightsError
from fastface.faces import model_packs
from fastface.faces.model_packs import ModelFile, get_pack, resolve_pack, split_hub_repo, verify_download


@pytest.fixture()
def clean_home(tmp_path, monkeypatch) -> Path:
    """No ~/.insightface, no $FASTFACE_FACE_MODELS, no hub override: only what a test puts there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(model_packs.ENV_MODEL_DIR, raising=False)
    monkeypatch.delenv(model_packs.ENV_HUB_REPO, raising=False)
    return home


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_pack_registry_facts():
    buffalo = get_pack("arcface")
    assert buffalo.name == "buffalo_l"
    assert [f.filename for f in buffalo.files] == ["det_10g.onnx", "w600k_r50.onnx"]
    assert [f.filename for f in get_pack("antelopev2").files] == ["scrfd_10g_bnkps.onnx", "glintr100.onnx"]
    aura = get_pack("auraface")
    assert aura.licence.startswith("Apache-2.0") and "non-commercial" in get_pack("antelopev2").licence
    # AuraFace's recogniser has antelopev2's file name but other weights: the digests must differ
    assert aura.recognizer.filename == get_pack("antelopev2").recognizer.filename
    assert aura.recognizer.sha256 != get_pack("antelopev2").recognizer.sha256
    for pack in model_packs.PACKS.values():
        for spec in pack.files:
            assert spec.size and len(spec.sha256) == 64
    with pytest.raises(ConfigError, match="unknown face model pack 'buffalo_s'"):
        get_pack("buffalo_s")


def test_hub_repo_parsing():
    pack = get_pack("buffalo_l")
    assert split_hub_repo(pack.hub_repo, pack) == ("public-data/insightface", "models/buffalo_l")
    assert split_hub_repo("me/faces/{pack}", pack) == ("me/faces", "buffalo_l")
    assert split_hub_repo("fal/AuraFace-v1", pack) == ("fal/AuraFace-v1", None)
    with pytest.raises(ConfigError, match="owner/name"):
        split_hub_repo("nonsense", pack)


def test_missing_pack_offline_names_files_and_directory(clean_home, tmp_path):
    target = tmp_path / "my_models"
    with pytest.raises(MissingWeightsError) as info:
        resolve_pack("antelopev2", model_dir=target)
    msg = str(info.value)
    assert "scrfd_10g_bnkps.onnx" in msg and "glintr100.onnx" in msg
    assert f"into {target}" in msg and "\n" not in msg
    assert "offline" in msg
    # without model_dir the advice is InsightFace's directory, and only the missing file is named
    _touch(clean_home / ".insightface/models/antelopev2/scrfd_10g_bnkps.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MissingWeightsError) as info:
            resolve_pack("antelopev2")
    msg = str(info.value)
    assert "missing glintr100.onnx" in msg and "scrfd_10g_bnkps.onnx" not in msg
    assert str(clean_home / ".insightface/models/antelopev2") in msg


def test_resolution_order_and_layouts(clean_home, tmp_path, monkeypatch):
    pack = get_pack("buffalo_l")
    insight = _touch(clean_home / ".insightface/models/buffalo_l/det_10g.onnx")
    _touch(clean_home / ".insightface/models/buffalo_l/w600k_r50.onnx")
    with pytest.warns(UserWarning, match="not the 16923827 of the published buffalo_l det_10g.onnx"):
        assert resolve_pack(pack).detector == insight
    env_root = tmp_path / "env"
    env_file = _touch(env_root / "buffalo_l/det_10g.onnx")  # <root>/<pack>/ layout
    monkeypatch.setenv(model_packs.ENV_MODEL_DIR, str(env_root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = resolve_pack(pack)
        assert got.detector == env_file and got.recognizer.parent == insight.parent
        explicit = _touch(tmp_path / "explicit/buffalo_l/buffalo_l/det_10g.onnx")  # zip-in-zip layout
        assert resolve_pack(pack, model_dir=tmp_path / "explicit").detector == explicit


def test_verify_download_accepts_good_and_removes_bad(tmp_path):
    data = b"weights" * 100
    good = ModelFile("m.onnx", len(data), hashlib.sha256(data).hexdigest())
    path = _touch(tmp_path / "m.onnx", data)
    verify_download(path, good, "owner/repo")
    assert path.exists()
    verify_download(path, ModelFile("m.onnx", len(data), None), "owner/repo")  # size only
    bad = ModelFile("m.onnx", len(data), "0" * 64)
    with pytest.raises(MissingWeightsError, match="corrupted.*SHA-256.*removed"):
        verify_download(path, bad, "owner/repo")
    assert not path.exists()
    short = _touch(tmp_path / "s.onnx", data[:10])
    with pytest.raises(MissingWeightsError, match="has 10 bytes, expected 700"):
        verify_download(short, good, "owner/repo")
    assert not short.exists()


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> dict[str, Path]:
    """A Hugging Face cache laid out as huggingface_hub writes it (refs/main -> snapshot -> blob links)."""
    commit = "0" * 40
    root = cache / ("models--" + repo.replace("/", "--"))
    _touch(root / "refs/main", commit.encode())
    out = {}
    for name, data in files.items():
        blob = _touch(root / "blobs" / hashlib.sha256(data).hexdigest(), data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        out[name] = blob
    return out


def test_corrupted_download_is_an_error_and_removed(tmp_path):
    """Through the real hub path: offline, the hub cache holds a damaged det_10g.onnx."""
    cache = tmp_path / "hub"
    blobs = _fake_hub_cache(cache, "someone/faces", {"buffalo_l/det_10g.onnx": b"truncated download",
                                                      "buffalo_l/w600k_r50.onnx": b"also wrong"})
    code = textwrap.dedent("""
        import json, sys
        from fastface.faces.model_packs import resolve_pack
        from fastface.errors import MissingWeightsError
        try:
            resolve_pack("buffalo_l", model_dir=sys.argv[1], hub_repo="someone/faces/{pack}")
        except MissingWeightsError as exc:
            print(json.dumps({"error": str(exc)}))
    """)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HOME": str(home)}
    env.pop(model_packs.ENV_MODEL_DIR, None)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nothing")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert "det_10g.onnx downloaded from 'someone/faces/{pack}' is corrupted" in error
    assert "has 18 bytes, expected 16923827" in error
    assert not blobs["buffalo_l/det_10g.onnx"].exists()
    assert not (cache / "models--someone--faces/snapshots" / ("0" * 40) / "buffalo_l/det_10g.onnx").is_symlink()
