
import numpy as np
import pytest
import skimage.data
from PIL import Image

from fastface.errors import InputError
from fastface.faces.io import detection_scale, load_image


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


def test_paths_bytes_arrays_and_pil_agree(tmp_path, astronaut):
    path = tmp_path / "a.png"
    Image.fromarray(astronaut).save(path)
    for src in (path, str(path), path.read_bytes(), astronaut, Image.fromarray(astronaut)):
        out = load_image(src)
        assert out.dtype == np.uint8 and out.shape == astronaut.shape
        assert np.array_equal(out, astronaut)


def test_exif_orientation_is_applied(tmp_path, astronaut):
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise to be viewed upright.
    stored = np.rot90(astronaut, k=1)  # counter-clockwise, as a sideways camera would store it
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=95, exif=exif)
    out = load_image(path)
    assert out.shape == astronaut.shape
    assert np.abs(out.astype(int) - astronaut.astype(int)).mean() < 6


def test_rgba_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    out = load_image(Image.fromarray(rgba, "RGBA"))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[7, 7].tolist() == [255, 255, 255]
    assert np.array_equal(load_image(rgba), out)


def test_grey_palette_one_bit_and_la(astronaut):
    grey = np.asarray(Image.fromarray(astronaut).convert("L"))
    assert np.array_equal(load_image(grey)[..., 1], grey)
    pal = Image.fromarray(astronaut).convert("P")
    assert np.abs(load_image(pal).astype(int) - np.asarray(pal.convert("RGB")).astype(int)).max() == 0
    one = Image.fromarray(grey).convert("1")
    assert set(np.unique(load_image(one))) <= {0, 255}
    la = Image.fromarray(grey).convert("LA")
    assert np.array_equal(load_image(la)[..., 0], grey)


def test_cmyk_jpeg(tmp_path, astronaut):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(astronaut).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.shape == astronaut.shape
    assert np.abs(out.astype(int) - astronaut.astype(int)).mean() < 8


def test_sixteen_bit_png_and_float_arrays(tmp_path, astronaut):
    grey = np.asarray(Image.fromarray(astronaut).convert("L"))
    wide = grey.astype(np.uint16) * 257
    path = tmp_path / "g16.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.array_equal(load_image(path)[..., 0], grey)
    assert np.array_equal(load_image(wide)[..., 2], grey)
    assert np.array_equal(load_image(astronaut / 255.0), astronaut)
    assert np.array_equal(load_image(np.moveaxis(astronaut, -1, 0)), astronaut)
    with pytest.raises(InputError, match="float values"):
        load_image(astronaut.astype(np.float32) * 3)


def test_bad_files_give_one_line_naming_the_file(tmp_path, astronaut):
    text = tmp_path / "x.txt"
    text.write_text("not a picture")
    with pytest.raises(InputError) as info:
        load_image(text)
    assert str(info.value) == f"'{text}' is not an image (cannot identify image file)"

    good = tmp_path / "a.jpg"
    Image.fromarray(astronaut).save(good)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:3000])
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    for path in (truncated, corrupt, tmp_path / "missing.png", tmp_path):
        with pytest.raises(InputError) as info:
            load_image(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message


def test_absurd_sizes(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    # A PNG header claiming 20000 x 20000 pixels: refused from the header, before decoding.
    big = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(big)
    with pytest.raises(InputError, match="too large"):
        load_image(big)


def test_detection_scale_bounds():
    assert detection_scale(6000, 4000) == pytest.approx(1600 / 6000)
    assert detection_scale(64, 64) == pytest.approx(5.0)
    assert detection_scale(512, 512) == 1.0
