"""Generation grid end to end with the tiny backbone, in real subprocesses: straight, killed and
resumed, refused on a changed option, split over two processes by `accelerate launch`."""

from __future__ import annotations

import html
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastface
from eval_helpers import fastface_cli
from fastface.evaluation.dataset import write_smoke_dataset

GRID = ["--backbone", "tiny", "--limit", "2", "--seeds", "2", "--no-progress"]
N_SAMPLES = 2 * 4 * 2  # identities x (2 realistic + 2 stylistic) x seeds
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def _temporaries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".tmp-*")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return write_smoke_dataset(tmp_path_factory.mktemp("eval-run") / "smoke").root


@pytest.fixture(scope="module")
def straight(smoke, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = fastface_cli("eval", "run", "--dataset", str(smoke), "--run-dir", str(run_dir), *GRID)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def test_straight_run_layout(straight, smoke):
    images = _files(straight)
    records = sorted((straight / "records").glob("*.json"))
    assert len(images) == len(records) == N_SAMPLES
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["config"]["backbone"] == "tiny" and manifest["samples"] == N_SAMPLES
    assert len(manifest["dataset"]["fingerprint"]) == 64 and manifest["versions"]["torch"]
    assert "eval run" in manifest["command"] and "--backbone tiny" in manifest["canonical_command"]
    reproduce = (straight / "REPRODUCE.md").read_text()
    assert manifest["canonical_command"] in reproduce and manifest["dataset"]["fingerprint"] in reproduce
    # The commit of this checkout, never a release of the unrelated "fastface" on the package index.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(fastface.__file__).parent).stdout.strip()
    assert commit and commit in reproduce and manifest["versions"]["fastface_commit"].startswith(commit)
    assert "pip install fastface" not in reproduce and "fastface==" not in reproduce
    record = json.loads(records[0].read_text())
    assert record["unet_evaluations"] == 10  # tiny backbone: 4 steps of the fastface branch plan
    assert record["wall_ms"] > 0 and record["peak_memory_mb"] > 0 and record["seed"] >= 0
    assert record["image_sha256"] and (straight / record["image"]).is_file()
    assert len({json.loads(r.read_text())["seed"] for r in records}) == N_SAMPLES


def test_killed_again_and_again_then_resumed_is_bit_identical(straight, smoke, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fastface.cli", "eval", "run", "--dataset", str(smoke), "--run-dir", str(run_dir), *GRID]
    rng = random.Random(1234)
    env = {**os.environ, **ENV}
    kills = 0
    for attempt in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = len(list((run_dir / "records").glob("*.json"))) if (run_dir / "records").is_dir() else 0
        if attempt == 0:
            time.sleep(rng.uniform(1.0, 4.0))  # during start-up / model loading
        else:
            # Wait for generation to be under way, then kill at a random moment within it.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if len(list((run_dir / "records").glob("*.json"))) > before:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3
    partial = len(list((run_dir / "records").glob("*.json")))
    assert partial < N_SAMPLES
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{N_SAMPLES - partial} generated, {partial} already done" in result.stdout
    assert _files(run_dir) == _files(straight)
    assert sorted(p.name for p in (run_dir / "records").iterdir()) == sorted(
        p.name for p in (straight / "records").iterdir())
    assert _temporaries(run_dir) == []


def test_resume_with_a_changed_option_is_refused(straight, smoke):
    result = fastface_cli("eval", "run", "--dataset", str(smoke), "--run-dir", str(straight), *GRID,
                          "--steps", "3", "--ip-scale", "0.5")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert message.startswith("error: refusing to resume") and len(message.splitlines()) == 1
    assert "--steps" in message and "--ip-scale" in message and "--width" not in message
    assert len(_files(straight)) == N_SAMPLES


def test_resume_with_a_changed_dataset_is_refused(straight, smoke, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(smoke, other)
    with open(other / "prompts" / "realistic.txt", "a") as fh:
        fh.write("a person reading under a tree\n")
    result = fastface_cli("eval", "run", "--dataset", str(other), "--run-dir", str(straight), *GRID)
    assert result.returncode == 2 and "--dataset differs" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes_equals_one(straight, smoke, tmp_path):
    run_dir = tmp_path / "dist"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "fastface.cli",
           "eval", "run", "--dataset", str(smoke), "--run-dir", str(run_dir), *GRID]
    result = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout
    ranks = {json.loads(p.read_text())["rank"] for p in (run_dir / "records").glob("*.json")}
    assert ranks == {0, 1}
    assert _files(run_dir) == _files(straight)
    assert _temporaries(run_dir) == []


def test_run_score_report_end_to_end(straight, smoke, tmp_path):
    """Offline: tiny backbone, tiny CLIP and aesthetic head, dlib + FaceNet; the no-identity reference
    run gives CLIP-I; models that cannot be had are reported unavailable; the page shows grid and plot."""
    from eval_helpers import make_aesthetic_head, make_tiny_clip

    reference = tmp_path / "no-identity"
    ref = fastface_cli("eval", "run", "--dataset", str(smoke), "--run-dir", str(reference), *GRID, "--no-identity")
    assert ref.returncode == 0, ref.stderr[-2000:]
    clip = make_tiny_clip(tmp_path / "clip")
    head = make_aesthetic_head(tmp_path / "head.pth", width=16)
    scored = fastface_cli("eval", "score", "--run-dir", str(straight), "--reference-run", str(reference),
                          "--clip-model", str(clip), "--aesthetic-head", str(head),
                          "--face-backends", "arcface,dlib,facenet", "--no-progress",
                          env={"FASTFACE_FACE_MODELS": str(tmp_path / "no-face-models")})
    assert scored.returncode == 0, scored.stderr[-2000:]
    scores = json.loads((straight / "scores.json").read_text())
    metrics = scores["metrics"]
    assert metrics["id.arcface"]["status"] == "unavailable" and metrics["id.arcface"]["reason"]
    assert metrics["image_reward"]["status"] == "unavailable" and "image-reward" in metrics["image_reward"]["reason"]
    assert all(metrics[k]["status"] == "ok" for k in ("id.dlib", "id.facenet", "clip_t.clip", "clip_i.clip", "aesthetic"))
    rows = scores["samples"]
    assert len(rows) == N_SAMPLES
    assert all("id.arcface" not in r and "image_reward" not in r for r in rows)  # never a made-up 0
    assert all(r["face_detected.dlib"] == 0.0 and r["id.dlib"] is None for r in rows)  # noise: no face
    assert all(-1 <= r["clip_i.clip"] <= 1 and -1 <= r["clip_t.clip"] <= 1 for r in rows)
    assert sum("clip_style.clip" in r for r in rows) == N_SAMPLES // 2  # stylistic samples only
    assert len(list((straight / "scores").glob("*.json"))) == N_SAMPLES * 5  # dlib, facenet, clip, aesthetic, CLIP-I

    out = tmp_path / "report"
    rep = fastface_cli("eval", "report", str(straight), str(reference), "--out", str(out))
    assert rep.returncode == 2  # the reference run has not been scored
    assert "has not been scored" in rep.stderr
    rep = fastface_cli("eval", "report", str(straight), "--out", str(out))
    assert rep.returncode == 0, rep.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    split_all = report["runs"][0]["aggregate"]["splits"]["all"]
    assert split_all["id.dlib"]["failure_rate"] == 1.0 and split_all["id.dlib"]["mean"] is None
    assert split_all["id.dlib"]["mean_failures_as_zero"] == 0.0
    assert split_all["id.arcface"] == {"status": "unavailable", "reason": metrics["id.arcface"]["reason"]}
    assert set(report["runs"][0]["aggregate"]["identities"]) == {"astronaut", "grace-hopper"}
    page = (out / "index.html").read_text()
    import re

    pictures = re.findall(r"<img src='([^']+)'", page)
    assert "quality_vs_cost.png" in pictures and any(p.startswith("grid_") for p in pictures)
    for name in pictures:
        assert (out / name).is_file() and (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unavailable" in page and "id.arcface" in page
    csv_text = (out / "report.csv").read_text()
    assert "id.dlib" in csv_text and "unavailable" in csv_text
    # Each reason once (not once per split and row); grids carry the prompt text, not its id.
    reason = metrics["id.arcface"]["reason"]
    assert page.count(html.escape(reason)) == 1
    same_reason = [key for key, status in metrics.items() if status["reason"] == reason]
    assert csv_text.count(reason.split(";")[0]) == len(same_reason)  # one row per metric, not per split
    # The reference run, scored too, is compared side by side and does not miss a reference itself.
    ref_scored = fastface_cli("eval", "score", "--run-dir", str(reference), "--metrics", "clip,disruption,cost",
                              "--clip-model", str(clip), "--no-progress")
    assert ref_scored.returncode == 0, ref_scored.stderr[-2000:]
    assert "no reference run" not in ref_scored.stdout and "clip_i" not in ref_scored.stdout
    both = tmp_path / "both"
    rep = fastface_cli("eval", "report", str(straight), str(reference), "--out", str(both))
    assert rep.returncode == 0, rep.stderr[-2000:]
    page = (both / "index.html").read_text()
    assert "side_by_side.png" in re.findall(r"<img src='([^']+)'", page)
    assert json.loads((both / "report.json").read_text())["side_by_side"] == "side_by_side.png"
    assert "no reference run" not in page


def test_scoring_split_over_two_processes_equals_one(straight, tmp_path):
    """`eval score` under `accelerate launch`: each rank scores its share, rank 0 writes the table."""
    import shutil

    from eval_helpers import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    runs = {}
    for name in ("one", "two"):
        runs[name] = tmp_path / name
        shutil.copytree(straight, runs[name], ignore=shutil.ignore_patterns("scores", "scores.*"))
    options = ["--metrics", "identity,clip,cost", "--face-backends", "dlib", "--clip-model", str(clip),
               "--no-progress"]
    single = fastface_cli("eval", "score", "--run-dir", str(runs["one"]), *options)
    assert single.returncode == 0, single.stderr[-2000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "fastface.cli",
           "eval", "score", "--run-dir", str(runs["two"]), *options]
    split = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=240)
    assert split.returncode == 0, split.stderr[-3000:]
    assert "rank 1 of 2: scored" in split.stdout  # the second process did score its share
    one = json.loads((runs["one"] / "scores.json").read_text())
    two = json.loads((runs["two"] / "scores.json").read_text())
    assert len(one["samples"]) == N_SAMPLES and one["samples"] == two["samples"]
    assert one["metrics"] == two["metrics"]
    assert _temporaries(runs["two"]) == []


def test_score_without_any_quality_metric_fails_unless_partial_is_allowed(straight, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns("scores", "scores.*"))
    options = ["eval", "score", "--run-dir", str(run), "--metrics", "identity,aesthetic,image-reward",
               "--face-backends", "dlib", "--aesthetic-head", str(tmp_path / "absent.pth"), "--no-progress"]
    strict = fastface_cli(*options)
    assert strict.returncode == 2
    error = [line for line in strict.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "NO QUALITY METRIC could be scored (image_reward, aesthetic)" in error[0]
    assert "fastface download --eval" in error[0] and "--allow-partial" in error[0]
    assert (run / "scores.json").is_file()  # the partial scores are kept
    partial = fastface_cli(*options, "--allow-partial")
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert "warning: NO QUALITY METRIC could be scored" in partial.stderr


# --- a run counts only what it verified; one writer per folder; a full disk ---------------------

def _copy_run(straight: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(straight, to, ignore=shutil.ignore_patterns("scores", "scores.*", ".lock"))
    return to


def _run(run_dir: Path, smoke: Path, *extra: str) -> subprocess.CompletedProcess:
    return fastface_cli("eval", "run", "--dataset", str(smoke), "--run-dir", str(run_dir), *GRID, *extra)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_score_and_report_count_only_verified_samples(straight, tmp_path):
    run_dir = _copy_run(straight, tmp_path / "scored")
    options = ["--metrics", "cost", "--no-progress"]
    assert fastface_cli("eval", "score", "--run-dir", str(run_dir), *options).returncode == 0
    images = sorted((run_dir / "images").glob("*.png"))
    swapped, truncated, deleted = images[0], images[2], images[3]
    swapped.write_bytes(images[1].read_bytes())
    truncated.write_bytes(truncated.read_bytes()[:200])
    deleted.unlink()

    # The report of the old scores draws the damaged images as marked blanks; it does not crash.
    report = fastface_cli("eval", "report", str(run_dir), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-2000:]

    scored = fastface_cli("eval", "score", "--run-dir", str(run_dir), *options)
    line = _error_line(scored)
    assert "3 damaged samples" in line and "eval run" in line
    for image in (swapped, truncated, deleted):
        assert image.stem in line
    table = json.loads((run_dir / "scores.json").read_text())
    assert len(table["samples"]) == N_SAMPLES - 3
    assert {swapped.stem, truncated.stem, deleted.stem} == set(table["damaged"])
    assert not {swapped.stem, truncated.stem, deleted.stem} & {row["sample"] for row in table["samples"]}

    scores_text = (run_dir / "scores.json").read_text()
    (run_dir / "scores.json").write_text('{"format": "fastface-eval-scores/1", "metr')
    line = _error_line(fastface_cli("eval", "report", str(run_dir), "--out", str(tmp_path / "report")))
    assert "scores.json" in line and "eval score" in line
    (run_dir / "scores.json").write_text(scores_text)
    sorted((run_dir / "records").glob("*.json"))[-1].write_text("{}")
    line = _error_line(fastface_cli("eval", "report", str(run_dir), "--out", str(tmp_path / "report")))
    assert "records/" in line and "lacks sample" in line


def test_resume_repairs_damaged_samples_and_a_second_writer_is_refused_meanwhile(straight, smoke, tmp_path):
    """The resume verifies what it counts as done and regenerates the damaged samples (swapped,
    truncated, deleted images; torn, empty and `{}` records). Frozen by SIGSTOP in the middle of
    its writes, it still owns its folder: a second run and a scorer are refused at once, naming it,
    and touch nothing; resumed, it finishes byte-identical to a straight run."""
    run_dir = _copy_run(straight, tmp_path / "damaged")
    images = sorted((run_dir / "images").glob("*.png"))
    records = sorted((run_dir / "records").glob("*.json"))
    a_bytes, b_bytes = images[9].read_bytes(), images[10].read_bytes()
    images[9].write_bytes(b_bytes)
    images[10].write_bytes(a_bytes)  # swapped
    images[11].write_bytes(images[11].read_bytes()[:300])  # truncated
    images[12].unlink()  # deleted
    records[13].write_text("{\"sample\": \"garbage")  # a torn record
    records[14].write_text("{}")
    records[15].write_text("")
    damaged_at = records[9].stat().st_mtime_ns
    cmd = [sys.executable, "-m", "fastface.cli", "eval", "run", "--dataset", str(smoke), "--run-dir", str(run_dir), *GRID]
    first = subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        # Canonical order: the first repaired sample is images[9]; stop the run right after it.
        while time.monotonic() < deadline and not (records[9].is_file() and records[9].stat().st_mtime_ns != damaged_at):
            assert first.poll() is None, first.communicate()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        before = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
        for second in (_run(run_dir, smoke), fastface_cli("eval", "score", "--run-dir", str(run_dir),
                                                          "--metrics", "cost", "--no-progress")):
            line = _error_line(second)
            assert f"process {first.pid} on {socket.gethostname()}" in line and "stopped" in line
        after = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
        assert after == before  # not one file touched (nor a temporary of the first removed)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    assert f"7 generated, {N_SAMPLES - 7} already done, 7 repaired" in out
    warning = [line for line in err.splitlines() if line.startswith("warning: regenerated")]
    assert len(warning) == 1 and images[9].stem in warning[0] and "image differs from its record" in warning[0]
    assert _files(run_dir) == _files(straight) and _temporaries(run_dir) == []  # every sample back, byte for byte


def test_full_disk_is_one_line_and_resume_completes_the_run(straight, smoke, tmp_path):
    """On a real 3 MB tmpfs: a run that fills it stops with one line, nothing half-written counted;
    with space freed, the resume ends byte-identical to a straight run. Scoring and the report on a
    full disk are one line too."""
    from disk_helpers import fill, tmpfs

    with tmpfs(tmp_path / "disk", "3m") as disk:
        filler = fill(disk, 100_000)  # room for a few samples out of 16
        run_dir = disk / "run"
        line = _error_line(_run(run_dir, smoke))
        assert line.startswith("error: no space left on device while writing ") and "rerun to resume" in line
        done = len(list((run_dir / "records").glob("*.json")))
        assert 0 < done < N_SAMPLES
        assert _temporaries(run_dir) == [] and not list(run_dir.rglob(".*.tmp*"))
        for name, data in _files(run_dir).items():
            if (run_dir / "records" / name.replace(".png", ".json")).is_file():
                assert data == _files(straight)[name]  # each sample counted as done is whole

        filler.unlink()
        resumed = _run(run_dir, smoke)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"{N_SAMPLES - done} generated, {done} already done, 0 repaired" in resumed.stdout
        assert _files(run_dir) == _files(straight)

        scored = fastface_cli("eval", "score", "--run-dir", str(run_dir), "--metrics", "cost", "--no-progress")
        assert scored.returncode == 0, scored.stderr[-2000:]
        fill(disk, 2_000)  # room for the report's folder, not for its pictures
        assert "no space left on device" in _error_line(
            fastface_cli("eval", "report", str(run_dir), "--out", str(disk / "report")))
        assert not [p for p in (disk / "report").iterdir() if p.suffix in (".png", ".json", ".html", ".csv")]
        fill(disk / "report", 0)
        assert "no space left on device" in _error_line(
            fastface_cli("eval", "score", "--run-dir", str(run_dir), "--metrics", "cost", "--no-progress"))
        assert json.loads((run_dir / "scores.json").read_text())["samples"]  # the old table is whole
        assert not list(disk.rglob(".tmp-*")) and not list(disk.rglob(".*.tmp*"))


def test_run_config_carries_scheduler_cfg_scale_and_limits():
    """Every option of `eval run` reaches the engine's configuration (none silently dropped)."""
    from fastface.errors import ConfigError
    from fastface.evaluation.run import Grid, RunConfig, canonical_command, resolve_run_config

    config = RunConfig(backbone="tiny", adapter="pulid", method="none", scheduler="dpm++2m-trailing", cfg_scale=1.2,
                       steps=250)
    with pytest.raises(ConfigError, match="steps must be at most 200, got 250"):
        resolve_run_config(config)
    resolved = resolve_run_config(config, limits="steps=300")
    assert resolved["steps"] == 250
    assert resolved["backbone"].scheduler == "DPMSolverMultistepScheduler" and resolved["backbone"].cfg_scale == 1.2
    assert (resolved["guidance"].alpha, resolved["guidance"].beta) == (1.2, 1.2)
    command = canonical_command(config, Grid(), "DATA", "RUN")
    assert command[command.index("--scheduler") + 1] == "dpm++2m-trailing"
    assert command[command.index("--cfg-scale") + 1] == "1.2"
