"""The same HTTP API as a Ray Serve application: ``fastface serve --ray --replicas N``.

Each replica is one process with its own :class:`~fastface.serve.engine.Engine` (models loaded
once per replica, one worker thread, micro-batching) behind the unchanged FastAPI app; Ray
Serve's proxy spreads requests over the replicas. Identities and async jobs live in one small
shared actor, so an identity created on one replica is found by another, and a job is polled
from any. One replica per GPU (``num_gpus=1``) on a GPU machine; fractions of a CPU in tests.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

ENV_PASSED = ("FASTFACE_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TOKENIZERS_PARALLELISM",
              "PYTHONPATH", "OMP_NUM_THREADS")
APP_NAME = "fastface"


class _SharedStore:
    """A bounded key -> value map in one actor (identities and jobs of every replica)."""

    def __init__(self, capacity: int) -> None:
        from .engine import LRUStore

        self._items = LRUStore(capacity)

    def put(self, key: str, value: Any) -> None:
        self._items.put(key, value)

    def get(self, key: str) -> Any:
        return self._items.get(key)


class ActorStore:
    """The put/get interface of :class:`~fastface.serve.engine.LRUStore` over the shared actor."""

    def __init__(self, actor: Any, prefix: str) -> None:
        self.actor = actor
        self.prefix = prefix

    def put(self, key: str, value: Any) -> None:
        import ray

        ray.get(self.actor.put.remote(f"{self.prefix}:{key}", value))

    def get(self, key: str) -> Any:
        import ray

        return ray.get(self.actor.get.remote(f"{self.prefix}:{key}"))


def build_application(options: dict[str, Any], *, replicas: int, replica_cpus: float,
                      replica_gpus: float | None = None, torch_threads: int | None = None) -> Any:
    """The Ray Serve application (bound deployment) of the API with ``replicas`` replicas."""
    import ray
    from ray import serve

    from .app import ServerSettings, create_app
    from .engine import Engine

    if replica_gpus is None:
        import torch

        replica_gpus = 1.0 if torch.cuda.is_available() and options.get("device") != "cpu" else 0.0
    limits = options["limits"]
    store = ray.remote(num_cpus=0)(_SharedStore).remote(limits.max_identities + limits.max_jobs)

    @serve.deployment(
        name="FastFace", num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=max(8, limits.max_batch_images * 2),
    )
    @serve.ingress()
    class FastFaceReplica:
        def __init__(self, options: dict[str, Any], store: Any) -> None:
            if torch_threads:
                import torch

                torch.set_num_threads(torch_threads)
            engine = Engine(options["models"], limits=options["limits"], device=options.get("device"),
                            dtype=options.get("dtype"), fuse_loras=options.get("fuse_loras", True),
                            compile=options.get("compile", False),
                            identities=ActorStore(store, "identity"))
            settings = ServerSettings(token=options.get("token"), batching=options.get("batching", True))
            self._app = create_app(engine, settings, jobs=ActorStore(store, "job"))

        def __serve_build_asgi_app__(self) -> Any:
            return self._app

    return FastFaceReplica.bind(options, store)


def start(options: dict[str, Any], *, host: str, port: int, replicas: int, replica_cpus: float,
          replica_gpus: float | None = None, num_cpus: float | None = None, torch_threads: int | None = None) -> str:
    """Start Ray (locally), Serve's proxy on ``host:port`` and the application; returns the base URL."""
    import ray
    from ray import serve

    env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": env})
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    app = build_application(options, replicas=replicas, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
                            torch_threads=torch_threads)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def run_ray(options: dict[str, Any], *, host: str, port: int, replicas: int, replica_cpus: float) -> int:
    """``fastface serve --ray``: serve until interrupted."""
    url = start(options, host=host, port=port, replicas=replicas, replica_cpus=replica_cpus)
    print(f"fastface serve --ray: {replicas} replica(s) at {url} (docs at /docs)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
