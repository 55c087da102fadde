"""The one place where a front-end request becomes library calls.

The HTTP API, its Ray Serve replicas and the web UI all go through :class:`Engine`:

* :func:`validate` checks a :class:`GenerationRequest` with the library's own rules (registry
  names, guidance schedules, ``check_*`` of the pipeline) plus the server's :class:`ServeLimits`,
  and names the offending field in a :class:`RequestError`;
* :meth:`Engine.pipeline` loads each (backbone, adapter) pipeline once per process;
* :meth:`Engine.analyze` turns uploaded photos into an identity, once, kept under a content id;
* :meth:`Engine.run_batch` runs one or more compatible requests as ONE pipeline call. It is only
  ever called from one worker thread (:mod:`fastface.serve.batching`), so a pipeline never serves
  two calls at once.

Nothing from a request becomes a file-system path: photos arrive as bytes and are decoded in
memory; identity and job ids are hex digests checked against a pattern before any look-up.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, FastFaceError, InputError, MissingWeightsError, NoFaceError
from ..presets import DEFAULT_IP_SCALE, DEFAULT_LORA_SCALE, DEFAULT_METHOD

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
# Words of library messages that name a request field ("steps must be …", "unknown backbone …").
_FIELD_WORDS = (
    "backbone", "adapter", "method", "steps", "height", "width", "num_images", "seed", "ip_scale",
    "lora_scale", "alpha", "beta", "rescale", "negative_prompt", "prompt", "am_scale_down", "am_scale_up",
    "am_power",
)


class RequestError(FastFaceError):
    """A request the server refuses: which field, why, and the HTTP status that says so."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


_FIELD_PHRASES = (("images per call", "num_images"), ("seeds", "seed"), ("schedule", "alpha"))


def field_of(message: str, default: str) -> str:
    """The request field a library message is about (its first field word), else ``default``."""
    for phrase, name in _FIELD_PHRASES:
        if phrase in message and not any(re.search(rf"\b{w}\b", message) for w in _FIELD_WORDS):
            return name
    found = [(m.start(), word) for word in _FIELD_WORDS for m in re.finditer(rf"\b{word}\b", message)]
    return min(found)[1] if found else default


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts; every bound is checked before any work is queued."""

    max_upload_bytes: int = 10 * 2**20  # per photo
    max_pixels: int = 25_000_000  # per photo, read from the header before decoding
    max_photos: int = 4
    max_prompts: int = 8
    max_prompt_chars: int = 2000
    max_images: int = 8  # images of one request (prompts × num_images)
    max_steps: int = 50
    max_size: int = 1024  # height and width
    max_ip_scale: float = 5.0
    queue_images: int = 64  # images waiting in the queue, all requests together
    max_batch_images: int = 16  # images of one batched pipeline call
    batch_wait_ms: float = 10.0  # how long a call waits for compatible requests to join it
    timeout_s: float = 300.0  # a request waiting longer than this gets 504
    max_identities: int = 1024  # identities kept (least recently used dropped)
    max_jobs: int = 1024  # finished async jobs kept


@dataclass(frozen=True)
class GenerationRequest:
    """One request, as the front ends receive it (plain values; ``None`` = the default)."""

    prompts: tuple[str, ...]
    negative_prompt: str | None = None
    backbone: str | None = None
    adapter: str | None = None
    method: str = DEFAULT_METHOD
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    seed: int | None = 0  # None: a random seed (returned in the metadata)
    ip_scale: float = DEFAULT_IP_SCALE
    lora_scale: float = DEFAULT_LORA_SCALE
    alpha: float | tuple[float, ...] | None = None
    beta: float | tuple[float, ...] | None = None
    rescale: float | None = None
    am_scale_down: float | None = None
    am_scale_up: float | None = None
    am_power: float | None = None


@dataclass(frozen=True)
class ValidRequest:
    """A checked request with everything the pipeline call needs resolved."""

    request: GenerationRequest
    backbone: str
    adapter: str | None
    face_backend: str | None
    guidance: Any  # GuidanceConfig
    attention: Any  # AttentionManipulation | None
    steps: int
    height: int
    width: int
    prompts: tuple[str, ...]  # one per image (a prompt repeated num_images times)
    seeds: tuple[int, ...]  # one per image

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    def batch_key(self, identity_id: str | None) -> tuple:
        """Requests with equal keys can share one pipeline call (identical everything but prompts/seeds).

        The identity is part of the key: one pipeline call takes one identity. The negative prompt's
        presence is too: without one the null text is all zeros, with one it is encoded.
        """
        r = self.request
        return (
            self.backbone, self.adapter, r.method, self.steps, self.height, self.width, r.ip_scale,
            r.lora_scale, json.dumps(self.guidance.to_dict(), sort_keys=True),
            None if self.attention is None else json.dumps(self.attention.to_dict(), sort_keys=True, default=str),
            identity_id, r.negative_prompt is None,
        )


@dataclass
class IdentityRecord:
    """An analysed identity: the library's Identity, the faces found per photo, the chosen ones."""

    id: str
    identity: Any  # fastface.faces.Identity
    backend: str
    faces: list[list[dict[str, Any]]]
    chosen: list[int]

    def summary(self) -> dict[str, Any]:
        return {
            "identity_id": self.id,
            "backend": self.backend,
            "embedding_dim": int(self.identity.dim),
            "photos": [
                {"faces": faces, "chosen": chosen} for faces, chosen in zip(self.faces, self.chosen)
            ],
            "outliers": list(self.identity.outliers),
        }


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image
    metadata: dict[str, Any]


