"""Unreachable hub and ``fastface download``: real subprocesses, a hub endpoint on a closed loopback
port (``HF_ENDPOINT=http://127.0.0.1:9``, nothing leaves the machine), no ``HF_HUB_OFFLINE``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from fastface.downloads import Combination, required_files
from test_faces_onnx_packs import _fake_hub_cache

CLOSED_PORT = "http://127.0.0.1:9"  # discard port, nothing listens: connections are refused at once


def _cli(tmp_path: Path, *args: str, offline: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "HF_ENDPOINT": CLOSED_PORT, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env.pop("FASTFACE_FACE_MODELS", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fastface.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_generate_with_unreachable_hub_fails_at_once_naming_one_command(tmp_path):
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "me.png")
    proc, seconds = _cli(tmp_path, "generate", "--face", "me.png", "--prompt", "a person", "--backbone", "hyper-4",
                         "--out", "out")
    line = _one_error_line(proc)
    # A regression guard only (the real figure is in the report): retries would take ~20 s per file.
    assert seconds < 10, seconds
    assert "fastface download hyper-4 faceid --face-pack buffalo_l" in line and "HF_HUB_OFFLINE=1" in line
    assert "127.0.0.1:9 cannot be reached" in line and not (tmp_path / "out").exists()


def test_library_lookup_with_unreachable_hub_fails_fast(tmp_path):
    code = ("from fastface.hub import resolve_file\n"
            "resolve_file('h94/IP-Adapter-FaceID', 'ip-adapter-faceid_sdxl.bin', what='faceid adapter')\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "HF_ENDPOINT": CLOSED_PORT}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 10
    assert "MissingWeightsError: faceid adapter: 'ip-adapter-faceid_sdxl.bin' from 'h94/IP-Adapter-FaceID' is not " \
           "in the local cache and the hub http://127.0.0.1:9 cannot be reached" in proc.stderr
    assert "Retrying" not in proc.stderr and proc.stderr.count("\n") < 40


def test_dry_run_lists_exactly_one_precision(tmp_path):
    proc, _ = _cli(tmp_path, "download", "hyper-4", "faceid", "--face-pack", "buffalo_l", "--eval", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("to fetch")]
    assert "ByteDance/Hyper-SD/Hyper-SDXL-4steps-lora.safetensors" in listed
    assert "stabilityai/stable-diffusion-xl-base-1.0/unet/diffusion_pytorch_model.fp16.safetensors" in listed
    assert "public-data/insightface/models/buffalo_l/w600k_r50.onnx" in listed
    assert "openai/clip-vit-large-patch14/model.safetensors" in listed
    base = [name for name in listed if name.startswith("stabilityai/")]
    # One precision of four models and their configs, never the repository's other copies.
    assert sum(name.endswith("safetensors") for name in base) == 4 and all("fp16" in n for n in base if "safetensors" in n)
    assert not any(name.endswith((".bin", ".onnx", ".ckpt")) for name in base)
    assert "(174.4 MB; face model pack buffalo_l)" in proc.stdout
    assert proc.stdout.strip().endswith(f"{len(listed)} of {len(listed)} file(s) to fetch, at least 191.3 MB")
    fp32 = [f.filename for f in required_files(Combination("sdxl", None, precision="fp32"))]
    assert "unet/diffusion_pytorch_model.safetensors" in fp32 and not any("fp16" in f for f in fp32)


def test_download_offline_is_one_line_and_a_complete_cache_needs_nothing(tmp_path):
    proc, seconds = _cli(tmp_path, "download", "lcm", "faceid")
    line = _one_error_line(proc)
    assert seconds < 10 and "cannot fetch 20 file(s)" in line and "HF_HUB_OFFLINE=1" in line
    # Lay every file of the combination into the cache: the command then fetches nothing, offline.
    wanted = required_files(Combination("lcm", "faceid"))
    for repo in {item.repo for item in wanted}:
        _fake_hub_cache(tmp_path / "hf" / "hub", repo, {item.filename: item.filename.encode()
                                                        for item in wanted if item.repo == repo})
    proc, _ = _cli(tmp_path, "download", "lcm", "faceid", offline=True)
    assert proc.returncode == 0, proc.stderr
    assert "0 of 20 file(s) to fetch" in proc.stdout and "to fetch " not in proc.stdout.replace("file(s) to fetch", "")


@pytest.mark.parametrize(("args", "message"), [
    (("download", "hyper-4", "lcm"), "give one backbone per command, got a second one: 'lcm'"),
    (("download", "bogus"), "'bogus' is neither a backbone"),
    (("download",), "nothing to download"),
])
def test_download_refuses_bad_names(tmp_path, args, message):
    proc, _ = _cli(tmp_path, *args, offline=True)
    assert message in _one_error_line(proc)


def test_missing_pieces_of_one_combination_are_listed_together():
    combo = Combination("lightning-4", "faceid-plusv2", face_packs=("antelopev2",))
    roles = {item.role for item in required_files(combo)}
    assert roles == {"lightning-4 base model", "lightning-4 distilled UNet", "faceid-plusv2 adapter",
                     "faceid-plusv2 image encoder", "face model pack antelopev2"}
    assert combo.command() == "fastface download lightning-4 faceid-plusv2 --face-pack antelopev2"
    # A sampler over your own merged checkpoint needs no distillation weights, only the tokenizers.
    own = Combination("hyper-4", None, sampler="lightning-4", base_model="merge.safetensors")
    assert {item.role for item in required_files(own)} == {"tokenizers for a single-file base model"}
    assert own.command() == "fastface download --base-model merge.safetensors"
    assert required_files(Combination("tiny", "faceid")) == []  # the tiny models ship with FastFace


def test_a_silent_endpoint_is_unreachable_after_the_probe_timeout():
    import socket

    from fastface.hub import _probe

    with socket.socket() as server:  # accepts connections (backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        reachable, why = _probe(endpoint, 0.5)
        elapsed = time.monotonic() - start
    assert reachable is False and ("timeout" in why.lower() or "no answer" in why) and elapsed < 5


def test_adapter_files_come_from_the_adapter_seam_when_it_declares_them(tmp_path):
    """An adapter spec with ``required_files()`` (the adapter seam's interface) is asked, not guessed."""
    from dataclasses import dataclass

    from fastface.downloads import _adapter_files

    @dataclass(frozen=True)
    class SeamFile:  # the seam's RequiredFile(repo, filename | None, role, patterns)
        repo: str
        filename: str | None
        role: str
        patterns: tuple[str, ...] = ()

    @dataclass(frozen=True)
    class SeamSpec:
        name: str

        def required_files(self) -> list[SeamFile]:
            return [SeamFile("InstantX/InstantID", "ip-adapter.bin", "checkpoint"),
                    SeamFile("InstantX/InstantID", None, "controlnet", ("ControlNetModel/*",))]

    items = _adapter_files(SeamSpec("instantid"), Combination("hyper-4", "instantid"))
    assert [(i.filename, i.role, i.is_pattern) for i in items] == [
        ("ip-adapter.bin", "instantid adapter", False), ("ControlNetModel/*", "instantid controlnet", True)]
    own = _adapter_files(SeamSpec("instantid"), Combination("hyper-4", "instantid", adapter_path="mine.bin"))
    assert [i.role for i in own] == ["instantid controlnet"]
    # A folder pattern counts as cached when the cache holds a matching file.
    code = ("from fastface.downloads import RequiredFile, cached_path\n"
            "print(cached_path(RequiredFile('InstantX/InstantID', 'ControlNetModel/*', None, 'controlnet')))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    empty = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert empty.stdout.strip() == "None", empty.stderr
    _fake_hub_cache(tmp_path / "hub", "InstantX/InstantID", {"ControlNetModel/config.json": b"{}"})
    laid = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert laid.stdout.strip().endswith("snapshots/" + "0" * 40), laid.stderr


def test_url_hosted_adapter_files_lie_beside_the_cached_checkpoint(tmp_path):
    """PuLID's face parsing weights come from a URL, not the hub: listed by the seam, looked for (and
    fetched to) beside the adapter checkpoint, where the adapter reads them."""
    from fastface.adapters import ADAPTERS
    from fastface.adapters.pulid import PARSING_FILE, PARSING_RELEASE

    spec = ADAPTERS["pulid"]
    items = required_files(Combination(None, "pulid"))
    url = [i for i in items if i.is_url]
    assert [(i.repo, i.filename, i.beside) for i in url] == [(PARSING_RELEASE, PARSING_FILE,
                                                              (spec.repo, spec.weight_name))]
    assert not [i for i in required_files(Combination(None, "pulid", adapter_path="mine.bin")) if i.is_url]
    code = ("from fastface.downloads import Combination, cached_path, required_files\n"
            "print([cached_path(i) for i in required_files(Combination(None, 'pulid')) if i.is_url][0])")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    _fake_hub_cache(tmp_path / "hub", spec.repo, {spec.weight_name: b"x"})
    alone = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert alone.stdout.strip() == "None", alone.stderr  # checkpoint cached, parsing weights not beside it
    snapshot = next((tmp_path / "hub").glob(f"models--*/snapshots/{'0' * 40}"))
    (snapshot / PARSING_FILE).write_bytes(b"y")  # where `fastface download pulid` puts it
    beside = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert beside.stdout.strip().endswith(f"snapshots/{'0' * 40}/{PARSING_FILE}"), beside.stderr


def test_files_beside_a_local_checkpoint_are_not_needed_from_the_hub(tmp_path):
    """PuLID's EVA02-CLIP and InstantID's IdentityNet are read from beside a local checkpoint:
    lying there, the offline check does not ask for them (it did, and refused a working folder)."""
    from fastface.adapters.instantid import CONTROLNET_SUBFOLDER
    from fastface.adapters.pulid import EVA_CLIP_FILE

    folder = tmp_path / "pulid"
    folder.mkdir()
    (folder / "pulid_v1.bin").write_bytes(b"x")
    roles = lambda combination: [i.role for i in required_files(combination)]  # noqa: E731
    assert "pulid image encoder" in roles(Combination(None, "pulid", adapter_path=str(folder)))
    (folder / EVA_CLIP_FILE).write_bytes(b"y")
    for given in (folder, folder / "pulid_v1.bin"):  # the folder, or the checkpoint file in it
        assert "pulid image encoder" not in roles(Combination(None, "pulid", adapter_path=str(given)))
    assert "pulid image encoder" in roles(Combination(None, "pulid"))  # the hub's checkpoint: from the hub

    instantid = tmp_path / "instantid"
    (instantid / CONTROLNET_SUBFOLDER).mkdir(parents=True)
    (instantid / "ip-adapter.bin").write_bytes(b"x")
    assert "instantid controlnet" in roles(Combination(None, "instantid", adapter_path=str(instantid / "ip-adapter.bin")))
    (instantid / CONTROLNET_SUBFOLDER / "config.json").write_text("{}")
    assert "instantid controlnet" not in roles(Combination(None, "instantid",
                                                           adapter_path=str(instantid / "ip-adapter.bin")))
