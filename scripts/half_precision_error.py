"""How far fp16 and bf16 move SD1.5's outputs from fp32, on full-size random weights, on any device.

    python scripts/half_precision_error.py                         # CPU: 256×256, 20 PNDM steps
    python scripts/half_precision_error.py --device cuda --size 512

For each half-precision dtype it prints the error of one guided UNet call (max |Δ| over max |fp32|) and
of a whole seeded generation (mean and max |Δ| of pixels in [0, 1]). These are what the tolerances of
tests/gpu rest on (docs/performance.md, "Accuracy"). The model runs on the reference path unless
--fast is given, so that on a GPU the two paths can be told apart.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sd15  # noqa: E402
from sd15.random_weights import random_checkpoint, save_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fast", action="store_true", help="the half-precision models on the fast path")
    p.add_argument("--weights", choices=("full", "tiny"), default="full", help="tiny: a quick run of the script itself")
    args = p.parse_args()
    device, side = torch.device(args.device), args.size // 8
    g = torch.Generator().manual_seed(0)
    t = torch.full((2,), 501.0, device=device)
    run = dict(steps=args.steps, seed=1, output_type="np", width=args.size, height=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        weights = random_checkpoint(args.weights, seed=0, dtype=torch.float16)
        path = save_checkpoint(weights, Path(tmp) / "weights.safetensors")
        with torch.no_grad():
            m = sd15.load(path, device=device, dtype=torch.float32, fast=False)
            x = torch.randn(2, 4, side, side, generator=g)
            ctx = torch.randn(2, 77, m.unet.config.context_dim, generator=g)  # (B, T, D)
            eps32, image32 = m.unet(x.to(device), t, ctx.to(device)).double(), m.generate("a red bicycle", **run)
            del m
            print(f"{args.device}, {args.size}×{args.size}, {args.steps} PNDM steps, guidance 7.5, "
                  f"{'fast' if args.fast else 'reference'} path against fp32 on the reference path")  # fmt: skip
            for dtype in (torch.float16, torch.bfloat16):
                m = sd15.load(path, device=device, dtype=dtype, fast=args.fast)
                eps = m.unet(x.to(device, dtype), t, ctx.to(device, dtype)).double()
                unet_error = float((eps - eps32).abs().max() / eps32.abs().max())
                pixels = np.abs(m.generate("a red bicycle", **run) - image32)
                print(f"  {str(dtype):15s} UNet call {unet_error:.2e} relative;  "
                      f"image mean |Δ| {pixels.mean():.2e}, max |Δ| {pixels.max():.2e}")  # fmt: skip
                del m


if __name__ == "__main__":
    main()
