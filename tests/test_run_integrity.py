"""No wrong number, no lost file: the run-folder lock, record checks, damaged score tables, dataset
entries that are not photos or not safe names, overflowing embeddings, outputs that never replace a
file, and full disks, on real files, real processes and a real tmpfs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import fastface
from fastface.errors import InputError

SRC = str(Path(fastface.__file__).resolve().parents[1])  # the fastface under test, for the subprocesses


# --- one writer per run folder ------------------------------------------------------------------

def _holder(folder: Path, env: dict | None = None) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it."""
    code = ("import sys, time\nfrom fastface.evaluation.lock import lock_run_folder\n"
            "lock = lock_run_folder(sys.argv[1], 'fastface eval run')\nprint('locked', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC, **(env or {})})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_live_holder_is_named_and_refused_even_when_stopped_and_a_dead_one_is_taken_over(tmp_path):
    from fastface.evaluation.lock import RunFolderBusy, lock_run_folder

    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunFolderBusy) as busy:
            lock_run_folder(tmp_path, "fastface eval score")
        message = str(busy.value)
        assert f"process {holder.pid} on {socket.gethostname()}" in message and "eval score" in message
        holder.send_signal(signal.SIGSTOP)  # frozen, still alive: still the owner
        while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.01)  # the signal is delivered asynchronously
        started = time.monotonic()
        with pytest.raises(RunFolderBusy, match=f"stopped: resume it \\(`kill -CONT {holder.pid}`\\)"):
            lock_run_folder(tmp_path, "fastface eval run")
        assert time.monotonic() - started < 5  # refused at once, not after a wait
    finally:
        holder.kill()
        holder.wait()
    # Dead: its lock went with it; the file still names it, and is taken over.
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with lock_run_folder(tmp_path, "fastface eval run"):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_ranks_of_one_launch_share_the_folder_and_nobody_else_does(tmp_path, monkeypatch):
    from fastface.evaluation.lock import RunFolderBusy, lock_run_folder

    launch = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501", "TORCHELASTIC_RUN_ID": "none"}
    rank0 = _holder(tmp_path, {**launch, "RANK": "0"})
    try:
        for key, value in {**launch, "RANK": "1"}.items():
            monkeypatch.setenv(key, value)
        with lock_run_folder(tmp_path, "fastface eval run"):  # rank 1 of the same launch joins
            monkeypatch.setenv("MASTER_PORT", "29502")  # another launch
            with pytest.raises(RunFolderBusy, match=str(rank0.pid)):
                lock_run_folder(tmp_path, "fastface eval run")
            for key in launch:
                monkeypatch.delenv(key)
            monkeypatch.delenv("RANK")
            with pytest.raises(RunFolderBusy, match="distributed launch"):  # a lone process
                lock_run_folder(tmp_path, "fastface eval run")
    finally:
        rank0.kill()
        rank0.wait()


# --- records, manifests and score tables that are damaged ---------------------------------------

@pytest.mark.parametrize(("text", "problem"), [
    ("", "empty"), ("{\"sample\": \"a__", "not valid JSON"), ("{}", "lacks sample"), ("[1, 2]", "not a JSON object"),
    (json.dumps({"sample": "other", "identity": "a", "prompt_id": "p", "seed_index": 0, "seed": 1,
                 "image": "images/other.png", "image_sha256": "0"}), "belongs to another sample"),
])
def test_a_damaged_record_is_one_line_naming_it_and_the_repair(tmp_path, text, problem):
    from fastface.evaluation.run import load_records

    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "a__realistic-000__00.json").write_text(text)
    with pytest.raises(InputError) as error:
        load_records(tmp_path)
    message = str(error.value)
    assert "records/a__realistic-000__00.json" in message and problem in message
    assert "fastface eval run" in message and "\n" not in message


def test_a_damaged_scores_table_or_manifest_is_one_line(tmp_path):
    from fastface.evaluation.run import read_manifest
    from fastface.evaluation.score import load_scores

    for text in ("", "{\"format\": \"fastface-eval-sc", "{}", "[]", '{"format": "fastface-eval-scores/1"}'):
        (tmp_path / "scores.json").write_text(text)
        with pytest.raises(InputError, match="scores.json .*fastface eval score --run-dir"):
            load_scores(tmp_path)
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(InputError, match="manifest.json .*FastFace run folder"):
            read_manifest(tmp_path)


