"""The HTTP API: FastAPI on the engine and the micro-batcher (OpenAPI docs at ``/docs``).

Endpoints: ``POST /v1/identities`` (photos -> identity id), ``POST /v1/generate`` (identity id or
inline photos -> PNG or base64 + metadata; ``"async": true`` -> 202 + ``GET /v1/jobs/{id}``),
``GET /v1/presets``, ``GET /healthz``, ``GET /metrics`` (Prometheus text).

Every refusal is a JSON body ``{"error": {"field": ..., "message": ..., "status": ...}}`` with a
4xx status; an exception inside a generation fails that request only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import FastFaceError
from ..presets import DEFAULT_IP_SCALE, DEFAULT_LORA_SCALE, DEFAULT_METHOD
from .batching import Closed, MicroBatcher, QueueFull
from .engine import (
    ID_PATTERN,
    Engine,
    GenerationRequest,
    LRUStore,
    RequestError,
    Work,
    decode_photo,
    error_text,
    field_of,
    png_bytes,
)

log = logging.getLogger("fastface.serve")


@dataclass(frozen=True)
class ServerSettings:
    """How the app behaves: auth, batching, and where jobs live (shared under Ray)."""

    token: str | None = None
    batching: bool = True


class GenerateBody(BaseModel):
    """``POST /v1/generate``: one identity (``identity_id`` or inline ``photos``), prompt(s), settings."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str | list[str] = Field(..., description="a prompt or a list of prompts")
    negative_prompt: str | None = None
    identity_id: str | None = Field(None, description="from POST /v1/identities")
    photos: list[str] | None = Field(None, description="inline face photos, base64 (instead of identity_id)")
    select: str | int = Field("largest", description="which face of a photo: largest, confidence or an index")
    backbone: str | None = Field(None, description="default: the first served backbone")
    adapter: str | None = None
    method: str = DEFAULT_METHOD
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    num_images: int = Field(1, description="images per prompt")
    seed: int | None = Field(0, description="seed of the first image (image i: seed+i); null = random")
    ip_scale: float = DEFAULT_IP_SCALE
    lora_scale: float = DEFAULT_LORA_SCALE
    alpha: float | list[float] | None = None
    beta: float | list[float] | None = None
    rescale: float | None = None
    am_scale_down: float | None = None
    am_scale_up: float | None = None
    am_power: float | None = None
    response_format: Literal["json", "png"] = Field("json", description="png: the image itself (one image only)")
    run_async: bool = Field(False, alias="async", description="202 + a job id to poll at /v1/jobs/{id}")

    def to_request(self) -> GenerationRequest:
        prompts = (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)
        return GenerationRequest(
            prompts=prompts, negative_prompt=self.negative_prompt, backbone=self.backbone, adapter=self.adapter,
            method=self.method, steps=self.steps, height=self.height, width=self.width,
            num_images=self.num_images, seed=self.seed, ip_scale=self.ip_scale, lora_scale=self.lora_scale,
            alpha=tuple(self.alpha) if isinstance(self.alpha, list) else self.alpha,
            beta=tuple(self.beta) if isinstance(self.beta, list) else self.beta,
            rescale=self.rescale, am_scale_down=self.am_scale_down, am_scale_up=self.am_scale_up,
            am_power=self.am_power,
        )


def _error(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message, "status": status}}, status, headers=headers)


