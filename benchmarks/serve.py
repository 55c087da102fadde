"""Serving benchmark: images/s and p50/p95 latency of the HTTP API at 1, 4 and 16 concurrent clients.

One run measures, side by side on the same machine and model:

* one process (``fastface serve``), micro-batching on;
* one process, micro-batching off (``--no-batching``: one pipeline call per request);
* a Ray Serve application with 2 replicas (``fastface serve --ray --replicas 2``), batching on.

Each client sends ``--rounds`` requests one after the other (one image each, its own prompt and
seed); a level's throughput is all its images over its wall time. Servers listen on 127.0.0.1.

    PYTHONPATH=src python benchmarks/serve.py --backbone tiny --out benchmarks/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PORTRAIT = ROOT / "src" / "fastface" / "data" / "portrait.jpg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} did not become ready")


def env() -> dict[str, str]:
    src = str(ROOT / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def start_process(model: str, device: str, batching: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "fastface.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", model, "--device", device, "--queue-images", "1024"]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return proc, url


def measure(url: str, clients: int, rounds: int, identity_id: str, steps: int | None) -> dict[str, float]:
    """``clients`` threads each sending ``rounds`` one-image requests; latencies and images/s."""

    def client(index: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, timeout=600) as c:
            for r in range(rounds):
                body = {"identity_id": identity_id, "prompt": f"portrait {index}-{r}", "seed": 1000 * index + r}
                if steps is not None:
                    body["steps"] = steps
                start = time.perf_counter()
                response = c.post("/v1/generate", json=body)
                latencies.append(time.perf_counter() - start)
                response.raise_for_status()
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [lat for chunk in pool.map(client, range(clients)) for lat in chunk]
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "images_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
        "wall_s": wall,
    }


def run_config(name: str, url: str, levels: list[int], rounds: int, steps: int | None) -> list[dict]:
    created = httpx.post(f"{url}/v1/identities", files=[("photos", ("me.jpg", PORTRAIT.read_bytes(), "image/jpeg"))],
                         timeout=600)
    created.raise_for_status()
    identity_id = created.json()["identity_id"]
    measure(url, 2, 2, identity_id, steps)  # warm-up: first calls allocate and compile kernels
    rows = []
    for clients in levels:
        row = {"config": name, **measure(url, clients, rounds, identity_id, steps)}
        print(f"{name:<26} {clients:>3} clients  {row['images_per_s']:7.2f} images/s  "
              f"p50 {row['p50_ms']:8.1f} ms  p95 {row['p95_ms']:8.1f} ms", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--adapter", default="faceid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client per level")
    parser.add_argument("--no-ray", action="store_true", help="skip the 2-replica Ray Serve configuration")
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    model = f"{args.backbone}:{args.adapter}"
    rows: list[dict] = []
    for name, batching in (("1 process, batching on", True), ("1 process, batching off", False)):
        proc, url = start_process(model, args.device, batching)
        try:
            rows += run_config(name, url, levels, args.rounds, args.steps)
        finally:
            proc.terminate()
            proc.wait(60)
    if not args.no_ray:
        from fastface.serve import ray_app
        from fastface.serve.engine import ServeLimits

        options = {"models": [(args.backbone, args.adapter)], "limits": ServeLimits(queue_images=1024),
                   "device": args.device, "dtype": None, "fuse_loras": True, "token": None, "batching": True}
        gpus = 1.0 if args.device.startswith("cuda") else 0.0
        url = ray_app.start(options, host="127.0.0.1", port=free_port(), replicas=2, replica_cpus=args.replica_cpus,
                            replica_gpus=gpus, torch_threads=int(os.environ.get("OMP_NUM_THREADS", "1")))
        try:
            wait_ready(url)
            rows += run_config("Ray Serve, 2 replicas", url, levels, args.rounds, args.steps)
        finally:
            ray_app.stop()

    by = {(r["config"], r["clients"]): r for r in rows}
    top = max(levels)
    on, off = by[("1 process, batching on", top)], by[("1 process, batching off", top)]
    summary = {"batching_throughput_ratio": on["images_per_s"] / off["images_per_s"], "at_clients": top}
    if ("Ray Serve, 2 replicas", top) in by:
        summary["ray2_vs_one_process_ratio"] = by[("Ray Serve, 2 replicas", top)]["images_per_s"] / on["images_per_s"]
    print(json.dumps(summary))
    print("\n| configuration | clients | images/s | p50 ms | p95 ms |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['clients']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |")
    if args.out:
        from fastface.atomic import write_text_atomic

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.out), json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
