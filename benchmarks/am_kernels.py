#!/usr/bin/env python3
"""Scale-power AM kernels alone, at the SDXL identity-branch shapes: reference vs lean vs fused.

    python benchmarks/am_kernels.py --resolution 256 --dtype bf16 --repeats 30 --threads 2

Each kernel computes λ·s·P^p V for one layer (query (B, h, L, 64), 4 identity tokens) the way the
engine uses it: reference and lean return P′V, which the processor then scales by λ and adds to
the text branch; the fused kernel returns softmax(p·Z)V and the per-query factor, applied with λ in
the same pass that adds it (``torch.addcmul``). Rounds rotate the order; the minimum over rounds
is reported (a shared machine only ever adds time) with the median beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from fastface.attention import (  # noqa: E402
    AttentionManipulation,
    manipulated_ip_attention,
    scale_power_log_factor,
    scale_power_sdpa,
)
from fastface.processors import scale_power_attention  # noqa: E402

# SDXL's attn2 layers: (heads, latent side divisor) of the down/up transformer blocks.
LAYERS = ((10, 2), (20, 4))  # 640 channels at 1/16 of the image side, 1280 at 1/32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    am = AttentionManipulation.scale_power()
    g = torch.Generator().manual_seed(0)
    print(f"{args.resolution}², batch {args.batch}, {args.dtype}, {torch.get_num_threads()} threads, {device}")
    for heads, divisor in LAYERS:
        time_layer(args, heads, divisor, dtype, device, am, g)
    return 0


def time_layer(args: argparse.Namespace, heads: int, divisor: int, dtype: torch.dtype, device: torch.device,
               am: AttentionManipulation, g: torch.Generator) -> None:
    s, p, lam = am.parts["down"].scale, am.parts["down"].power, 0.8
    side = args.resolution // 8 // divisor
    length = side * side
    q = torch.randn(args.batch, heads, length, 64, generator=g).to(device, dtype)
    k = torch.randn(args.batch, heads, 4, 64, generator=g).to(device, dtype)
    v = torch.randn(args.batch, heads, 4, 64, generator=g).to(device, dtype)
    hidden = torch.randn(args.batch, length, heads * 64, generator=g).to(device, dtype)
    values = torch.tensor([lam, s, p], dtype=torch.float32, device=device)

    def add(out: torch.Tensor) -> torch.Tensor:
        return hidden + lam * out.transpose(1, 2).reshape(args.batch, length, heads * 64)

    def fused() -> torch.Tensor:
        out = scale_power_sdpa(q, k, v, values[2])
        factor = torch.exp(scale_power_log_factor(q, k, values[2])) * (values[1] * values[0])
        return torch.addcmul(hidden.view(args.batch, length, heads, 64), out.transpose(1, 2),
                             factor.transpose(1, 2).to(dtype)).reshape(args.batch, length, heads * 64)

    kernels = {
        "reference": lambda: add(manipulated_ip_attention(q, k, v, am, part="down")),
        "lean": lambda: add(scale_power_attention(q, k, v, s, p, am.cap)),
        "fused": fused,
    }
    ref = kernels["reference"]().float()
    errors = {n: float((f().float() - ref).abs().max() / ref.abs().max()) for n, f in kernels.items()}
    times: dict[str, list[float]] = {n: [] for n in kernels}
    names = list(kernels)
    with torch.no_grad():
        for r in range(args.repeats + 2):
            for name in names[r % 3:] + names[: r % 3]:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                kernels[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= 2:
                    times[name].append((time.perf_counter() - start) * 1e3)
    base = min(times["reference"])
    print(f"layer heads={heads} L={length}:")
    for name in names:
        print(f"  {name:9s} min {min(times[name]):8.3f} ms ({min(times[name]) / base:5.2f}x reference), "
              f"median {statistics.median(times[name]):8.3f} ms, max rel. error vs reference {errors[name]:.1e}")


if __name__ == "__main__":
    sys.exit(main())