class Metrics:
    """Counters of one app (no global registry), rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.images = 0
        self.latency_sum = 0.0
        self.latency_count = 0

    def count(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def generated(self, images: int, seconds: float) -> None:
        with self._lock:
            self.images += images
            self.latency_sum += seconds
            self.latency_count += 1

    def render(self, batcher: MicroBatcher) -> str:
        stats = batcher.stats()
        lines = [
            "# HELP fastface_requests_total HTTP requests by path and status.",
            "# TYPE fastface_requests_total counter",
        ]
        with self._lock:
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'fastface_requests_total{{path="{path}",status="{status}"}} {n}')
            lines += [
                "# HELP fastface_images_total Images generated.",
                "# TYPE fastface_images_total counter",
                f"fastface_images_total {self.images}",
                "# HELP fastface_generate_seconds Time from accepting a generate request to its images.",
                "# TYPE fastface_generate_seconds summary",
                f"fastface_generate_seconds_sum {self.latency_sum:.6f}",
                f"fastface_generate_seconds_count {self.latency_count}",
            ]
        lines += [
            "# HELP fastface_queue_images Images waiting in the queue.",
            "# TYPE fastface_queue_images gauge",
            f"fastface_queue_images {stats['queue_images']}",
            "# HELP fastface_batches_total Pipeline calls (each may serve several requests).",
            "# TYPE fastface_batches_total counter",
            f"fastface_batches_total {stats['batches']}",
            "# HELP fastface_batched_requests_total Requests served by those calls.",
            "# TYPE fastface_batched_requests_total counter",
            f"fastface_batched_requests_total {stats['batched_requests']}",
            "# HELP fastface_busy_seconds_total Seconds the worker spent in pipeline calls.",
            "# TYPE fastface_busy_seconds_total counter",
            f"fastface_busy_seconds_total {stats['busy_seconds']:.6f}",
        ]
        return "\n".join(lines) + "\n"


def _encode_images(images: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"png_base64": base64.b64encode(png_bytes(g.image, g.metadata)).decode("ascii"), "metadata": g.metadata}
        for g in images
    ]


def create_app(
    engine: Engine,
    settings: ServerSettings | None = None,
    *,
    jobs: Any = None,
    preload: bool = True,
) -> FastAPI:
    """The API on ``engine``; ``jobs``: a put/get store for async jobs (shared between Ray replicas)."""
    settings = settings or ServerSettings()
    limits = engine.limits
    if preload:
        engine.preload()  # models load once per process, before the first request
    batcher = MicroBatcher(
        engine.run_batch, max_batch_images=limits.max_batch_images, wait_s=limits.batch_wait_ms / 1000,
        queue_images=limits.queue_images, enabled=settings.batching,
    )
    jobs = jobs if jobs is not None else LRUStore(limits.max_jobs)
    metrics = Metrics()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(
        title="FastFace", version=__version__, lifespan=lifespan,
        description="Identity-preserving image generation on few-step SDXL. Errors: "
                    '`{"error": {"field", "message", "status"}}`.',
    )
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.metrics = metrics

    @app.middleware("http")
    async def count_and_cap(request: Request, call_next: Any) -> Response:
        # Refuse oversized bodies before they are read (photos are checked one by one later).
        length = request.headers.get("content-length")
        cap = limits.max_photos * limits.max_upload_bytes * 4 // 3 + 2**20
        if length is not None and length.isdigit() and int(length) > cap:
            response: Response = _error(413, "photos", f"request body of {length} bytes; the limit is {cap}")
        else:
            try:
                response = await call_next(request)
            except Exception:  # a bug, not the client's fault: one 500, the server goes on
                log.exception("unhandled error")
                response = _error(500, None, "internal server error")
        route = request.scope.get("route")
        metrics.count(getattr(route, "path", "unmatched"), response.status_code)
        response.headers["X-FastFace-Process"] = str(os.getpid())  # which replica answered (Ray Serve)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        field = loc[0] if loc else None
        return _error(422, field, f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(RequestError)
    async def refused(_request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.field, str(exc))

    def check_token(request: Request) -> None:
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.token.encode()):
            raise RequestError("authorization", "missing or wrong bearer token", 401)

    auth = [Depends(check_token)]

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "loaded": [list(p) for p in engine.loaded()],
                "queue_images": batcher.stats()["queue_images"]}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse, dependencies=auth)
    async def prometheus() -> str:
        return metrics.render(batcher)

    @app.get("/v1/presets", tags=["generation"], dependencies=auth)
    async def presets() -> dict[str, Any]:
        from ..commands import presets_table
        from .styles import STYLES

        table = presets_table()
        table["served"] = [{"backbone": b, "adapter": a} for b, a in (engine.served or [])]
        table["styles"] = [{"name": k, "template": v} for k, v in STYLES.items()]
        table["limits"] = {k: getattr(limits, k) for k in limits.__dataclass_fields__}
        return table

    async def _decode_all(raw: Sequence[tuple[str, bytes]]) -> list[Any]:
        return [await run_in_threadpool(decode_photo, data, limits, name) for name, data in raw]

    async def _identity(raw: Sequence[tuple[str, bytes]], backbone: str | None, adapter: str | None,
                        select: str | int) -> Any:
        if not raw:
            raise RequestError("photos", "give at least one photo")
        if len(raw) > limits.max_photos:
            raise RequestError("photos", f"at most {limits.max_photos} photos, got {len(raw)}")
        photos = await _decode_all(raw)
        backend = engine.face_backend_for(backbone, adapter)
        return await run_in_threadpool(engine.analyze, photos, backend, select, [name for name, _ in raw])

    def _parse_select(select: str | int) -> str | int:
        if isinstance(select, str) and select.lstrip("-").isdigit():
            return int(select)
        return select

    @app.post("/v1/identities", tags=["generation"], dependencies=auth)
    async def identities(
        photos: Annotated[list[UploadFile], File(description="1-4 face photos of one person")],
        backbone: Annotated[str | None, Form()] = None,
        adapter: Annotated[str | None, Form()] = None,
        select: Annotated[str, Form(description="largest, confidence or a face index")] = "largest",
    ) -> dict[str, Any]:
        if len(photos) > limits.max_photos:
            raise RequestError("photos", f"at most {limits.max_photos} photos, got {len(photos)}")
        raw = []
        for index, upload in enumerate(photos):
            data = await upload.read(limits.max_upload_bytes + 1)
            raw.append((f"photo {index + 1}", data))
        record = await _identity(raw, backbone, adapter, _parse_select(select))
        return record.summary()

    async def _work(body: GenerateBody) -> Work:
        valid = await run_in_threadpool(engine.validate, body.to_request())
        if body.identity_id is not None and body.photos:
            raise RequestError("photos", "give identity_id or photos, not both")
        record = None
        if body.photos:
            raw = []
            for index, text in enumerate(body.photos):
                if len(text) > limits.max_upload_bytes * 4 // 3 + 4:
                    raise RequestError("photos", f"photo {index + 1} is larger than {limits.max_upload_bytes} bytes", 413)
                try:
                    raw.append((f"photo {index + 1}", base64.b64decode(text, validate=True)))
                except (binascii.Error, ValueError):
                    raise RequestError("photos", f"photo {index + 1} is not valid base64") from None
            record = await _identity(raw, valid.backbone, valid.adapter, _parse_select(body.select))
        elif body.identity_id is not None:
            # a look-up in the shared actor under Ray: off the event loop
            record = await run_in_threadpool(engine.identity, body.identity_id)
        engine.check_identity(valid, record)
        if body.response_format == "png" and valid.num_images != 1:
            raise RequestError("response_format", f"response_format png returns one image; this request makes "
                                                  f"{valid.num_images} (use json)")
        return Work(valid, record)

    def _submit(work: Work) -> Any:
        try:
            return batcher.submit(work)
        except QueueFull as exc:
            raise _Refusal(_error(429, None, str(exc), {"Retry-After": str(exc.retry_after)})) from None
        except Closed as exc:
            raise _Refusal(_error(503, None, str(exc), {"Retry-After": "5"})) from None

    async def _wait(future: Any) -> list[Any]:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), limits.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise _Refusal(_error(504, None, f"the request took longer than {limits.timeout_s:g} s")) from None

    def _failure(exc: BaseException) -> tuple[int, str | None, str]:
        if isinstance(exc, RequestError):
            return exc.status, exc.field, str(exc)
        if isinstance(exc, FastFaceError):
            return 422, field_of(str(exc), "request"), error_text(exc)
        log.error("generation failed", exc_info=exc)
        return 500, None, "internal error while generating"

    @app.post("/v1/generate", tags=["generation"], dependencies=auth,
              responses={200: {"content": {"application/json": {}, "image/png": {}}}, 202: {}, 429: {}, 503: {}})
    async def generate(body: GenerateBody) -> Response:
        work = await _work(body)
        started = time.perf_counter()
        try:
            future = _submit(work)
        except _Refusal as refusal:
            return refusal.response
        if body.run_async:
            job_id = uuid.uuid4().hex
            jobs.put(job_id, {"job_id": job_id, "status": "queued"})

            def finished(done: Any) -> None:
                if done.cancelled():
                    jobs.put(job_id, {"job_id": job_id, "status": "failed",
                                      "error": {"field": None, "message": "cancelled", "status": 503}})
                elif done.exception() is not None:
                    status, field, message = _failure(done.exception())
                    jobs.put(job_id, {"job_id": job_id, "status": "failed",
                                      "error": {"field": field, "message": message, "status": status}})
                else:
                    images = done.result()
                    metrics.generated(len(images), time.perf_counter() - started)
                    jobs.put(job_id, {"job_id": job_id, "status": "done", "images": _encode_images(images)})

            future.add_done_callback(finished)
            return JSONResponse({"job_id": job_id, "status": "queued", "status_url": f"/v1/jobs/{job_id}"}, 202,
                                headers={"Location": f"/v1/jobs/{job_id}"})
        try:
            images = await _wait(future)
        except _Refusal as refusal:
            return refusal.response
        except Exception as exc:  # noqa: BLE001 - reported as one JSON error
            status, field, message = _failure(exc)
            return _error(status, field, message)
        metrics.generated(len(images), time.perf_counter() - started)
        if body.response_format == "png":
            [image] = images
            data = await run_in_threadpool(png_bytes, image.image, image.metadata)
            return Response(data, media_type="image/png", headers={"X-FastFace-Seed": str(image.metadata["seed"])})
        encoded = await run_in_threadpool(_encode_images, images)
        return JSONResponse({"images": encoded, "identity_id": None if work.identity is None else work.identity.id})

    @app.get("/v1/jobs/{job_id}", tags=["generation"], dependencies=auth)
    async def job(job_id: str) -> dict[str, Any]:
        if not ID_PATTERN.match(job_id):
            raise RequestError("job_id", "job_id must be 32 hexadecimal characters", 404)
        state = await run_in_threadpool(jobs.get, job_id)
        if state is None:
            raise RequestError("job_id", f"unknown job {job_id} (expired or never created)", 404)
        return state

    return app


class _Refusal(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__("refused")
        self.response = response