class LRUStore:
    """A bounded, thread-safe key -> value map that forgets the least recently used entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, key: str) -> Any | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# --------------------------------------------------------------------------------------- photos


def decode_photo(data: bytes, limits: ServeLimits, name: str = "photo") -> np.ndarray:
    """An uploaded photo as RGB uint8, refused before decoding when too large (bytes or pixels)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > limits.max_upload_bytes:
        raise RequestError("photos", f"{name} is {len(data)} bytes; the limit is {limits.max_upload_bytes}", 413)
    if not data:
        raise RequestError("photos", f"{name} is empty", 400)
    with warnings.catch_warnings():
        # PIL warns (or raises) about decompression bombs by its own global limit; ours is below it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
            if isinstance(exc, Image.DecompressionBombError):
                raise RequestError("photos", f"{name} has too many pixels (limit {limits.max_pixels})", 413) from None
            raise RequestError("photos", f"{name} is not an image (PNG, JPEG, WebP …)", 415) from None
        width, height = image.size
        if width * height > limits.max_pixels:
            raise RequestError(
                "photos", f"{name} is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}",
                413,
            )
        try:
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError("photos", f"{name} cannot be decoded ({exc})", 400) from None
    return np.asarray(image)


# --------------------------------------------------------------------------------------- validation


