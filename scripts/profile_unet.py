"""Where one guided UNet step spends its time, by kernel and by kind, on the reference and the fast path.

    python scripts/profile_unet.py                      # CUDA, fp16, 512×512 (a 64×64 latent), batch 2
    python scripts/profile_unet.py --device cpu --size 256

Full-size random weights (sd15.random_weights). For each path it prints the kernels that take the most time
and a summary by kind: matrix products and convolutions (compute-bound), attention, normalisation and
elementwise work (memory-bound: what the Triton kernels and fusions target). This is how to decide which
further fusion would pay (docs/performance.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sd15  # noqa: E402
from sd15.random_weights import random_checkpoint_file  # noqa: E402

KINDS = [  # (kind, substrings of kernel or op names), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("matmul / conv", ("gemm", "conv", "cutlass", "mm", "sm90", "sm80", "xmma", "cudnn", "addmm", "linear")),
    ("normalisation", ("norm", "welford", "_partial_stats", "_finalize_stats", "_apply_kernel")),
    ("elementwise", ("elementwise", "vectorized", "silu", "gelu", "add", "mul", "copy", "cat", "geglu", "upsample")),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lowered for k in keys)), "other")


def profile_step(m, size: int, device: torch.device, top: int) -> None:
    h = size // 8
    x = torch.randn(2, 4, h, h, device=device, dtype=m.dtype)
    t = torch.full((2,), 501.0, device=device)
    ctx = torch.randn(2, 77, m.unet.config.context_dim, device=device, dtype=m.dtype)
    cuda = device.type == "cuda"
    with torch.no_grad():
        for _ in range(3):  # warm-up: autotuning, Triton compilation, the k/v cache
            m.unet(x, t, ctx)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            m.unet(x, t, ctx)
            if cuda:
                torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(time_of(e) for e in events)
    by_kind = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += time_of(e)
    print(f"  total {total / 1000:.2f} ms ({'GPU kernel' if cuda else 'CPU op'} time, self)")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:16s} {us / 1000:8.2f} ms  {100 * us / total:5.1f}%")
    print(f"  top {top}:")
    for e in sorted(events, key=time_of, reverse=True)[:top]:
        print(f"    {time_of(e) / 1000:8.3f} ms  {e.count:4d}×  {kind_of(e.key):14s} {e.key[:90]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--weights", choices=("full", "tiny"), default="full", help="tiny: a quick run of the script itself")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint_file(args.weights, 0, tmp)
        for name, fast in (("reference path", False), ("fast path (eager, no CUDA graph)", True)):
            m = sd15.load(path, device=device, dtype=dtype, fast=False)
            if fast:
                m.enable_fast_path(cuda_graphs=False)
            print(f"\n{name}: one guided UNet step, {args.size}×{args.size}, {str(dtype)[6:]}, {device}")
            profile_step(m, args.size, device, args.top)
            del m


if __name__ == "__main__":
    main()
