"""Kill/resume campaign for `fastface eval run` (a one-off check, too slow for CI).

An evaluation run on the tiny backbone is SIGKILLed again and again at random moments (during
start-up and model loading, and at random points of generation), each new start taking over the
lock of the process just killed, then resumed to the end. The finished folder must equal an
uninterrupted run byte for byte, with no temporary file left and every record verified.

    PYTHONPATH=src OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/kill_resume.py --kills 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _images(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").glob("*.png"))}


def _records(run_dir: Path) -> int:
    folder = run_dir / "records"
    return len([p for p in folder.glob("*.json") if not p.name.startswith(".")]) if folder.is_dir() else 0


def _verify(run_dir: Path, straight: Path) -> dict:
    """A finished folder against the uninterrupted one: same image bytes, same records, no temporary."""
    return {"folder": run_dir.name, "samples": _records(run_dir),
            "byte_identical_images": _images(run_dir) == _images(straight),
            "same_record_files": sorted(p.name for p in (run_dir / "records").iterdir())
            == sorted(p.name for p in (straight / "records").iterdir()),
            "temporary_files_left": [str(p) for p in run_dir.rglob(".tmp-*")] + [str(p) for p in run_dir.rglob(".*.tmp*")],
            "starts": len(json.loads((run_dir / "manifest.json").read_text())["history"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fastface-kill-resume-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "fastface.cli"]
    dataset = work / "smoke"
    if not dataset.is_dir():
        subprocess.run([*cli, "eval", "dataset", "init", str(dataset)], env=env, check=True, capture_output=True)
    grid = ["--dataset", str(dataset), "--backbone", "tiny", "--limit", "4", "--seeds", "3", "--batch-size", "2",
            "--no-progress"]
    straight = work / "straight"
    reused = straight.is_dir()
    t0 = time.perf_counter()
    done = subprocess.run([*cli, "eval", "run", "--run-dir", str(straight), *grid], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    straight_s = time.perf_counter() - t0
    total = _records(straight)
    print(f"uninterrupted run: {total} samples in {straight_s:.1f} s{' (already there)' if reused else ''}")

    rng = random.Random(args.seed)
    first_sample_s = 10.0  # measured again at each generation-phase kill
    killed = work / "killed"
    kills = startup_kills = generation_kills = completed_early = 0
    finished: list[dict] = []
    attempts = 0
    while kills < args.kills:
        attempts += 1
        before = _records(killed)
        proc = subprocess.Popen([*cli, "eval", "run", "--run-dir", str(killed), *grid], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = time.monotonic()
        if attempts % 2:
            # Anywhere from the start to a little past the first new sample (start-up, loading,
            # lock take-over, clean-up, manifest, the first writes), scaled to this machine's pace.
            time.sleep(rng.uniform(0.0, 1.2 * first_sample_s))
            phase = "start-up"
        else:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and proc.poll() is None and _records(killed) == before:
                time.sleep(0.01)
            first_sample_s = max(1.0, time.monotonic() - started)
            time.sleep(rng.uniform(0.0, 1.5))  # a random point of generation (mid-image, mid-record)
            phase = "generation"
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            startup_kills += phase == "start-up" and _records(killed) == before
            generation_kills += not (phase == "start-up" and _records(killed) == before)
        else:
            err = proc.stderr.read().decode() if proc.stderr else ""
            assert proc.returncode == 0, f"a start after a kill failed: {err[-2000:]}"
            completed_early += 1
            phase = "no kill (the start finished its work)"
            if _records(killed) == total:
                finished.append(_verify(killed, straight))
                print(f"{killed.name} finished between kills: {finished[-1]}; going on with a fresh folder")
                killed = work / f"killed-{attempts}"
        if proc.stderr:
            proc.stderr.close()
        print(f"attempt {attempts}: {phase} kill #{kills}, {_records(killed)}/{total} samples done", flush=True)
    partial = _records(killed)
    resumed = subprocess.run([*cli, "eval", "run", "--run-dir", str(killed), *grid], env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finished.append(_verify(killed, straight))
    summary = {"kills": kills, "kills_before_a_new_sample": startup_kills, "kills_after_new_samples": generation_kills,
               "starts_that_finished": completed_early, "samples_per_run": total, "done_before_final_resume": partial,
               "final_resume": resumed.stdout.strip(), "finished_folders": finished}
    print(json.dumps(summary, indent=2))
    ok = all(f["byte_identical_images"] and f["same_record_files"] and not f["temporary_files_left"] for f in finished)
    return 0 if ok and "0 repaired" in resumed.stdout else 1


if __name__ == "__main__":
    sys.exit(main())
