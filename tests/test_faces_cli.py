import json
import os
import subprocess
import sys

import matplotlib.cbook
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
    assert float(lines["dlib"]) > 0.95 and float(lines["facenet"]) > 0.85
    assert lines["arcface"].startswith("unavailable (") or float(lines["arcface"]) > 0.5
    different = fastface("faces", "compare", "astronaut.png", "hopper.jpg", "--backend", "facenet", cwd=photos)
    assert different.returncode == 0, different.stderr
    assert float(different.stdout.split(": ")[1]) < 0.5


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