def _check_float(value: Any, name: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise RequestError(name, f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(name, f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _library(default_field: str) -> Any:
    """Turn the library's own ConfigError/InputError into a RequestError naming the field."""

    class _Guard:
        def __enter__(self) -> None:
            return None

        def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
            if isinstance(exc, (ConfigError, InputError)) and not isinstance(exc, RequestError):
                # The library's hint on raising a limit speaks to CLI and Python users, not to clients.
                message = str(exc).split("; raise the limit")[0]
                raise RequestError(field_of(message, default_field), message) from None
            return False

    return _Guard()


def validate(
    request: GenerationRequest,
    limits: ServeLimits,
    *,
    served: Sequence[tuple[str, str | None]] | None = None,
    fused_lora_scale: float | None = None,
) -> ValidRequest:
    """Check a request with the library's :class:`~fastface.config.GenerationConfig` and the server's limits.

    The library's ``validate()`` checks names, numbers and schedules with the same rules and
    messages as the CLI (steps, size and image counts against :class:`~fastface.config.Limits`
    built from ``limits``); the server adds what only a server has: the (backbone, adapter) pairs it
    serves (``served``; None: any), prompt counts and lengths, an upper bound on ``ip_scale``, the
    adapter LoRA weight merged into its pipelines (``fused_lora_scale``), and the AM scale fields.
    """
    from ..attention import AttentionManipulation
    from ..config import FROM_METHOD, GenerationConfig, Limits

    default_backbone, default_adapter = served[0] if served else ("hyper-4", "faceid")
    r = request
    prompts = r.prompts
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise RequestError("prompt", "prompt must be a string or a non-empty list of strings")
    if len(prompts) > limits.max_prompts:
        raise RequestError("prompt", f"at most {limits.max_prompts} prompts per request, got {len(prompts)}")
    for text, name in [(p, "prompt") for p in prompts] + [(r.negative_prompt, "negative_prompt")]:
        if isinstance(text, str) and len(text) > limits.max_prompt_chars:
            raise RequestError(name, f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}")
    adapter_name = default_adapter if r.adapter is None else (None if r.adapter == "none" else r.adapter)
    count = r.num_images
    seed = secrets.randbelow(2**31) if r.seed is None else r.seed
    config = GenerationConfig(
        prompts=tuple(prompts), negative_prompt=r.negative_prompt, backbone=r.backbone or default_backbone,
        adapter=adapter_name, method=r.method, steps=r.steps, height=r.height, width=r.width, num_images=count,
        seed=seed, ip_scale=r.ip_scale, lora_scale=r.lora_scale, alpha=r.alpha, beta=r.beta, rescale=r.rescale,
        limits=Limits(max_steps=limits.max_steps, max_size=limits.max_size, max_images=limits.max_images),
    )
    if served is not None:
        from ..adapters import get_adapter
        from ..backbones import get_backbone

        with _library("backbone"):
            backbone = get_backbone(config.backbone).name
        if adapter_name is not None:
            with _library("adapter"):
                get_adapter(adapter_name)
        if (backbone, adapter_name) not in served:
            pairs = ", ".join(f"{b}+{a or 'none'}" for b, a in served)
            what = "backbone" if backbone not in {b for b, _ in served} else "adapter"
            raise RequestError(what, f"{backbone}+{adapter_name or 'none'} is not served here; served: {pairs}")
    with _library("request"):
        resolved = config.validate()
    backbone = resolved.backbone.name
    _check_float(r.ip_scale, "ip_scale", 0.0, limits.max_ip_scale)
    if fused_lora_scale is not None and adapter_name is not None and r.lora_scale != fused_lora_scale:
        raise RequestError("lora_scale", f"lora_scale is fixed at {fused_lora_scale:g} on this server "
                                         f"(the LoRAs are merged into the UNet), got {r.lora_scale:g}")
    if r.rescale is not None:
        _check_float(r.rescale, "rescale", 0.0, 1.0)

    attention = resolved.method.attention
    am = {k: getattr(r, k) for k in ("am_scale_down", "am_scale_up", "am_power") if getattr(r, k) is not None}
    if am:
        first = next(iter(am))
        if attention is None or attention.mode != "scale-power":
            raise RequestError(first, f"{first} needs a method with scale-power attention manipulation "
                                      f"(fastface, am); {resolved.method.name} has "
                                      f"{attention.mode if attention else 'none'}")
        for key, value in am.items():
            _check_float(value, key, 0.0, 10.0)
        current = attention.parts
        with _library(first):
            attention = AttentionManipulation.scale_power(
                power=am.get("am_power", next(iter(current.values())).power),
                s_down=am.get("am_scale_down", current["down"].scale if "down" in current else 1.55),
                s_up=am.get("am_scale_up", current["up"].scale if "up" in current else 1.45),
            )
        with _library(first):
            config.replace(attention=attention).validate()
    elif config.attention is not FROM_METHOD:
        attention = config.attention
    total = len(prompts) * count
    per_image = tuple(p for p in prompts for _ in range(count))
    return ValidRequest(
        request=r, backbone=backbone, adapter=adapter_name, face_backend=resolved.face_backend,
        guidance=resolved.guidance, attention=attention, steps=resolved.steps, height=resolved.height,
        width=resolved.width, prompts=per_image, seeds=tuple(int(seed) + i for i in range(total)),
    )


# --------------------------------------------------------------------------------------- engine


@dataclass
class Work:
    """One validated request waiting for (or in) a batched call."""

    request: ValidRequest
    identity: IdentityRecord | None
    progress: Callable[[int, int], None] | None = None
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.key = self.request.batch_key(None if self.identity is None else self.identity.id)


class Engine:
    """Models loaded once per process, identities analysed once, and the one batched pipeline call.

    ``served``: the (backbone, adapter) pairs to serve (loaded by :meth:`preload`); None serves
    any pair, each loaded on first use (the ``max_loaded`` newest kept). ``fuse_loras``: merge the
    LoRAs into the UNet at ``lora_scale`` 1 (faster; requests then cannot change ``lora_scale``).
    ``compile``: compile each pipeline's fused UNet and VAE decode as it loads (needs ``fuse_loras``).
    """

    def __init__(
        self,
        served: Sequence[tuple[str, str | None]] | None = (("tiny", "faceid"),),
        *,
        limits: ServeLimits | None = None,
        device: str | None = None,
        dtype: Any = None,
        fuse_loras: bool = True,
        compile: bool = False,
        identities: Any = None,
        max_loaded: int = 2,
    ) -> None:
        self.served = None if served is None else [(b, a) for b, a in served]
        self.limits = limits or ServeLimits()
        self.device = device
        self.dtype = dtype
        if compile and not fuse_loras:
            raise ConfigError("compile needs fused LoRAs")
        self.fuse_loras = fuse_loras
        self.compile = compile
        self.max_loaded = max_loaded
        self._pipelines: dict[tuple[str, str | None], Any] = {}
        self._load_lock = threading.Lock()
        self._face_lock = threading.Lock()
        self._face_backends: dict[str, Any] = {}
        # Any object with put(key, value) / get(key): an LRUStore here, a shared actor under Ray.
        self.identities = identities if identities is not None else LRUStore(self.limits.max_identities)
        self._tokens = LRUStore(256)  # identity tokens per (identity, backbone, adapter)

    # -- models --------------------------------------------------------------------------------

    def preload(self) -> None:
        for backbone, adapter in self.served or []:
            self.pipeline(backbone, adapter)

    def pipeline(self, backbone: str, adapter: str | None) -> Any:
        """The pipeline of a pair, loaded on first use and kept for the life of the process."""
        key = (backbone, adapter)
        with self._load_lock:
            pipe = self._pipelines.get(key)
            if pipe is None:
                from ..pipeline import FastFacePipeline

                pipe = FastFacePipeline.from_pretrained(
                    backbone=backbone, adapter=adapter, device=self.device, dtype=self.dtype
                )
                if self.fuse_loras and not pipe.cpu_offload:
                    pipe.fuse_loras(1.0)
                if self.compile:
                    pipe.compile(lora_scale=1.0)
                if self.served is None and len(self._pipelines) >= self.max_loaded:
                    # Serving any pair (the UI): keep the newest few; a running call keeps its own reference.
                    self._pipelines.pop(next(iter(self._pipelines)))
                self._pipelines[key] = pipe
            return pipe

    def loaded(self) -> list[tuple[str, str | None]]:
        with self._load_lock:
            return list(self._pipelines)

    def validate(self, request: GenerationRequest) -> ValidRequest:
        return validate(
            request, self.limits, served=self.served,
            fused_lora_scale=1.0 if self.fuse_loras else None,
        )

    # -- identities ------------------------------------------------------------------------------

    def face_backend_for(self, backbone: str | None, adapter: str | None) -> str:
        from ..adapters import spec_for_backbone

        default_backbone, default_adapter = self.served[0] if self.served else ("hyper-4", "faceid")
        with _library("adapter"):
            spec = spec_for_backbone(adapter or default_adapter or "faceid", backbone or default_backbone)
        return spec.face_backend

    def _backend(self, name: str) -> Any:
        from ..faces import get_backend

        if name not in self._face_backends:
            self._face_backends[name] = get_backend(name)
        return self._face_backends[name]

    def detect(self, image: np.ndarray, backend: str) -> list[dict[str, Any]]:
        """The faces of one photo (boxes, scores), left to right, for previews."""
        from ..faces import detect_faces

        with self._face_lock:
            faces = detect_faces(image, self._backend(backend))
        return [{"bbox": [round(float(v), 1) for v in f.bbox], "score": round(float(f.score), 4)} for f in faces]

    def analyze(
        self, photos: Sequence[np.ndarray], backend: str, select: str | int = "largest",
        names: Sequence[str] | None = None,
    ) -> IdentityRecord:
        """An identity from 1..max_photos decoded photos; the same photos give the same id (cached)."""
        from ..faces import build_identity
        from ..faces.identity import choose_face, detect_faces

        if not photos:
            raise RequestError("photos", "give at least one photo")
        if len(photos) > self.limits.max_photos:
            raise RequestError("photos", f"at most {self.limits.max_photos} photos, got {len(photos)}")
        if isinstance(select, str) and select not in ("largest", "confidence"):
            raise RequestError("select", f"select must be 'largest', 'confidence' or a face index, got {select!r}")
        names = list(names) if names else [f"photo {i + 1}" for i in range(len(photos))]
        digest = hashlib.sha256(f"{backend}|{select}".encode())
        for photo in photos:
            digest.update(hashlib.sha256(np.ascontiguousarray(photo).tobytes()).digest())
            digest.update(str(photo.shape).encode())
        identity_id = digest.hexdigest()[:32]
        cached = self.identities.get(identity_id)
        if cached is not None:
            return cached
        with self._face_lock:
            be = self._backend(backend)
            faces, chosen = [], []
            for photo, name in zip(photos, names):
                found = detect_faces(photo, be)
                if not found:
                    raise RequestError("photos", f"no face found in {name}; use a photo with a clearly visible face")
                with _library("select"):
                    index, _ = choose_face(found, select, name)
                faces.append([{"bbox": [round(float(v), 1) for v in f.bbox], "score": round(float(f.score), 4)}
                              for f in found])
                chosen.append(index)
            try:
                identity = build_identity(list(photos), backend=be, select=select, cache=False, progress=False)
            except NoFaceError as exc:
                raise RequestError("photos", str(exc)) from None
            except (ConfigError, InputError) as exc:
                raise RequestError(field_of(str(exc), "photos"), str(exc)) from None
        record = IdentityRecord(identity_id, identity, backend, faces, chosen)
        self.identities.put(identity_id, record)
        return record

    def identity(self, identity_id: str) -> IdentityRecord:
        if not isinstance(identity_id, str) or not ID_PATTERN.match(identity_id):
            raise RequestError("identity_id", "identity_id must be 32 hexadecimal characters")
        record = self.identities.get(identity_id)
        if record is None:
            raise RequestError("identity_id", f"unknown identity {identity_id} (expired or never created)", 404)
        return record

    def check_identity(self, request: ValidRequest, record: IdentityRecord | None) -> None:
        if request.adapter is None:
            if record is not None:
                raise RequestError("identity_id", "this backbone is served without an adapter: pass no identity")
            return
        if record is None:
            raise RequestError("identity_id", "give an identity_id (POST /v1/identities) or photos")
        if record.backend != request.face_backend:
            raise RequestError(
                "identity_id",
                f"identity {record.id} was analysed with the '{record.backend}' face model; "
                f"{request.adapter} on {request.backbone} needs '{request.face_backend}'",
            )

    # -- generation ------------------------------------------------------------------------------

    def run_batch(self, works: Sequence[Work]) -> list[list[GeneratedImage]]:
        """Run works with one batch key as ONE pipeline call; each gets its own images back.

        Images are split back per request with their request-local index; image i of a request
        has the seed it has when the request runs alone, so the batch composition does not change
        it (up to float rounding of batched matrix products).
        """
        if not works:
            return []
        first = works[0].request
        if any(w.key != works[0].key for w in works):
            raise ValueError("run_batch needs works with one batch key")
        pipe = self.pipeline(first.backbone, first.adapter)
        tokens = None
        identity = works[0].identity
        if identity is not None:
            token_key = f"{identity.id}|{first.backbone}|{first.adapter}"
            tokens = self._tokens.get(token_key)
            if tokens is None:
                tokens = pipe.encode_identity(identity.identity)
                self._tokens.put(token_key, tokens)
        prompts = [p for w in works for p in w.request.prompts]
        seeds = [s for w in works for s in w.request.seeds]
        negative = None
        if first.request.negative_prompt is not None:
            negative = [w.request.negative_prompt for w in works for _ in w.request.prompts]
        callbacks = [w.progress for w in works if w.progress is not None]

        def on_step(step: int, _latents: Any) -> None:
            for callback in callbacks:
                callback(step + 1, first.steps)

        r = first.request
        result = pipe(
            prompts, identity_tokens=tokens, method=r.method, negative_prompt=negative, num_images_per_prompt=1,
            seed=seeds, steps=first.steps, height=first.height, width=first.width, ip_scale=r.ip_scale,
            lora_scale=r.lora_scale, guidance=first.guidance, attention=first.attention, progress=False,
            callback=on_step if callbacks else None,
        )
        out: list[list[GeneratedImage]] = []
        start = 0
        for work in works:
            n = work.request.num_images
            images = []
            for i in range(n):
                meta = dict(result.metadata[start + i])
                meta["index"] = i
                meta["batch"] = {"requests": len(works), "images": len(prompts)}
                if work.identity is not None:
                    meta["identity_id"] = work.identity.id
                images.append(GeneratedImage(result.images[start + i], meta))
            out.append(images)
            start += n
        return out


def error_text(exc: BaseException) -> str:
    """One readable line for a user-facing error (with the fetch hint of missing weights)."""
    if isinstance(exc, MissingWeightsError):
        return f"missing model weights: {exc}"
    return str(exc)


def png_bytes(image: Any, metadata: dict[str, Any] | None = None) -> bytes:
    """PNG bytes of an image, its metadata in a tEXt chunk (``fastface``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if metadata is not None:
        info.add_text("fastface", json.dumps(metadata, default=str))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