# --- dataset entries ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from fastface.evaluation.dataset import write_smoke_dataset

    return write_smoke_dataset(tmp_path_factory.mktemp("integrity") / "smoke").root


def test_dataset_refuses_special_files_and_hidden_identities(smoke, tmp_path):
    import shutil

    from fastface.evaluation.dataset import load_dataset

    root = tmp_path / "ds"
    shutil.copytree(smoke, root)
    os.mkfifo(root / "identities" / "astronaut" / "04-pipe.png")
    with socket.socket(socket.AF_UNIX) as sock:
        # AF_UNIX paths are limited to ~107 bytes: bind from inside the folder, by a relative name.
        here = os.getcwd()
        os.chdir(root / "identities" / "grace-hopper")
        try:
            sock.bind("04-socket.png")
        finally:
            os.chdir(here)
        (root / "identities" / ".ada").mkdir()
        shutil.copy(smoke / "identities" / "astronaut" / "01-portrait.png", root / "identities" / ".ada")
        (root / "identities" / ".DS_Store").write_bytes(b"\0")  # the system's, not a person
        dataset = load_dataset(root)
    issues = "\n".join(dataset.issues)
    assert "identities/astronaut/04-pipe.png is a FIFO" in issues
    assert "identities/grace-hopper/04-socket.png is a socket" in issues
    assert "identities/.ada is hidden" in issues and ".DS_Store" not in issues
    assert len(dataset.issues) == 3


def test_identity_names_too_long_for_a_file_name_get_safe_unique_ids(smoke, tmp_path):
    import shutil

    from fastface.evaluation.dataset import MAX_ID_LENGTH, load_dataset
    from fastface.evaluation.run import Grid, _tmp_path, image_path, record_path, work_units
    from fastface.evaluation.score import score_path

    root = tmp_path / "ds"
    shutil.copytree(smoke, root)
    long_a, long_b = "a" * 239 + "1", "a" * 239 + "2"  # 240 characters, one prefix
    (root / "identities" / "astronaut").rename(root / "identities" / long_a)
    shutil.copytree(root / "identities" / "grace-hopper", root / "identities" / long_b)
    (root / "identities" / long_b / "01-portrait.png").write_bytes(
        (root / "identities" / long_a / "01-portrait.png").read_bytes())  # not the same photos as grace-hopper
    dataset = load_dataset(root)
    assert dataset.issues == []
    ids = {entry.name: entry.id for entry in dataset.identities}
    assert ids[long_a] != ids[long_b] and all(len(ident) <= MAX_ID_LENGTH for ident in ids.values())
    assert ids["grace-hopper"] == "grace-hopper"  # short names keep their id (and seeds)
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "records").mkdir()
    (run_dir / "scores").mkdir()
    for unit in work_units(dataset, Grid(limit=1), 1):
        sample = unit[0].id
        for path in (image_path(run_dir, sample), _tmp_path(image_path(run_dir, sample)), record_path(run_dir, sample),
                     _tmp_path(score_path(run_dir, sample, "clip-vit-l-14-336")),
                     _tmp_path(score_path(run_dir, sample, "disruption-vit-l-14-336"))):
            path.write_bytes(b"x")  # every file name the run and the scorer derive from it can exist


# --- embeddings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [np.full(512, 1e38, np.float32), np.full((2, 128), 1e300), np.full(8, -3e38)])
def test_an_overflowing_embedding_is_refused_not_made_a_zero_identity(tmp_path, values):
    from fastface.faces import load_embedding
    from fastface.faces.types import Identity

    with pytest.raises(InputError, match="too large for float32"):
        Identity.from_embeddings(values)
    np.save(tmp_path / "face.npy", values)
    with pytest.raises(InputError, match="face.npy.*too large"):
        load_embedding(tmp_path / "face.npy")


# --- inputs that are not files --------------------------------------------------------------------

