"""The HTTP API against a real uvicorn server on 127.0.0.1, tiny models, real face analysis."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_helpers import assert_same_image, image_of, png_header_only, running_server  # noqa: E402

PORTRAIT = Path(__file__).resolve().parents[1] / "src" / "fastface" / "data" / "portrait.jpg"
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tiny_dir):
    from fastface.serve.app import ServerSettings, create_app
    from fastface.serve.engine import Engine, ServeLimits

    limits = ServeLimits(max_upload_bytes=2 * 2**20, max_pixels=20_000_000, queue_images=16, max_batch_images=16,
                         batch_wait_ms=20, max_images=8, max_steps=20, max_size=256, timeout_s=120)
    engine = Engine([("tiny", "faceid")], limits=limits, device="cpu")
    app = create_app(engine, ServerSettings(token=TOKEN))
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def identity_id(client):
    response = client.post("/v1/identities", files=[("photos", ("me.jpg", PORTRAIT.read_bytes(), "image/jpeg"))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["backend"] == "dlib" and body["embedding_dim"] == 128
    [photo] = body["photos"]
    assert len(photo["faces"]) == 1 and photo["chosen"] == 0
    x0, y0, x1, y1 = photo["faces"][0]["bbox"]
    assert 0 <= x0 < x1 and 0 <= y0 < y1
    return body["identity_id"]


def _generate(client, identity_id, **fields):
    body = {"identity_id": identity_id, "prompt": "a portrait", **fields}
    return client.post("/v1/generate", json=body)


def _serving(client, identity_id) -> None:
    """The server still answers; it still generates is checked once, after every refusal (last test)."""
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/v1/presets").status_code == 200


def test_sixteen_concurrent_clients_get_the_images_they_get_alone(server, client, identity_id):
    url, app = server
    # Two batch keys (methods): compatible requests merge, the others wait for their own call.
    requests = [{"prompt": f"portrait number {i}, style {i % 3}", "seed": 1000 + 37 * i,
                 "method": "dcg" if i % 4 == 3 else "fastface"} for i in range(16)]
    before = app.state.batcher.stats()

    def call(fields):
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
            response = _generate(c, identity_id, **fields)
        assert response.status_code == 200, response.text
        return response.json()["images"]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(call, requests))
    during = app.state.batcher.stats()
    alone = [call(fields) for fields in requests]  # one after the other: each request its own call
    after = app.state.batcher.stats()

    calls = during["batches"] - before["batches"]
    assert during["batched_requests"] - before["batched_requests"] == 16
    assert calls < 16, "concurrent compatible requests were not merged into batched calls"
    assert after["batches"] - during["batches"] == 16
    for fields, [got], [ref] in zip(requests, together, alone):
        assert got["metadata"]["seed"] == ref["metadata"]["seed"] == fields["seed"]
        assert got["metadata"]["prompt"] == fields["prompt"]
        assert got["metadata"]["method"] == ref["metadata"]["method"] == fields["method"]
        assert_same_image(image_of(got), image_of(ref))
    assert max(got[0]["metadata"]["batch"]["requests"] for got in together) > 1
    # seeds and prompts really change the picture: the equality above is not trivial
    assert np.abs(image_of(together[0][0]) - image_of(together[1][0])).mean() > 5


def test_several_images_png_format_async_jobs(client, identity_id):
    many = _generate(client, identity_id, prompt=["a", "b"], num_images=2, seed=40)
    assert many.status_code == 200
    images = many.json()["images"]
    assert [m["metadata"]["seed"] for m in images] == [40, 41, 42, 43]
    assert [m["metadata"]["prompt"] for m in images] == ["a", "a", "b", "b"]

    png = _generate(client, identity_id, prompt="b", seed=42, response_format="png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    import io

    from PIL import Image

    assert_same_image(np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).astype(int), image_of(images[2]))
    assert _generate(client, identity_id, num_images=2, response_format="png").json()["error"]["field"] == (
        "response_format")

    queued = _generate(client, identity_id, prompt="b", seed=42, **{"async": True})
    assert queued.status_code == 202
    job_url = queued.json()["status_url"]
    for _ in range(600):
        state = client.get(job_url).json()
        if state["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert state["status"] == "done", state
    assert_same_image(image_of(state["images"][0]), image_of(images[2]))


def test_inline_photos_equal_the_identity_id(client, identity_id):
    inline = client.post("/v1/generate", json={
        "photos": [base64.b64encode(PORTRAIT.read_bytes()).decode()], "prompt": "a portrait", "seed": 3})
    by_id = _generate(client, identity_id, seed=3)
    assert inline.status_code == 200, inline.text
    assert inline.json()["identity_id"] == identity_id  # the same photo is the same identity
    assert_same_image(image_of(inline.json()["images"][0]), image_of(by_id.json()["images"][0]))


@pytest.mark.parametrize(
    "name, data, status",
    [
        ("text.jpg", b"this is not an image at all", 415),
        ("truncated.jpg", PORTRAIT.read_bytes()[:3000], 400),
        ("bomb.png", png_header_only(40_000, 40_000), 413),  # 1.6 gigapixels in a few kB
        ("100mp.png", png_header_only(10_000, 10_000), 413),
        ("huge.bin", b"\xff" * (2 * 2**20 + 10), 413),
        ("empty.jpg", b"", 400),
    ],
)
def test_bad_uploads_are_refused_and_the_server_keeps_serving(client, identity_id, name, data, status):
    response = client.post("/v1/identities", files=[("photos", (name, data, "image/jpeg"))])
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == "photos" and error["status"] == status and "\n" not in error["message"]
    _serving(client, identity_id)


def test_a_cat_has_no_face(client, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buffer, format="JPEG")
    response = client.post("/v1/identities", files=[("photos", ("cat.jpg", buffer.getvalue(), "image/jpeg"))])
    assert response.status_code == 422
    assert response.json()["error"] == {
        "field": "photos", "status": 422,
        "message": "no face found in photo 1; use a photo with a clearly visible face"}


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1000}, "steps"),
        ({"height": 60}, "height"),
        ({"width": 4096}, "width"),
        ({"num_images": 100}, "num_images"),
        ({"ip_scale": -1}, "ip_scale"),
        ({"seed": -1}, "seed"),
        ({"alpha": [1.0, 2.0]}, "alpha"),  # 2 values for 4 steps
        ({"rescale": 3}, "rescale"),
        ({"backbone": "no-such-backbone"}, "backbone"),
        ({"backbone": "hyper-4"}, "backbone"),  # a real backbone, not served here
        ({"adapter": "no-such-adapter"}, "adapter"),
        ({"method": "no-such-method"}, "method"),
        ({"method": "dcg", "am_scale_down": 1.2}, "am_scale_down"),
        ({"steps": "many"}, "steps"),
        ({"colour": "blue"}, "colour"),
        ({"identity_id": "../../etc/passwd"}, "identity_id"),
        ({"identity_id": "0" * 32}, "identity_id"),
        ({"lora_scale": 0.5}, "lora_scale"),  # LoRAs merged at 1
    ],
)
def test_out_of_range_and_unknown_values_name_the_field(client, identity_id, fields, field):
    response = client.post("/v1/generate", json={"identity_id": identity_id, "prompt": "a portrait", **fields})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["field"] == field, response.text
    _serving(client, identity_id)


def test_token_is_required(server, identity_id, client):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        assert anonymous.post("/v1/generate", json={"prompt": "x", "identity_id": identity_id}).status_code == 401
        wrong = anonymous.get("/v1/presets", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["field"] == "authorization"
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/docs").status_code == 200
        paths = anonymous.get("/openapi.json").json()["paths"]
    assert {"/v1/identities", "/v1/generate", "/v1/jobs/{job_id}", "/v1/presets", "/healthz", "/metrics"} <= set(paths)
    _serving(client, identity_id)


def test_presets_and_metrics(client):
    presets = client.get("/v1/presets").json()
    assert presets["served"] == [{"backbone": "tiny", "adapter": "faceid"}]
    assert {"photo", "cinematic", "watercolour", "anime", "oil painting", "comic"} <= {s["name"] for s in presets["styles"]}
    assert "fastface" in {m["name"] for m in presets["methods"]}
    assert client.get("/v1/jobs/" + "../etc").status_code == 404
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'fastface_requests_total{path="/v1/generate",status="200"}' in text
    assert "# TYPE fastface_batches_total counter" in text


def test_a_full_queue_answers_429_with_retry_after(server, client, identity_id):
    url, _ = server

    def call(_):
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
            return _generate(c, identity_id, num_images=8, seed=1)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(call, range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and 200 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    _serving(client, identity_id)


def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastface.cli", "serve", "--host", "0.0.0.0", "--model", "tiny:faceid"],
        capture_output=True, text=True, timeout=60, env={**_env(), "FASTFACE_TOKEN": ""},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: refusing to listen on 0.0.0.0 without a token: set FASTFACE_TOKEN (or --token), or listen on 127.0.0.1"]


def _env() -> dict[str, str]:
    import os

    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_still_generates_after_every_refusal(server, client, identity_id):
    _, app = server
    response = _generate(client, identity_id, seed=5)
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["metadata"]["seed"] == 5
    assert app.state.batcher.stats()["queue_images"] == 0
