"""The compiled path of :class:`~fastface.pipeline.FastFacePipeline` (``compile=True``).

The UNet and the VAE decode are each compiled once (``torch.compile``, inductor by default), after
the LoRAs are fused, and reused by every later call. What keeps them from recompiling:

- per-call numbers never reach a graph as Python numbers: the adapter scale λ and the
  scale-power parameters travel as 0-d tensors (:class:`fastface.processors.CallContexts`), and
  the identity keys/values as tensors; the branch plan and the AM targeting are decided on the host;
- the batch axis of every input is marked dynamic, so the branch plan's batches (e.g. 2, 3, 3, 2
  samples at the 4 steps of ``fastface``) share one graph; a batch of 1 (``none`` with one image)
  is specialised by torch and gets one more graph. A new resolution is a new graph.

Every compilation is counted by the backend itself (:class:`CountingBackend`). Up to
``expected_per_shape`` graphs per model and latent size are expected; one more is reported as a
:class:`RecompileWarning` (``strict=True``: a :class:`~fastface.errors.ConfigError`), and torch's
own recompile limit is raised and made an error inside the compiled calls, so a graph is never
silently replaced by eager execution. Graph breaks are refused (``fullgraph=True``).

On CUDA, ``mode="reduce-overhead"`` (the default there) replays CUDA graphs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import torch

from .errors import ConfigError

BACKENDS = ("inductor", "aot_eager", "eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Graphs expected per model and latent size: the dynamic-batch graph and the batch-of-1 graph.
EXPECTED_PER_SHAPE = 2
# torch's own limit, raised inside compiled calls (and made an error: no silent eager fallback).
RECOMPILE_LIMIT = 64


class RecompileWarning(RuntimeWarning):
    """A compiled model compiled more graphs than its expected set."""


@dataclass
class CompileLog:
    """The compilations of one model: one entry per graph, labelled with the latent size it was made for."""

    model: str
    expected_per_shape: int = EXPECTED_PER_SHAPE
    graphs: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0

    @property
    def count(self) -> int:
        return len(self.graphs)

    def per_shape(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for graph in self.graphs:
            counts[graph["shape"]] = counts.get(graph["shape"], 0) + 1
        return counts

    def unexpected(self) -> dict[str, int]:
        """Latent sizes with more graphs than expected: {size: graphs}."""
        return {k: v for k, v in self.per_shape().items() if v > self.expected_per_shape}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "graphs": self.count, "calls": self.calls, "per_shape": self.per_shape(),
                "expected_per_shape": self.expected_per_shape, "unexpected": self.unexpected(),
                "compile_seconds": round(sum(g["seconds"] for g in self.graphs), 3)}


class CountingBackend:
    """A ``torch.compile`` backend that records every graph it compiles, then hands it to ``backend``.

    ``backend``: "inductor" (with ``mode``'s options, as ``torch.compile(mode=...)`` would set
    them), "aot_eager" or "eager" (no code generation: what the CPU tests use).
    """

    def __init__(self, log: CompileLog, backend: str = "inductor", mode: str | None = None,
                 shape: Callable[[], str] | None = None) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"compile backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if mode is not None and mode not in MODES:
            raise ConfigError(f"compile mode must be one of {', '.join(MODES)}; got {mode!r}")
        if mode not in (None, "default") and backend != "inductor":
            raise ConfigError(f"compile mode {mode!r} needs the inductor backend")
        self.log = log
        self.backend = backend
        self.mode = mode
        self._shape = shape or (lambda: "?")
        if backend == "inductor":
            self._inner: Any = torch._TorchCompileInductorWrapper(mode, None, None)
        else:
            self._inner = torch._dynamo.lookup_backend(backend)

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        import time

        start = time.perf_counter()
        compiled = self._inner(graph, example_inputs)
        self.log.graphs.append({"shape": self._shape(), "seconds": time.perf_counter() - start,
                                "nodes": len(graph.graph.nodes)})
        return compiled

    def __getattr__(self, name: str) -> Any:  # dynamo asks inductor's wrapper for its config
        return getattr(self.__dict__["_inner"], name)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in (nested) call arguments: tensors, mappings, sequences and dataclass contexts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif is_dataclass(value) and not isinstance(value, type):
        for name in getattr(value, "__dataclass_fields__", {}):
            yield from _tensors(getattr(value, name))


def mark_batch_dynamic(*values: Any) -> None:
    """Mark axis 0 of every batched tensor (ndim ≥ 2) in ``values`` dynamic (0-d/1-d tensors are not batches)."""
    for tensor in (t for v in values for t in _tensors(v)):
        if tensor.ndim >= 2:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


class CompiledModels:
    """The compiled UNet and VAE decode of one pipeline, with their compile logs.

    ``unet(sample, timestep, **kwargs)`` has the UNet's call signature (``return_dict=False``);
    ``decode(z)`` returns the VAE's image tensor. Nothing is compiled until the first call of each.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module | None,
        *,
        backend: str = "inductor",
        mode: str | None = None,
        strict: bool = False,
        expected_per_shape: int = EXPECTED_PER_SHAPE,
    ) -> None:
        self.backend = backend
        self.mode = mode
        self.strict = strict
        self.cudagraphs = backend == "inductor" and mode in ("reduce-overhead", "max-autotune")
        self.logs = {"unet": CompileLog("unet", expected_per_shape), "vae": CompileLog("vae", expected_per_shape)}
        self._shape = "?"
        self._unet = torch.compile(unet, backend=CountingBackend(self.logs["unet"], backend, mode, self._current),
                                   fullgraph=True)
        self.vae = vae
        self._decode = None
        if vae is not None:
            def decode(z: torch.Tensor) -> torch.Tensor:
                return vae.decode(z, return_dict=False)[0]

            self._decode = torch.compile(decode, backend=CountingBackend(self.logs["vae"], backend, mode, self._current),
                                         fullgraph=True)

    def _current(self) -> str:
        return self._shape

    @contextlib.contextmanager
    def _guarded(self, name: str, latent: torch.Tensor) -> Iterator[None]:
        log = self.logs[name]
        before = log.count
        self._shape = "x".join(str(s) for s in latent.shape[-2:])
        if self.cudagraphs:
            # The previous replay's outputs have been consumed (the loop combines the branches and
            # steps the scheduler before the next UNet call): their buffers may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        patch = {"recompile_limit": RECOMPILE_LIMIT, "fail_on_recompile_limit_hit": True}
        patch = {k: v for k, v in patch.items() if hasattr(torch._dynamo.config, k)}
        with torch._dynamo.config.patch(**patch):
            yield
        log.calls += 1
        if log.count > before and log.unexpected():
            message = (f"compiled {name} made graph {log.count} (latent sizes: {log.per_shape()}; expected at most "
                       f"{log.expected_per_shape} per size): something that should be a tensor or fixed is changing")
            if self.strict:
                raise ConfigError(message)
            warnings.warn(message, RecompileWarning, stacklevel=4)

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        """The compiled UNet forward (same arguments as the UNet's)."""
        mark_batch_dynamic(sample, kwargs)
        with self._guarded("unet", sample):
            return self._unet(sample, timestep, **kwargs)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The compiled VAE decode of scaled latents ``z`` (n, C, h, w) -> images (n, 3, H, W)."""
        if self._decode is None:
            raise ConfigError("this pipeline's VAE was not compiled")
        mark_batch_dynamic(z)
        with self._guarded("vae", z):
            out = self._decode(z)
        # A CUDA-graph output lives in a buffer the next replay reuses: hand out a copy.
        return out.clone() if self.cudagraphs else out

    def compiles(self) -> int:
        """Graphs compiled so far, both models together."""
        return sum(log.count for log in self.logs.values())

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "mode": self.mode or "default", "cuda_graphs": self.cudagraphs,
                **{name: log.to_dict() for name, log in self.logs.items()}}


class CompileMixin:
    """``compile()`` / ``compiled`` / ``compile_report()`` of a pipeline (``sdxl``, ``device``,
    ``_offload_device``, ``_loras`` fused via ``fuse_loras``, ``set_am_kernel``)."""

    sdxl: Any
    _offload_device: torch.device | None
    _compiled: CompiledModels | None
    _compile_options: dict[str, Any] | None

    @property
    def compiled(self) -> bool:
        """Whether the UNet and the VAE decode run compiled (see :meth:`compile`)."""
        return self._compiled is not None

    def compile(self, *, mode: str | None = ..., backend: str = "inductor", strict: bool = False,  # type: ignore[assignment]
                lora_scale: float | None = None) -> None:
        """Compile the UNet and the VAE decode (``torch.compile``) for every later call.

        The LoRAs are fused first (at ``lora_scale`` for the adapter's, unless already fused) and
        scale-power AM switches to the fused kernel, whose numbers reach the graph as tensors: the
        adapter scale and AM scale can change between calls without recompiling. ``mode``: default
        ``"reduce-overhead"`` (CUDA graphs) on CUDA, inductor's default elsewhere; ``backend``
        "aot_eager"/"eager" compile without code generation. A compile beyond the expected set (one
        graph per batch-of-1 and one for every other batch, per resolution) warns, or raises with
        ``strict``; see :mod:`fastface.compiled` and :meth:`compile_report`.
        """
        from .presets import DEFAULT_LORA_SCALE

        if self._offload_device is not None:
            raise ConfigError("compile and cpu_offload cannot be combined")
        if self.fused_loras is None:  # type: ignore[attr-defined]
            self.fuse_loras(DEFAULT_LORA_SCALE if lora_scale is None else lora_scale)  # type: ignore[attr-defined]
        self.set_am_kernel("fused")  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        options = {"mode": default_mode(device) if mode is ... else mode, "backend": backend, "strict": strict}
        self._compiled = self._make_compiled(**options)
        self._compile_options = options

    def _make_compiled(self, **options: Any) -> CompiledModels:
        return CompiledModels(self.sdxl.unet, self.sdxl.vae, **options)

    def compile_report(self) -> dict[str, Any] | None:
        """Backend, mode and every graph compiled so far per model (None when not compiled)."""
        return None if self._compiled is None else self._compiled.describe()


def default_mode(device: torch.device) -> str | None:
    """CUDA graphs on CUDA (``reduce-overhead``), inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


__all__ = [
    "BACKENDS", "MODES", "CompileLog", "CompileMixin", "CompiledModels", "CountingBackend", "RecompileWarning", "default_mode",
    "mark_batch_dynamic",
]