def test_fifo_socket_and_device_are_refused_without_opening_them(tmp_path):
    """In a subprocess with a timeout: opening a FIFO without a writer would block forever."""
    os.mkfifo(tmp_path / "pipe.png")
    code = ("import sys\nfrom fastface.faces import load_image\nfrom fastface.errors import InputError\n"
            "for path in sys.argv[1:]:\n    try:\n        load_image(path)\n    except InputError as exc:\n"
            "        print(exc)\n")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.png"))
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipe.png"), str(tmp_path / "sock.png"),
                               "/dev/zero"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines == [f"'{tmp_path / 'pipe.png'}' is a FIFO (named pipe), not an image file",
                     f"'{tmp_path / 'sock.png'}' is a socket, not an image file",
                     "'/dev/zero' is a character device, not an image file"]


# --- outputs that never replace a file ------------------------------------------------------------

def _result(n: int, seed: int = 7, shade: int = 0) -> SimpleNamespace:
    images = [Image.new("RGB", (8, 8), (i * 40, shade, 0)) for i in range(n)]
    return SimpleNamespace(images=images, metadata=[{"seed": seed + i, "index": i} for i in range(n)])


def test_images_in_a_folder_keep_what_is_there_and_never_replace_an_input(tmp_path):
    from fastface.commands import write_images

    out = tmp_path / "out"
    first = write_images(_result(4), out, images_per_prompt=2)
    assert [p.name for p in first] == ["image_p00_seed7.png", "image_p00_seed8.png", "image_p01_seed9.png",
                                       "image_p01_seed10.png"]
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    second = write_images(_result(4), out, images_per_prompt=2)
    assert [p.name for p in second] == ["image_p00_seed7_2.png", "image_p00_seed8_2.png", "image_p01_seed9_2.png",
                                        "image_p01_seed10_2.png"]
    assert all((out / name).read_bytes() == data for name, data in kept.items())
    # --overwrite replaces earlier outputs, but never a file the command reads.
    face = out / "image_p01_seed8.png"
    face.write_bytes((out / "image_p00_seed8.png").read_bytes())  # the user's photo, in the way
    face_bytes = face.read_bytes()
    third = write_images(_result(2, seed=7, shade=99), out, overwrite=True, protected=[("--face", face)])
    assert [p.name for p in third] == ["image_p00_seed7.png", "image_p01_seed8_2.png"]
    assert (out / "image_p00_seed7.png").read_bytes() != kept["image_p00_seed7.png"]  # replaced, as asked
    assert face.read_bytes() == face_bytes
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_single_file_output_checks(tmp_path):
    from fastface.commands import check_output

    photo = tmp_path / "me.png"
    Image.new("RGB", (8, 8)).save(photo)
    link = tmp_path / "alias.png"
    link.symlink_to(photo)
    for target, overwrite in ((photo, False), (photo, True), (link, True)):
        with pytest.raises(InputError, match="which is the --face input"):
            check_output(target, single_file=True, overwrite=overwrite, inputs=[("--face", photo)])
    (tmp_path / "old.png").write_bytes(b"old")
    with pytest.raises(InputError, match="existing file .*--overwrite"):
        check_output(tmp_path / "old.png", single_file=True, overwrite=False)
    check_output(tmp_path / "old.png", single_file=True, overwrite=True)
    with pytest.raises(InputError, match="is under a file"):
        check_output(photo / "x.png", single_file=True, overwrite=False)
    check_output(tmp_path / "new" / "deeper" / "x.png", single_file=True, overwrite=False)
    assert not (tmp_path / "new").exists()  # checked, not created


def test_read_only_output_folder_is_refused(tmp_path):
    from disk_helpers import read_only_folder
    from fastface.commands import check_output

    with read_only_folder(tmp_path / "ro") as folder:
        for out, single in ((folder / "x.png", True), (folder / "sub", False)):
            with pytest.raises(InputError, match="not writable"):
                check_output(out, single_file=single, overwrite=False)


def test_full_disk_leaves_no_half_written_file(tmp_path):
    from disk_helpers import fill, tmpfs
    from fastface.atomic import DiskFullError, write_text_atomic
    from fastface.evaluation.run import write_json_atomic

    with tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "old.json").write_text("old")
        fill(disk, 8_000)
        for write in (write_text_atomic, write_json_atomic):
            with pytest.raises(DiskFullError, match="no space left on device while writing .*old.json; free space"):
                write(disk / "old.json", "x" * 50_000)
            assert (disk / "old.json").read_text() == "old"
            assert sorted(p.name for p in disk.iterdir()) == ["filler", "old.json"]
