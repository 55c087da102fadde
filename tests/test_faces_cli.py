import json
import os
import subprocess
import sys

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image


def fastface(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FASTFACE_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "fastface.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skimage.data.astronaut()[:, ::-1]).save(folder / "flipped.jpg", quality=90)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        (folder / "hopper.jpg").write_bytes(fh.read())
    Image.fromarray(skimage.data.chelsea()).save(folder / "cat.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_inspect_prints_json_and_draws(photos):
    result = fastface("faces", "inspect", "astronaut.png", "cat.png", "--out", "drawn", cwd=photos)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    astronaut, cat = report["images"]
    assert report["backend"] == "dlib" and astronaut["chosen"] == 0 and cat["faces"] == []
    assert cat["result"] == "no face found" and astronaut["result"] == "1 face(s) found"
    assert "cat.png: no face found under dlib" in result.stderr
    # ... and on the picture: a red band with white text across the top.
    cat_png = Image.open(photos / "drawn" / "cat_faces.png").convert("RGB")
    band = np.asarray(cat_png)[:8, :, :].reshape(-1, 3)
    assert (np.abs(band.astype(int) - (200, 30, 30)).sum(axis=1) < 10).mean() > 0.5
    assert (np.asarray(cat_png)[:40].min(axis=2) > 240).any()
    face = astronaut["faces"][0]
    assert face["embedding_dim"] == 128 and face["embedding_norm"] == pytest.approx(1.0, abs=1e-3)
    assert len(face["keypoints"]) == 5 and 0 < face["score"] <= 1
    drawn = Image.open(photos / astronaut["drawing"])
    assert drawn.size == (512, 512)
    assert (photos / "drawn" / "cat_faces.png").is_file()
    # The chosen face's box is drawn in green on its top edge.
    x0, y0, x1, _ = (round(v) for v in face["bbox"])
    r, g, b = drawn.convert("RGB").getpixel(((x0 + x1) // 2, y0))
    assert g > 150 and r < 100


def test_compare_prints_one_line_per_backend(photos):
    result = fastface("faces", "compare", "astronaut.png", "flipped.jpg", cwd=photos)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    dlib, facenet = float(lines["dlib"].split()[0]), float(lines["facenet"].split()[0])
    assert dlib > 0.95 and facenet > 0.85
    assert lines["dlib"].endswith(f"same person: yes ({dlib:.4f} ≥ 0.92)")
    assert lines["facenet"].endswith(f"same person: yes ({facenet:.4f} ≥ 0.50)")
    assert lines["arcface"].startswith("unavailable (") or float(lines["arcface"].split()[0]) > 0.5
    if lines["arcface"].startswith("unavailable ("):  # in CLI terms, with the one command that fixes it
        assert "fastface download --face-pack buffalo_l" in lines["arcface"] and "model_dir=" not in lines["arcface"]
    different = fastface("faces", "compare", "astronaut.png", "hopper.jpg", "--backend", "facenet", cwd=photos)
    assert different.returncode == 0, different.stderr
    similarity = float(different.stdout.split(": ")[1].split()[0])
    assert similarity < 0.5 and different.stdout.strip().endswith(f"same person: no ({similarity:.4f} < 0.50)")


def test_embed_writes_an_identity_file_that_generate_takes(photos):
    result = fastface("faces", "embed", "astronaut.png", "flipped.jpg", "--backend", "dlib", "--out", "id.npy",
                      cwd=photos)
    assert result.returncode == 0, result.stderr
    rows = np.load(photos / "id.npy")
    assert rows.shape == (2, 128) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-4)
    again = fastface("faces", "embed", "astronaut.png", "--backend", "dlib", "--out", "id.npy", cwd=photos)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    assert np.array_equal(np.load(photos / "id.npy"), rows)  # the first file is kept
    st = fastface("faces", "embed", "astronaut.png", "--backend", "dlib", "--out", "id.safetensors", cwd=photos)
    assert st.returncode == 0, st.stderr
    from fastface.faces import load_embedding

    loaded = load_embedding(photos / "id.safetensors")
    assert loaded.backend == "dlib" and np.allclose(loaded.embeddings[0], rows[0], atol=1e-5)
    # generate takes it (the tiny adapter is trained on 128-d dlib embeddings); a wrong size is one line.
    wrong = fastface("generate", "--face", "id.npy", "--prompt", "p", "--backbone", "hyper-4", "--out", "o",
                     cwd=photos)
    assert wrong.returncode == 2
    assert "the faceid adapter expects 512-d face embeddings, got 128-d (from external)" in wrong.stderr
    assert not (photos / "o").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("faces", "inspect", "notes.txt"), "error: 'notes.txt' is not an image (cannot identify image file)"),
    (("faces", "compare", "astronaut.png", "cat.png", "--backend", "dlib"),
     "error: no face found in 'cat.png' under dlib"),
    (("faces", "inspect", "astronaut.png", "--backend", "nope"), "error: unknown face backend 'nope'"),
])
def test_user_errors_are_one_line_exit_2(photos, args, message):
    result = fastface(*args, cwd=photos)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message)
