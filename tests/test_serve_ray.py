"""The HTTP API as a Ray Serve application: 2 CPU replicas on loopback give the single process's images."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from serve_helpers import assert_same_image, image_of  # noqa: E402

PORTRAIT = Path(__file__).resolve().parents[1] / "src" / "fastface" / "data" / "portrait.jpg"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tiny_dir):
    from fastface.serve import ray_app
    from fastface.serve.engine import ServeLimits

    options = {"models": [("tiny", "faceid")], "limits": ServeLimits(), "device": "cpu", "dtype": None,
               "fuse_loras": True, "token": None, "batching": True}
    # A 2-core machine: a fraction of a CPU per replica, one torch thread each.
    url = ray_app.start(options, host="127.0.0.1", port=_free_port(), replicas=2, replica_cpus=0.5, num_cpus=2,
                        torch_threads=1)
    try:
        yield url
    finally:
        ray_app.stop()


def test_two_replicas_give_the_single_process_images(ray_url, tiny_dir):
    from fastface.serve.engine import Engine, GenerationRequest, ServeLimits, Work, decode_photo

    with httpx.Client(base_url=ray_url, timeout=300) as client:
        created = client.post("/v1/identities",
                              files=[("photos", ("me.jpg", PORTRAIT.read_bytes(), "image/jpeg"))])
        assert created.status_code == 200, created.text
        identity_id = created.json()["identity_id"]
        requests = [{"prompt": f"portrait {i}", "seed": 500 + i} for i in range(12)]

        def call(fields):
            with httpx.Client(base_url=ray_url, timeout=300) as c:
                response = c.post("/v1/generate", json={"identity_id": identity_id, **fields})
            assert response.status_code == 200, response.text
            return response.headers["x-fastface-process"], response.json()["images"][0]

        with ThreadPoolExecutor(12) as pool:
            served = list(pool.map(call, requests))
        # the identity made on one replica is found by the other: both answered
        assert len({process for process, _ in served}) == 2
        bad = client.post("/v1/generate", json={"identity_id": identity_id, "prompt": "x", "steps": 0})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "steps"

    engine = Engine([("tiny", "faceid")], device="cpu")
    record = engine.analyze([decode_photo(PORTRAIT.read_bytes(), ServeLimits())], "dlib")
    assert record.id == identity_id
    for fields, (_, got) in zip(requests, served):
        valid = engine.validate(GenerationRequest(prompts=(fields["prompt"],), seed=fields["seed"]))
        [[alone]] = engine.run_batch([Work(valid, record)])
        assert got["metadata"]["seed"] == fields["seed"]
        assert_same_image(image_of(got), np.asarray(alone.image).astype(int))
