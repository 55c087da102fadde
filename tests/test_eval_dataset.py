"""Evaluation datasets: the smoke set, both layouts, validation, seeds and the grid."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from eval_helpers import fastface_cli
from fastface.errors import ConfigError
from fastface.evaluation.dataset import check_dataset, load_dataset, write_smoke_dataset
from fastface.evaluation.run import Grid, derive_seed, shard, work_units


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return write_smoke_dataset(tmp_path_factory.mktemp("smoke") / "ds").root


def test_dataset_init_and_check_cli(tmp_path):
    target = tmp_path / "smoke"
    init = fastface_cli("eval", "dataset", "init", str(target))
    assert init.returncode == 0, init.stderr
    check = fastface_cli("eval", "dataset", "check", str(target), "--no-progress")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip().endswith("ok")
    again = fastface_cli("eval", "dataset", "init", str(target))
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "not empty" in again.stderr


def test_smoke_set_content(smoke):
    ds = load_dataset(smoke)
    assert ds.issues == []
    assert [e.id for e in ds.identities] == ["astronaut", "grace-hopper"]
    assert all(len(e.photos) == 3 for e in ds.identities)
    assert len(ds.prompts["realistic"]) >= 30 and len(ds.prompts["stylistic"]) >= 30
    assert all(p.style and p.content and p.style in p.text and p.content in p.text for p in ds.prompts["stylistic"])
    assert all(p.style is None for p in ds.prompts["realistic"])
    texts = [p.text for split in ds.prompts.values() for p in split]
    assert len(set(texts)) == len(texts)
    conditioning, held_out = ds.identities[0].split_photos(1)
    assert len(conditioning) == 1 and len(held_out) == 2


def test_paper_layout_reads_as_is(smoke, tmp_path):
    ds = load_dataset(smoke)
    paper = tmp_path / "paper"
    (paper / "id_photos").mkdir(parents=True)
    for entry in ds.identities:
        shutil.copy(entry.photos[0], paper / "id_photos" / f"{entry.id}.png")
    (paper / "prompts_nostyle.txt").write_text("\n".join(p.text for p in ds.prompts["realistic"]) + "\n")
    (paper / "prompts_style.txt").write_text(
        "\n".join(f"{p.style}; {p.content}" for p in ds.prompts["stylistic"]) + "\n")
    read = load_dataset(paper)
    assert read.layout == "paper" and read.issues == []
    assert [(e.id, len(e.photos)) for e in read.identities] == [("astronaut", 1), ("grace-hopper", 1)]
    assert read.prompts == ds.prompts
    # Same photos and prompts in the other layout give the same fingerprint.
    same = tmp_path / "same"
    for entry in ds.identities:
        (same / "identities" / entry.id).mkdir(parents=True)
        shutil.copy(entry.photos[0], same / "identities" / entry.id / f"{entry.id}.png")
    (same / "prompts").mkdir()
    shutil.copy(smoke / "prompts" / "realistic.txt", same / "prompts" / "realistic.txt")
    shutil.copy(smoke / "prompts" / "stylistic.txt", same / "prompts" / "stylistic.txt")
    assert load_dataset(same).fingerprint() == read.fingerprint() != ds.fingerprint()


def test_check_lists_every_problem(smoke, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(smoke, bad)
    (bad / "identities" / "grace-hopper" / "04-broken.png").write_bytes(b"not an image at all")
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(bad / "identities" / "grace-hopper" / "04-noise.png")
    (bad / "identities" / "Grace Hopper").mkdir()  # id Grace_Hopper: no clash with grace-hopper
    shutil.copy(smoke / "identities" / "astronaut" / "01-portrait.png", bad / "identities" / "Grace Hopper" / "a.png")
    (bad / "identities" / "ASTRONAUT").mkdir()  # clashes with astronaut (ids are case-insensitive)
    shutil.copy(smoke / "identities" / "grace-hopper" / "03-close.png", bad / "identities" / "ASTRONAUT" / "b.png")
    (bad / "prompts" / "stylistic.txt").write_text("# nothing here\n\n")
    _, problems = check_dataset(bad, progress=False)
    text = "\n".join(problems)
    assert "04-broken.png: unreadable photo" in text
    assert "04-noise.png: no face found" in text
    assert "duplicate identity id 'astronaut'" in text
    assert "the stylistic split is empty" in text
    assert "the same file is also a photo of identity" in text  # Grace Hopper/a.png is the astronaut's photo

    result = fastface_cli("eval", "dataset", "check", str(bad), "--no-progress")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    listed = [line for line in result.stdout.splitlines() if line.strip().startswith("problem:")]
    assert len(listed) == len(problems)


def test_seeds_are_a_function_of_the_sample_alone(smoke):
    ds = load_dataset(smoke)
    small = work_units(ds, Grid(seeds=2, split="all", limit=2), batch_size=1)
    large = work_units(ds, Grid(seeds=4, split="all", limit=5), batch_size=2)
    seeds_small = {s.id: s.seed for u in small for s in u}
    seeds_large = {s.id: s.seed for u in large for s in u}
    assert len(seeds_small) == 2 * 4 * 2 and len(seeds_large) == 2 * 10 * 4
    assert all(seeds_large[k] == v for k, v in seeds_small.items())
    assert len(set(seeds_large.values())) == len(seeds_large)
    assert all(0 <= s < 2**31 for s in seeds_large.values())
    assert derive_seed("astronaut", "realistic-000", 0) != derive_seed("astronaut", "realistic-000", 1)
    # Chunks of seeds are fixed by seed index: the first chunk is {0, 1} whatever the seed count.
    assert [s.seed_index for s in large[0]] == [0, 1]
    # Rank shares are disjoint and cover the grid.
    parts = [shard(large, r, 3) for r in range(3)]
    ids = [s.id for part in parts for u in part for s in u]
    assert sorted(ids) == sorted(seeds_large)


def test_grid_rejects_bad_values(smoke):
    with pytest.raises(ConfigError, match="--seeds"):
        Grid(seeds=0)
    with pytest.raises(ConfigError, match="split"):
        load_dataset(smoke).select_prompts("cartoon")
