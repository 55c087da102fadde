"""The ``fastface`` command line, run as real subprocesses on the tiny models and real photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PORTRAIT = Path(__file__).resolve().parents[1] / "src" / "fastface" / "data" / "portrait.jpg"


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("fastface-cache")
    # One thread per subprocess: the suite may share its 2 cores with other work, and oversubscribed
    # OpenMP threads make tiny-model steps orders of magnitude slower.
    env = dict(os.environ, HF_HUB_OFFLINE="1", FASTFACE_CACHE=str(cache), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return env


def fastface(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastface.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle.lower() in error_lines[0].lower(), error_lines[0]


def test_generate_writes_images_and_sidecars(cli_env, tmp_path):
    out = tmp_path / "out"
    proc = fastface(cli_env, "generate", "--face", str(PORTRAIT), "--prompt", "a person on a beach",
                    "--prompt", "a person in a forest", "--num-images", "2", "--seed", "7",
                    "--backbone", "tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    seeds = []
    for png in pngs:
        meta = json.loads(png.with_suffix(".json").read_text())
        seeds.append(meta["seed"])
        assert meta["unet_evaluations"] == 10  # default fastface preset at 4 steps
        assert meta["backbone"] == "tiny" and meta["method"] == "fastface"
        assert meta["loras_fused"] is True  # one command, one LoRA weighting: merged once
        assert Image.open(png).size == (64, 64)
    assert sorted(seeds) == [7, 8, 9, 10]  # image i of the call uses seed + i
    licence = [line for line in proc.stderr.splitlines() if line.startswith("licence: ")]
    assert len(licence) == 1 and "backbone: tiny random test weights" in licence[0]
    assert "face model:" in licence[0]  # the dlib models that produced the embedding
    printed = sorted(line for line in proc.stdout.splitlines() if line.endswith(".png"))
    assert printed == [str(p) for p in pngs]


def test_presets_lists_everything(cli_env):
    proc = fastface(cli_env, "presets", "--json")
    assert proc.returncode == 0, proc.stderr
    table = json.loads(proc.stdout)
    backbones = {b["name"] for b in table["backbones"]}
    assert {"sdxl", "hyper-1", "hyper-2", "hyper-4", "hyper-8", "lcm", "lightning-2", "lightning-4",
            "lightning-8", "turbo", "dmd2", "tcd", "tiny"} <= backbones
    adapters = {a["name"]: a for a in table["adapters"]}
    assert set(adapters) >= {"faceid", "faceid-plusv2", "plus-face", "faceid-portrait", "faceid-portrait-unnorm",
                             "instantid", "pulid", "pulid-style", "pulid-v1.1"}
    instantid = " ".join(adapters["instantid"]["licence"])
    assert "Apache-2.0" in instantid and "antelopev2" in instantid and "non-commercial" in instantid
    assert adapters["instantid"]["files"] == ["InstantX/InstantID/ip-adapter.bin", "InstantX/InstantID/ControlNetModel"]
    assert not adapters["plus-face"]["presets_tuned"] and adapters["faceid"]["presets_tuned"]
    assert {m["name"] for m in table["methods"]} == {"fastface", "fastface-softmask", "dcg", "am", "none"}
    assert all(b["licence"] for b in table["backbones"])
    human = fastface(cli_env, "presets")
    assert human.returncode == 0 and "licence" in human.stdout
    assert human.stdout.count("not tuned for this adapter") == 7  # plus-face, 2 portrait, instantid, 3 pulid
    assert "pulid-v1.1" in human.stdout


def test_non_image_face(cli_env, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not an image")
    proc = fastface(cli_env, "generate", "--face", str(bogus), "--prompt", "x", "--backbone", "tiny",
                    "--out", str(tmp_path / "o"))
    assert_user_error(proc, "notes.png")
    assert not (tmp_path / "o").exists()


def test_face_without_face(cli_env, tmp_path):
    from skimage import data

    cat = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(cat)
    proc = fastface(cli_env, "generate", "--face", str(cat), "--prompt", "x", "--backbone", "tiny",
                    "--out", str(tmp_path / "o"))
    assert_user_error(proc, "no face", "cat.png")


def test_wrong_size_embedding(cli_env, tmp_path):
    embedding = tmp_path / "face.npy"
    np.save(embedding, np.ones(64, dtype=np.float32))
    proc = fastface(cli_env, "generate", "--face", str(embedding), "--prompt", "x", "--backbone", "tiny",
                    "--out", str(tmp_path / "o"))
    assert_user_error(proc, "128", "64")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--method", "fastest"], ["fastest", "fastface"]),
        (["--backbone", "hyper-3"], ["hyper-3", "hyper-4"]),
        (["--adapter", "photomaker2"], ["photomaker2", "faceid"]),
        (["--alpha", "1,1.5,1"], ["alpha", "3", "4"]),
        (["--steps", "2", "--beta", "1,2,3,4"], ["beta", "4", "2"]),
    ],
)
def test_bad_configuration(cli_env, tmp_path, args, needles):
    proc = fastface(cli_env, "generate", "--face", str(PORTRAIT), "--prompt", "x", "--backbone", "tiny",
                    "--out", str(tmp_path / "o"), *args)
    assert_user_error(proc, *needles)


def test_missing_weights_offline(cli_env, tmp_path):
    embedding = tmp_path / "face.npy"
    np.save(embedding, np.ones(512, dtype=np.float32))
    env = dict(cli_env, HF_HOME=str(tmp_path / "empty-hf-home"))
    proc = fastface(env, "generate", "--face", str(embedding), "--prompt", "x", "--backbone", "hyper-4",
                    "--device", "cpu", "--out", str(tmp_path / "o"))
    assert_user_error(proc, "offline")
    assert "stabilityai/stable-diffusion-xl-base-1.0" in proc.stderr and "ByteDance/Hyper-SD" in proc.stderr
    # One command fetches every missing piece of the combination (float32 weights for a CPU run).
    assert "with: fastface download hyper-4 faceid --precision fp32; or pass --base-model <local" in proc.stderr
    assert "base_model=" not in proc.stderr  # CLI terms


def test_missing_face_file_and_bad_flag(cli_env, tmp_path):
    proc = fastface(cli_env, "generate", "--face", str(tmp_path / "nobody.jpg"), "--prompt", "x",
                    "--backbone", "tiny", "--out", str(tmp_path / "o"))
    assert_user_error(proc, "nobody.jpg")
    proc = fastface(cli_env, "generate", "--face", "a.jpg", "--prompt", "x", "--steps", "four", "--out", "o")
    assert_user_error(proc, "steps")


def test_demo_writes_contact_sheet(cli_env, tmp_path):
    out = tmp_path / "demo"
    proc = fastface(cli_env, "demo", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    methods = {row["method"] for row in summary["images"]}
    assert methods == {"fastface", "fastface-softmask", "dcg", "am", "none"}
    assert {row["adapter"] for row in summary["images"]} == {
        "faceid", "faceid-plusv2", "plus-face", "faceid-portrait", "faceid-portrait-unnorm", "instantid",
        "pulid", "pulid-v1.1"}
    for row in summary["images"]:
        assert (out / row["path"]).is_file()
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 192 * 5
    assert "contact_sheet.png" in (out / "index.html").read_text()


def test_guidance_overrides_reach_the_plan(cli_env, tmp_path):
    target = tmp_path / "one.jpg"
    proc = fastface(cli_env, "generate", "--face", str(PORTRAIT), "--prompt", "x", "--backbone", "tiny",
                    "--method", "dcg", "--alpha", "1,2,2,1", "--beta", "2", "--rescale", "0", "--out", str(target))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(target).format == "JPEG"  # the file name's format, written atomically
    meta = json.loads(target.with_suffix(".json").read_text())
    assert meta["guidance"]["alpha"] == [1.0, 2.0, 2.0, 1.0] and meta["guidance"]["rescale"] == 0.0
    # Without rescale only branches with a non-zero coefficient run: (1-α)ε∅ + (α-β)εI + βεTI.
    assert [step["branches"] for step in meta["schedule"]] == [
        ["id", "full"], ["null", "full"], ["null", "full"], ["id", "full"]]
    assert meta["unet_evaluations"] == 8


def test_instantid_pose_and_controlnet_scale(cli_env, tmp_path):
    import skimage.data

    pose = tmp_path / "pose.png"
    Image.fromarray(skimage.data.astronaut()).save(pose)
    out = tmp_path / "one.png"
    proc = fastface(cli_env, "generate", "--face", str(PORTRAIT), "--prompt", "a person", "--backbone", "tiny",
                    "--adapter", "instantid", "--pose", str(pose), "--controlnet-scale", "0.5", "--method", "dcg",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["identity"]["controlnet_scale"] == 0.5 and meta["identity"]["pose"] == str(pose)
    assert meta["unet_evaluations"] == meta["controlnet_evaluations"] == 10
    wrong = fastface(cli_env, "generate", "--face", str(PORTRAIT), "--prompt", "a person", "--backbone", "tiny",
                     "--pose", str(pose), "--out", str(tmp_path / "x.png"))
    assert_user_error(wrong, "pose", "faceid")
    missing = fastface(cli_env, "generate", "--face", str(PORTRAIT), "--prompt", "a person", "--backbone", "tiny",
                       "--adapter", "instantid", "--pose", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "y.png"))
    assert_user_error(missing, "--pose", "no such file")
    # A bad scale is refused before anything loads: with a load first, the missing sdxl weights
    # (an empty hub cache, offline) would be the error instead.
    negative = fastface(dict(cli_env, HF_HOME=str(tmp_path / "empty-hf-home")), "generate", "--face", str(PORTRAIT),
                        "--prompt", "a person", "--backbone", "hyper-4", "--adapter", "instantid",
                        "--controlnet-scale", "-1", "--out", str(tmp_path / "z.png"))
    assert_user_error(negative, "controlnet_scale must be >= 0, got -1")
    assert not (tmp_path / "z.png").exists()


# --- outputs never replace a file; inputs that hang or overflow; a full disk ----------------------

def test_out_is_checked_before_any_model_loads(cli_env, tmp_path):
    """Each of these would, with a model load first, fail on the missing hyper-4/arcface weights."""
    import shutil

    from disk_helpers import read_only_folder

    env = dict(cli_env, HF_HOME=str(tmp_path / "empty-hf-home"))
    me = tmp_path / "me.png"
    shutil.copy(PORTRAIT, me)
    photo = me.read_bytes()
    face = ["--face", str(me), "--prompt", "x", "--backbone", "hyper-4", "--device", "cpu"]
    # The photo is never replaced, even with --overwrite (an existing file, a path under a file:
    # the same check, tested without a subprocess in test_run_integrity.py).
    assert_user_error(fastface(env, "generate", *face, "--out", str(me), "--overwrite"), "--face input", "me.png")
    with read_only_folder(tmp_path / "ro") as folder:
        assert_user_error(fastface(env, "generate", *face, "--out", str(folder / "images")), "not writable")
    assert me.read_bytes() == photo


def test_second_generate_keeps_the_first_images(cli_env, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--face", str(PORTRAIT), "--prompt", "a person on a beach", "--prompt", "a person in a forest",
            "--seed", "7", "--backbone", "tiny", "--steps", "2", "--out", str(out)]
    first = fastface(cli_env, *args)
    assert first.returncode == 0, first.stderr[-2000:]
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(kept) == ["image_p00_seed7.json", "image_p00_seed7.png", "image_p01_seed8.json",
                            "image_p01_seed8.png"]
    second = fastface(cli_env, *args, "--prompt", "a person in a library")
    assert second.returncode == 0, second.stderr[-2000:]
    assert [line for line in second.stdout.splitlines() if line.endswith(".png")] == [
        str(out / "image_p00_seed7_2.png"), str(out / "image_p01_seed8_2.png"), str(out / "image_p02_seed9.png")]
    assert all((out / name).read_bytes() == data for name, data in kept.items())
    assert (out / "image_p00_seed7_2.png").read_bytes() == kept["image_p00_seed7.png"]  # same seed, same image
    assert json.loads((out / "image_p02_seed9.json").read_text())["prompt"] == "a person in a library"


def test_fifo_face_and_overflowing_embedding_are_one_line(cli_env, tmp_path):
    import os

    pipe = tmp_path / "face.png"
    os.mkfifo(pipe)
    proc = fastface(cli_env, "generate", "--face", str(pipe), "--prompt", "x", "--backbone", "tiny",
                    "--out", str(tmp_path / "o"), timeout=60)  # it used to wait forever for a writer
    assert_user_error(proc, "face.png", "FIFO")
    embedding = tmp_path / "huge.npy"
    np.save(embedding, np.full(128, 1e38, dtype=np.float32))  # its norm overflows float32
    proc = fastface(cli_env, "generate", "--face", str(embedding), "--prompt", "x", "--backbone", "tiny",
                    "--out", str(tmp_path / "o"))
    assert_user_error(proc, "huge.npy", "too large")
    assert "RuntimeWarning" not in proc.stderr and not (tmp_path / "o").exists()


def test_generate_on_a_full_disk_is_one_line_and_keeps_whole_images(cli_env, tmp_path):
    from disk_helpers import fill, tmpfs

    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk, 30_000)  # room for about one 64x64 image and its sidecar
        proc = fastface(cli_env, "generate", "--face", str(PORTRAIT), "--prompt", "x", "--num-images", "4",
                        "--backbone", "tiny", "--steps", "2", "--out", str(disk / "out"))
        assert_user_error(proc, "no space left on device while writing", "free space and rerun")
        written = sorted((disk / "out").glob("*.png"))
        assert len(written) < 4
        for png in written:
            assert Image.open(png).size == (64, 64)  # whole, decodable
            assert json.loads(png.with_suffix(".json").read_text())["seed"] >= 0
        assert not [p for p in (disk / "out").iterdir() if p.name.startswith(".")]
