"""A real uvicorn server on 127.0.0.1 (a thread of the test process) and crafted bad uploads."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image


@contextmanager
def running_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def png_header_only(width: int, height: int, mode: str = "bomb") -> bytes:
    """A valid PNG of ``width`` x ``height`` black 1-bit pixels: tiny on disk, huge decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(min(height, 64))) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def image_of(payload: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["png_base64"]))).convert("RGB")).astype(int)


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """Equal images: identical up to float rounding of batched matrix products (at most 1/255 at a
    few pixels), far below the difference between two seeds."""
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 1, f"images differ by up to {diff.max()} grey levels"
    assert (diff > 0).mean() < 0.02, f"{(diff > 0).mean():.1%} of the values differ"
