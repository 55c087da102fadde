"""Metrics and scoring on real files: tiny random CLIP and aesthetic head built from configs, the
real dlib and FaceNet encoders, a run folder holding real portraits and a face-less image."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval_helpers import make_aesthetic_head, make_tiny_clip
from fastface.errors import InputError
from fastface.evaluation import metrics as M
from fastface.evaluation.dataset import load_dataset, write_smoke_dataset
from fastface.evaluation.report import aggregate, bootstrap_ci
from fastface.evaluation.run import Grid, RunConfig, build_manifest, write_json_atomic
from fastface.evaluation.score import ScoreOptions, score_run


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return load_dataset(write_smoke_dataset(tmp_path_factory.mktemp("score") / "smoke").root)


def _add_sample(run_dir, ds, name, identity, prompt, image: np.ndarray) -> None:
    path = run_dir / "images" / f"{name}.png"
    Image.fromarray(image).save(path)
    record = {"sample": name, "identity": identity, "prompt_id": prompt.id, "split": prompt.split,
              "prompt": prompt.text, "style": prompt.style, "seed_index": 0, "seed": 1, "image": f"images/{path.name}",
              "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "wall_ms": 10.0,
              "unet_evaluations": 10, "peak_memory_mb": 100.0}
    write_json_atomic(run_dir / "records" / f"{name}.json", record)


@pytest.fixture()
def photo_run(tmp_path, smoke):
    """A run folder whose 'generated' images are a held-out portrait (a face) and noise (none)."""
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "records").mkdir()
    manifest = build_manifest(None, RunConfig(backbone="tiny"), Grid(), smoke, smoke.fingerprint(),
                              ["fastface", "eval", "run"], 2, 1)
    write_json_atomic(run_dir / "manifest.json", manifest)
    astronaut = smoke.identity("astronaut")
    face = np.asarray(Image.open(astronaut.photos[2]).convert("RGB"))
    ramp = np.linspace(40, 220, 128, dtype=np.float32)
    noise = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)  # a smooth gradient: no face
    _add_sample(run_dir, smoke, "face", "astronaut", smoke.prompts["stylistic"][0], face)
    _add_sample(run_dir, smoke, "noise", "astronaut", smoke.prompts["realistic"][0], noise)
    return run_dir


def test_identity_failures_counted_both_ways_and_cache(photo_run, smoke, clip_dir):
    options = ScoreOptions(metrics=("identity", "clip", "cost"), face_backends=("dlib", "facenet"),
                           clip_models=(str(clip_dir),))
    result = score_run(photo_run, options, progress=False)
    rows = {r["sample"]: r for r in result["samples"]}
    for enc in ("dlib", "facenet"):
        assert rows["face"][f"face_detected.{enc}"] == 1.0 and rows["noise"][f"face_detected.{enc}"] == 0.0
        sim = rows["face"][f"id.{enc}"]
        assert 0.5 < sim <= 1.0  # a crop of the same person, under a real face encoder
        assert rows["noise"][f"id.{enc}"] is None
        held = rows["face"][f"id_heldout.{enc}"]
        assert rows["face"][f"copy_paste.{enc}"] == pytest.approx(sim - held)
        stats = aggregate(result)["splits"]["all"][f"id.{enc}"]
        assert stats["failure_rate"] == 0.5 and stats["n_failed"] == 1
        assert stats["mean"] == pytest.approx(sim) and stats["mean_failures_as_zero"] == pytest.approx(sim / 2)
    assert "clip_style.tiny-clip" in rows["face"] and "clip_style.tiny-clip" not in rows["noise"]
    assert result["scored_now"] == 2

    # Cached: nothing to redo; a new sample is the only one scored; a changed image is rescored.
    assert score_run(photo_run, options, progress=False)["scored_now"] == 0
    grace = np.asarray(Image.open(smoke.identity("grace-hopper").photos[2]).convert("RGB"))
    _add_sample(photo_run, smoke, "grace", "grace-hopper", smoke.prompts["realistic"][1], grace)
    again = score_run(photo_run, options, progress=False)
    assert again["scored_now"] == 1 and len(again["samples"]) == 3
    assert {r["sample"]: r for r in again["samples"]}["face"] == rows["face"]


def test_missing_models_are_unavailable_not_zero(photo_run, tmp_path):
    options = ScoreOptions(metrics=("clip", "aesthetic", "image-reward", "disruption"),
                           clip_models=("openai/clip-vit-large-patch14",), aesthetic_head=str(tmp_path / "none.pth"))
    result = score_run(photo_run, options, progress=False)
    for key in ("clip_t.vit-l-14", "clip_style.vit-l-14", "aesthetic", "image_reward", "clip_i.vit-l-14"):
        assert result["metrics"][key]["status"] == "unavailable", key
        assert result["metrics"][key]["reason"]
        assert all(key not in row for row in result["samples"])
    assert "offline" in result["metrics"]["clip_t.vit-l-14"]["reason"]
    assert "reference run" in result["metrics"]["clip_i.vit-l-14"]["reason"]
    stats = aggregate(result)["splits"]["all"]
    assert stats["aesthetic"]["status"] == "unavailable"


def test_clip_scores_match_transformers(clip_dir):
    from transformers import CLIPModel

    clip = M.ClipModel(str(clip_dir), device="cpu")
    clip.load()
    image = np.random.default_rng(1).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    texts = ["a photo of a person", "oil painting"]
    ours = clip.image_embeds([image]) @ clip.text_embeds(texts).T
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokens = clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=clip.pixels([image]))
        expected = (out.logits_per_image / model.logit_scale.exp()).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert clip.pixels([image]).shape == (1, 3, 32, 32)


def test_aesthetic_head_is_the_linear_stack(clip_dir, tmp_path):
    head_path = make_aesthetic_head(tmp_path / "head.pth", width=16)
    clip = M.ClipModel(str(clip_dir), device="cpu")
    scorer = M.AestheticScorer(clip, str(head_path))
    scorer.load()
    image = np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    ctx = M.SampleContext("s", {"prompt": "x"}, image, ((), ()))
    value = scorer.score(ctx)["aesthetic"]
    state = torch.load(head_path, weights_only=True)
    x = torch.from_numpy(clip.image_embeds([image]))
    for key in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{key}.weight"].T + state[f"layers.{key}.bias"]
    assert value == pytest.approx(float(x[0, 0]), abs=1e-5)
    wrong = M.AestheticScorer(clip, str(make_aesthetic_head(tmp_path / "wide.pth", width=768)))
    with pytest.raises(M.Unavailable, match="768-d"):
        wrong.load()


def test_bootstrap_interval():
    values = [0.2, 0.4, 0.5, 0.9, 0.3]
    mean, low, high = bootstrap_ci(values, seed=3)
    assert mean == pytest.approx(np.mean(values)) and low < mean < high
    assert (low, high) == bootstrap_ci(values, seed=3)[1:]
    assert min(values) <= low and high <= max(values)
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    # Ten times the identities (same spread): a narrower interval.
    _, low10, high10 = bootstrap_ci(values * 10, seed=3)
    assert high10 - low10 < high - low


def test_score_refuses_an_identity_reference_run(photo_run):
    from fastface.errors import ConfigError

    with pytest.raises(ConfigError, match="without identity"):
        score_run(photo_run, ScoreOptions(metrics=("cost",), reference_run=photo_run), progress=False)
    records = json.loads((photo_run / "records" / "face.json").read_text())
    assert records["unet_evaluations"] == 10


def test_a_truncated_or_swapped_image_is_not_scored_and_its_cache_not_reused(photo_run, clip_dir):
    options = ScoreOptions(metrics=("clip", "cost"), clip_models=(str(clip_dir),))
    first = {r["sample"]: r for r in score_run(photo_run, options, progress=False)["samples"]}
    assert "clip_t.tiny-clip" in first["face"] and (photo_run / "scores" / "face.clip-tiny-clip.json").is_file()
    face = photo_run / "images" / "face.png"
    face.write_bytes(face.read_bytes()[:1000])  # truncated: the record's sha256 no longer matches
    again = score_run(photo_run, options, progress=False)
    assert [r["sample"] for r in again["samples"]] == ["noise"]  # the cached values of "face" are not used
    assert set(again["damaged"]) == {"face"} and "image differs from its record" in again["damaged"]["face"]
    (photo_run / "images" / "noise.png").rename(face)  # moved over: a whole image, of the wrong sample
    with pytest.raises(InputError, match="nothing to score: 2 damaged samples") as error:
        score_run(photo_run, options, progress=False)
    assert "records/face.json: image differs" in str(error.value) and "records/noise.json: image missing" in str(error.value)
