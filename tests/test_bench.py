"""``fastface bench`` / benchmarks/speed.py on the tiny backbone, as real subprocesses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastface.bench import BenchOptions, VariantResult, _am_overhead, deviation, format_markdown, psnr
from fastface.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--backbone", "tiny", "--device", "cpu",
        "--steps", "4", "--repeats", "1", "--warmup", "0", "--no-progress", "--threads", "1",
        "--variants", "none,fastface,fastface-guided,naive,fastface-unfused,naive-planned", "--host-stages", "1",
        "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=480)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # strict JSON: no NaN/Infinity literals
    report = json.loads((out / "bench.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    return report, (out / "bench.md").read_text(), proc.stdout


def test_evaluation_counts_at_four_steps(tiny_report):
    report, _, _ = tiny_report
    evals = {name: row["evaluations"] for name, row in report["results"].items()}
    assert evals["fastface"] == 10
    assert evals["naive"] == 12
    assert evals["fastface-guided"] == 8
    assert evals["fastface-unfused"] == 10
    assert evals["none"] == 4
    assert evals["naive-planned"] == 10  # the published loop with only the plan's branches
    assert all(row["error"] is None for row in report["results"].values())


def test_host_stages_compare_the_cached_and_the_legacy_placement(tiny_report):
    report, markdown, _ = tiny_report
    host = report["host_stages"]
    for view in ("cached", "legacy"):
        row = host[view]
        assert row["host_total"] == pytest.approx(row["identity"] + row["prompt"] + row["setup"] + row["finish"], abs=0.01)
        assert row["setup"] > 0 and row["encode_prompt"] > 0
        assert row["identity_kv"] > 0  # fastface projects identity K/V in the set-up: timed apart from the host work
    assert host["walks_ms"]["unet.dtype"] > 0 and host["unet_modules"] > 100
    assert "before (walks per use)" in markdown and "after (read once)" in markdown and "identity K/V" in markdown
    assert report["results"]["naive-planned"]["lora_state"] == "fused"


def test_report_states_lora_state_timings_and_deviation(tiny_report):
    report, markdown, stdout = tiny_report
    rows = report["results"]
    assert rows["naive"]["lora_state"] == "unfused" and rows["fastface-unfused"]["lora_state"] == "unfused"
    assert rows["fastface"]["lora_state"] == "fused"
    for row in rows.values():
        ms = row["ms_per_image"]
        assert ms["denoise"] > 0 and ms["total"] >= ms["denoise"]
    assert report["ratios_vs_none"]["none"] == 1.0
    dev = report["rescale_deviation"]
    # the guided rescale skips the rescale at steps 0 and 3: the outputs differ, but finitely
    assert 0 < dev["latents"]["max_abs"] < math.inf
    assert 0 <= dev["images_uint8"]["max_abs"] <= 255
    assert report["random_weights"] is True and "RANDOM WEIGHTS" in report["banner"]
    assert "RANDOM WEIGHTS" in markdown and "| fastface |" in markdown
    assert "| naive |" in stdout


def test_bad_variant_is_a_one_line_error():
    proc = subprocess.run(
        [sys.executable, "-m", "fastface.cli", "bench", "--variants", "fastface,turbo-naive"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown variant(s) turbo-naive")
    assert "Traceback" not in proc.stderr


def test_unknown_gpu_for_the_floor_fails_before_loading():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--gpu", "abacus"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown GPU 'abacus'")


def test_options_are_checked():
    with pytest.raises(ConfigError, match="repeats"):
        BenchOptions(repeats=0)
    with pytest.raises(ConfigError, match="speed option"):
        BenchOptions(compare_options=("turbo",))
    with pytest.raises(ConfigError, match="resolution"):
        BenchOptions(resolution=100)


def test_deviation_and_psnr_arithmetic():
    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 10  # one value off by 10 out of 96
    dev = deviation(a, b, peak=255.0)
    assert dev["max_abs"] == 10 and dev["mean_abs"] == pytest.approx(10 / 96)
    assert dev["psnr_db"] == pytest.approx(10 * math.log10(255**2 / (100 / 96)))
    assert psnr(a, a) == math.inf
    with pytest.raises(ConfigError):
        deviation(a, b[:1])


def test_am_overhead_compares_per_step_denoise_time():
    with_am = VariantResult("fastface", "", steps=4, evaluations=10, repeats=[{"denoise": 84.0}, {"denoise": 88.0}])
    without = VariantResult("dcg", "", steps=4, evaluations=10, repeats=[{"denoise": 80.0}, {"denoise": 80.0}])
    out = _am_overhead({"fastface": with_am, "dcg": without})["fastface_vs_dcg"]
    # medians 86 vs 80 over 4 steps
    assert out["fastface_ms_per_step"] == 21.5 and out["dcg_ms_per_step"] == 20.0
    assert out["overhead_percent"] == 7.5 and out["same_evaluations"]


def test_markdown_marks_failed_variants():
    report = {
        "banner": "RANDOM WEIGHTS: test", "machine": {"device": "cpu", "cpu": "x", "torch": "2"},
        "options": {"backbone": "tiny", "adapter": "faceid", "repeats": 1, "warmup": 0},
        "width": 64, "height": 64, "steps": 4, "dtype": "float32", "speed_options": [],
        "results": {
            "naive": VariantResult("naive", "", error="RuntimeError: boom", lora_state="unfused").summary(),
        },
        "ratios_vs_none": {}, "am_overhead": {}, "rescale_deviation": None, "floor": None,
    }
    text = format_markdown(report)
    assert "| naive | unfused | – | – | – | failed: RuntimeError: boom |" in text


def test_instantid_reports_its_controlnet_evaluations(tiny_dir):
    """InstantID adds one IdentityNet evaluation per UNet sample-evaluation: the bench reports both."""
    from fastface.bench import BenchOptions, format_markdown, run_benchmark

    options = BenchOptions(backbone="tiny", adapter="instantid", steps=4, repeats=1, warmup=0,
                           variants=("none", "fastface"), device="cpu")
    report = run_benchmark(options, log=lambda line: None)
    rows = report["results"]
    assert (rows["fastface"]["evaluations"], rows["fastface"]["controlnet_evaluations"]) == (10, 10)
    assert (rows["none"]["evaluations"], rows["none"]["controlnet_evaluations"]) == (4, 4)
    assert "| UNet evals | ControlNet evals |" in format_markdown(report)
