"""What each part of the fast path gives: one guided UNet step and one VAE decode, timed as the parts are
added one at a time, on the same weights in one process.

    python scripts/ablate_fast_path.py                  # CUDA, fp16, 512×512 (a 64×64 latent), batch 2
    python scripts/ablate_fast_path.py --device cpu --size 256 --weights tiny   # the script itself

The ladder (each row keeps what the rows above it turned on, except the alternatives marked "instead"):

    reference, NCHW                  the plain modules, contiguous tensors
    reference, channels-last         the same modules on NHWC tensors
    fused modules, PyTorch ops       sd15.fast's modules: stacked q/k/v, k/v cache, fused epilogues as torch ops
    + Triton kernels                 GroupNorm(+SiLU), GEGLU, add+LayerNorm in Triton (CUDA)
    + CUDA graphs                    the UNet replayed from a graph: the default fast path (CUDA)
    + cudnn.benchmark                cuDNN times its convolution algorithms for each shape first (CUDA)
    graphs, SDPA forced to X         "+ CUDA graphs" with SDPA forced to flash, cuDNN or memory-efficient (CUDA)

It is how to decide what pays on a given GPU (docs/performance.md): benchmark.py compares whole
configurations with diffusers, this splits the fast one into its parts. Each figure is the median of
--calls calls after a warm-up (which includes Triton's compilation and the graph capture), the device
synchronised around each call. A row whose configuration fails (a backend that does not take the shape,
say) says so and the ladder goes on. A SIGTERM (a time limit such as `timeout`'s) stops the ladder, and the
table and the JSON still hold the rows measured before it. Each SDPA row is compared with "+ CUDA graphs",
the same configuration with PyTorch's own choice of backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

import sd15  # noqa: E402
from benchmark import DTYPES, TimeUp, _time_up, seconds  # noqa: E402
from sd15.random_weights import random_checkpoint_file  # noqa: E402


def ladder(cuda: bool) -> list[tuple[str, dict]]:
    """(row name, settings): `fast` None for the reference path, else enable_fast_path's options."""
    rows = [
        ("reference, NCHW", dict(fast=None, channels_last=False)),
        ("reference, channels-last", dict(fast=None, channels_last=True)),
        ("fused modules, PyTorch ops", dict(fast=dict(kernels=False, channels_last=True, cuda_graphs=False))),
    ]
    if cuda:
        fastest = dict(kernels=None, channels_last=True, cuda_graphs=True)  # Triton where installed
        rows += [
            ("+ Triton kernels", dict(fast=dict(kernels=None, channels_last=True, cuda_graphs=False))),
            ("+ CUDA graphs", dict(fast=fastest)),
            ("+ cudnn.benchmark", dict(fast=fastest, cudnn_benchmark=True)),
        ]
        from torch.nn.attention import SDPBackend

        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                               ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION)):  # fmt: skip
            rows.append((f"graphs, SDPA forced to {label}", dict(fast=fastest, sdpa=backend)))
    return rows


def configure(m, settings: dict) -> contextlib.AbstractContextManager:
    """Put `m` in the row's configuration; returns the context its UNet calls must run in."""
    m.disable_fast_path()
    torch.backends.cudnn.benchmark = settings.get("cudnn_benchmark", False)
    if settings["fast"] is None:
        fmt = torch.channels_last if settings["channels_last"] else torch.contiguous_format
        m.unet.to(memory_format=fmt)
        m.vae.to(memory_format=fmt)
    else:
        m.enable_fast_path(**settings["fast"])  # a fresh state: graphs are captured again under this row's flags
    if settings.get("sdpa") is not None:
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(settings["sdpa"])
    return contextlib.nullcontext()


def median_ms(fn, device: torch.device, calls: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    return 1000.0 * statistics.median(seconds(fn, device) for _ in range(calls))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--calls", type=int, default=20, help="timed calls per figure")
    p.add_argument("--weights", choices=("full", "tiny"), default="full", help="tiny: a quick run of the script itself")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if cuda else torch.float32)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint_file(args.weights, 0, tmp)
        m = sd15.load(path, device=device, dtype=dtype, fast=False)
    h = args.size // 8
    x = torch.randn(2, 4, h, h, device=device, dtype=dtype)
    t = torch.full((2,), 501.0, device=device)
    ctx = torch.randn(2, 77, m.unet.config.context_dim, device=device, dtype=dtype)
    z = torch.randn(1, 4, h, h, device=device, dtype=dtype)

    results: dict[str, dict[str, float | str]] = {}
    signal.signal(signal.SIGTERM, _time_up)
    try:
        with torch.no_grad():
            for name, settings in ladder(cuda):
                try:
                    with configure(m, settings):  # the forced SDPA backend: the UNet's heads (width 40-160) only
                        unet = median_ms(lambda: m.unet(x, t, ctx), device, args.calls)
                    vae = median_ms(lambda: m.vae.decode(z), device, max(3, args.calls // 4))  # one head of width 512
                    results[name] = {"UNet guided step (ms)": unet, "VAE decode (ms)": vae}
                except Exception as error:  # noqa: BLE001 (one row's failure must not lose the ladder)
                    if TimeUp.arrived:  # a SIGTERM inside a graph capture surfaces as the capture's error
                        raise TimeUp from error
                    results[name] = {"error": f"{type(error).__name__}: {error}"[:200]}
                print(f"  {name:34s} {results[name]}", file=sys.stderr)
        m.disable_fast_path()
    except TimeUp:
        print("\nstopped by SIGTERM (a time limit): the table holds the rows measured before it", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.backends.cudnn.benchmark = False

    env = f"{torch.cuda.get_device_name(device) if cuda else 'CPU'}, torch {torch.__version__}, {str(dtype)[6:]}, " \
          f"{args.size}×{args.size}, batch 2 (one guided step), median of {args.calls}"
    print(f"\n{env}{' (stopped early by a time limit)' if TimeUp.arrived else ''}\n")
    print("| configuration | UNet guided step (ms) | vs row above | VAE decode (ms) | vs row above |")
    print("|---|---:|---:|---:|---:|")
    above: dict[str, float] = {}
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | |")
            continue
        # the SDPA rows are alternatives, each against the row with the same settings and PyTorch's choice
        base = results.get("+ CUDA graphs", {}) if name.startswith("graphs, SDPA") else above
        cells = []
        for metric in ("UNet guided step (ms)", "VAE decode (ms)"):
            ratio = f"{base[metric] / r[metric]:.2f}×" if metric in base else ""
            cells += [f"{r[metric]:.2f}", ratio]
        if not name.startswith("graphs, SDPA"):
            above = dict(r)
        print(f"| {name} | " + " | ".join(cells) + " |")
    if any(name.startswith("graphs, SDPA") for name in results):
        print("\n(the SDPA rows are each compared with \"+ CUDA graphs\", not with the row above)")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "stopped_early": TimeUp.arrived, "results": results}, indent=2))


if __name__ == "__main__":
    main()
