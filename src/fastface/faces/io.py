"""Reading photos into RGB uint8 arrays, whatever the user hands in.

Every failure a user can cause (missing file, directory, not an image, truncated file, absurd size)
becomes one :class:`~fastface.errors.InputError` line that names the file.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

ImageSource = str | Path | bytes | bytearray | np.ndarray | Image.Image

MAX_PIXELS = 100_000_000  # beyond this a "photo" is a decompression bomb or a mistake
DETECT_MAX_SIDE = 1600  # detectors see at most this longest side; crops come from the original
DETECT_MIN_SIDE = 160  # below this longest side the detection copy is upscaled to twice it

_WHITE = (255, 255, 255)


def describe(src: object) -> str:
    """How an image source is named in messages: the quoted path, or its kind."""
    if isinstance(src, (str, Path)):
        return f"'{src}'"
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {tuple(src.shape)} {src.dtype}>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.size[0]}x{src.size[1]}>"
    return f"<{type(src).__name__}>"


def load_image(src: ImageSource) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from a path, bytes, a numpy array or a PIL image.

    EXIF orientation is applied; alpha is composited on white; palette, grey, 1-bit, CMYK and
    other modes become RGB; 16-bit and float data are rescaled to 8 bits (16-bit by ``/257``,
    float in [0, 1] by ``*255``).
    """
    name = describe(src)
    if isinstance(src, np.ndarray):
        out = _from_array(src, name)
    elif isinstance(src, Image.Image):
        out = _from_pil(src, name)
    elif isinstance(src, (bytes, bytearray)):
        out = _open_and_convert(io.BytesIO(bytes(src)), name)
    elif isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        check_regular_file(path, name)
        out = _open_and_convert(path, name)
    else:
        raise InputError(f"cannot read an image from {name}: pass a path, bytes, a numpy array or a PIL image")
    _check_size(out.shape[1], out.shape[0], name)
    return out


_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_file_kind(mode: int) -> str | None:
    """What a non-regular, non-folder file is ("a FIFO (named pipe)", "a socket", ...), else None."""
    for test, kind in _SPECIAL_FILES:
        if test(mode):
            return kind
    return None


def check_regular_file(path: Path, name: str | None = None) -> None:
    """Refuse, without opening it, anything but a regular file: opening a FIFO blocks until a
    writer appears (forever, for a stray pipe), and a device reads without end."""
    name = name or f"'{path}'"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{name} does not exist") from None
    except NotADirectoryError:
        raise InputError(f"{name} does not exist (a parent is a file)") from None
    except PermissionError:
        raise InputError(f"{name} cannot be read (permission denied)") from None
    except OSError as exc:
        raise InputError(f"{name} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{name} is a directory, not an image")
    if not stat.S_ISREG(mode):
        raise InputError(f"{name} is {special_file_kind(mode) or 'not a regular file'}, not an image file")


def _check_size(width: int, height: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{name} is empty ({width}x{height} pixels)")
    if width * height > MAX_PIXELS:
        raise InputError(f"{name} is too large ({width}x{height} = {width * height / 1e6:.0f} MP, "
                         f"limit {MAX_PIXELS / 1e6:.0f} MP)")


def _open_and_convert(fp: Path | io.BytesIO, name: str) -> np.ndarray:
    # Pillow's own bomb guard would warn (or fail with a long message) before our size check.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as img:
                _check_size(img.size[0], img.size[1], name)
                img.load()
                return _from_pil(img, name)
        except UnidentifiedImageError:
            raise InputError(f"{name} is not an image (cannot identify image file)") from None
        except Image.DecompressionBombError:
            raise InputError(f"{name} is too large (limit {MAX_PIXELS / 1e6:.0f} MP)") from None
        except PermissionError:
            raise InputError(f"{name} cannot be read (permission denied)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{name} is unreadable or corrupt ({reason})") from None


def _from_pil(img: Image.Image, name: str) -> np.ndarray:
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return _from_array(np.asarray(img).astype(np.uint16), name)
    if mode in ("I", "F"):
        return _from_array(np.asarray(img), name)
    if mode == "P" or (mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")  # 1, L, CMYK (Adobe-inverted handled by Pillow), YCbCr, LAB, HSV
    return np.asarray(img, dtype=np.uint8).copy()


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first (C, H, W)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InputError(f"{name} is not an image array: expected (H, W), (H, W, 3) or (H, W, 4)")
    _check_size(a.shape[1], a.shape[0], name)
    a = _to_uint8(a, name)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = np.rint(a[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(a)


def _to_uint8(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        finite = a[np.isfinite(a)]
        if finite.size != a.size:
            raise InputError(f"{name} contains NaN or infinite values")
        lo, hi = float(finite.min()), float(finite.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(a * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.rint(a).astype(np.uint8)
        raise InputError(f"{name} has float values in [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]")
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise InputError(f"{name} has integer values in [{lo}, {hi}]; expected 8- or 16-bit data")
        if a.dtype.itemsize >= 2 and (a.dtype == np.uint16 or hi > 255):
            # 16-bit data (a uint16 array, or wider ints that use the 16-bit range): 65535 -> 255.
            return np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
        return a.astype(np.uint8)
    raise InputError(f"{name} has unsupported dtype {a.dtype}")


def detection_scale(width: int, height: int, max_side: int = DETECT_MAX_SIDE,
                    min_side: int = DETECT_MIN_SIDE) -> float:
    """The factor from original to detection-copy coordinates (1.0: detect on the original)."""
    longest = max(width, height)
    if longest > max_side:
        return max_side / longest
    if longest < min_side:
        return 2.0 * min_side / longest
    return 1.0


def resize(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` resized by ``factor``."""
    if factor == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    # BOX averages all source pixels when shrinking a lot (fast, no aliasing); LANCZOS otherwise.
    method = Image.Resampling.BICUBIC if factor > 1.0 else (
        Image.Resampling.LANCZOS if factor > 0.5 else Image.Resampling.BOX)
    return np.asarray(Image.fromarray(image).resize(size, method), dtype=np.uint8)


def pad(image: np.ndarray, ratio: float, value: int = 127) -> tuple[np.ndarray, int, int]:
    """``image`` inside a border of ``ratio`` times its size on each side; returns it and the offsets."""
    h, w = image.shape[:2]
    px, py = round(w * ratio), round(h * ratio)
    out = np.full((h + 2 * py, w + 2 * px, 3), value, dtype=np.uint8)
    out[py:py + h, px:px + w] = image
    return out, px, py
