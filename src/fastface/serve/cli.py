"""``fastface serve`` (HTTP API, optionally on Ray Serve) and ``fastface ui`` (the Gradio app)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from ..errors import ConfigError
from ..provenance import install_hint

TOKEN_ENV = "FASTFACE_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="HTTP API (FastAPI + uvicorn; --ray for Ray Serve replicas)")
    _common(serve, port=8000)
    serve.add_argument("--model", action="append", default=None, metavar="BACKBONE[:ADAPTER]",
                       help="a pipeline to serve, loaded at start-up; repeatable (default: hyper-4:faceid, "
                            "tiny:faceid when offline)")
    serve.add_argument("--token", default=None,
                       help=f"bearer token clients must send (better: the {TOKEN_ENV} environment variable); "
                            "required to listen on a non-loopback address")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile each served pipeline's fused UNet and VAE decode when it loads "
                            "(CUDA graphs on CUDA; the first request of each size pays the compilation)")
    serve.add_argument("--no-batching", action="store_true", help="one pipeline call per request")
    serve.add_argument("--max-batch-images", type=int, default=16, metavar="N")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                       help="how long a call waits for compatible requests to join it")
    serve.add_argument("--queue-images", type=int, default=64, metavar="N",
                       help="images allowed to wait; beyond it requests get 429 with Retry-After")
    serve.add_argument("--timeout", type=float, default=300.0, metavar="S", help="per-request time-out (504)")
    serve.add_argument("--max-steps", type=int, default=50)
    serve.add_argument("--max-size", type=int, default=1024, help="largest height/width")
    serve.add_argument("--max-images", type=int, default=8, help="images per request")
    serve.add_argument("--ray", action="store_true", help="serve from Ray Serve replicas (the same HTTP API)")
    serve.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (one per GPU)")
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    serve.set_defaults(func=run_serve)

    ui = sub.add_parser("ui", help="web UI (Gradio): upload photos, generate, compare methods")
    _common(ui, port=7860)
    ui.add_argument("--backbone", default=None, help="backbone selected at start (default: hyper-4, tiny offline)")
    ui.set_defaults(func=run_ui)


def _common(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--no-fuse", action="store_true", help="keep the LoRAs unfused (lora_scale may vary)")


def require(module: str, extra: str, command: str) -> None:
    """A one-line error naming the extra to install when an optional front-end package is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"fastface {command} needs the [{extra}] extra ({module} is not installed): "
                          f"{install_hint('faces', extra)} (from a checkout: pip install -e \".[faces,{extra}]\")")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def parse_models(items: list[str] | None) -> list[tuple[str, str | None]]:
    from ..adapters import get_adapter
    from ..backbones import get_backbone

    if not items:
        items = ["tiny:faceid"] if offline() else ["hyper-4:faceid"]
    pairs = []
    for item in items:
        backbone, _, adapter = item.partition(":")
        get_backbone(backbone)
        adapter = adapter or "faceid"
        if adapter != "none":
            get_adapter(adapter)
        pair = (backbone, None if adapter == "none" else adapter)
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def _device(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..commands import resolve_device

    if args.device == "auto" and args.dtype == "auto":
        return None, None
    return resolve_device(args.device, args.dtype)


def run_serve(args: argparse.Namespace) -> int:
    from .engine import ServeLimits

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and token is None:
        raise ConfigError(f"refusing to listen on {args.host} without a token: set {TOKEN_ENV} (or --token), "
                          "or listen on 127.0.0.1")
    for name in ("max_batch_images", "queue_images", "max_steps", "max_size", "max_images", "replicas"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.timeout <= 0 or args.batch_wait_ms < 0:
        raise ConfigError("--timeout must be > 0 and --batch-wait-ms >= 0")
    if args.compile and args.no_fuse:
        raise ConfigError("--compile needs fused LoRAs: drop --no-fuse")
    for module in ("fastapi", "uvicorn", "multipart"):
        require(module, "serve", "serve")
    if args.ray:
        require("ray", "ray", "serve --ray")
    models = parse_models(args.model)
    limits = ServeLimits(
        max_images=args.max_images, max_steps=args.max_steps, max_size=args.max_size,
        queue_images=args.queue_images, max_batch_images=args.max_batch_images, batch_wait_ms=args.batch_wait_ms,
        timeout_s=args.timeout,
    )
    device, dtype = _device(args)
    options = {"models": models, "limits": limits, "device": None if device is None else str(device),
               "dtype": dtype, "fuse_loras": not args.no_fuse, "token": token, "batching": not args.no_batching,
               "compile": args.compile}
    if args.ray:
        from .ray_app import run_ray

        return run_ray(options, host=args.host, port=args.port, replicas=args.replicas,
                       replica_cpus=args.replica_cpus)
    import uvicorn

    from .app import ServerSettings, create_app
    from .engine import Engine

    engine = Engine(models, limits=limits, device=options["device"], dtype=dtype, fuse_loras=not args.no_fuse,
                    compile=args.compile)
    app = create_app(engine, ServerSettings(token=token, batching=not args.no_batching))
    print(f"fastface serve: http://{args.host}:{args.port} (docs at /docs); serving "
          + ", ".join(f"{b}+{a or 'none'}" for b, a in models), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def run_ui(args: argparse.Namespace) -> int:
    require("gradio", "ui", "ui")
    from ..backbones import get_backbone
    from ..ui import launch

    if args.backbone is not None:
        get_backbone(args.backbone)

    device, dtype = _device(args)
    if not is_loopback(args.host):
        print(f"warning: the UI listens on {args.host}: anyone who can reach it can use this machine's GPU",
              file=sys.stderr)
    launch(host=args.host, port=args.port, backbone=args.backbone, device=None if device is None else str(device),
           dtype=dtype, fuse_loras=not args.no_fuse)
    return 0
