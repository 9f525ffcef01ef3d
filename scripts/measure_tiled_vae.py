"""Peak memory and time of a VAE decode, tiled or not, with the full-size SD1.5 VAE on random weights.

    python scripts/measure_tiled_vae.py                       # tiled 2048×2048, and 1024×1024 both ways
    python scripts/measure_tiled_vae.py --size 2048 --mode tiled --device cpu

Each measurement runs in its own process, so that its peak resident memory (ru_maxrss) is its own. The figure
printed is the peak minus the resident memory just before the decode (model weights and latent loaded), i.e.
what the decode itself needed. On CUDA the peak allocated GPU memory is printed instead.

Measured on the development machine (2 CPU cores shared with other jobs, 24 GB, fp32, tile 256):
    2048×2048 tiled:   peak RSS 5.78 GiB, 4.91 GiB for the decode itself, 1345 s
    1024×1024 untiled: 3.50 GiB for the decode (its mid-block attention alone is 1 GiB of scores; at 2048² it
                       would be 16 GiB, plus ~14 GiB of activations: beyond this machine)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(size: int, mode: str, device: str, tile: int) -> dict:
    import torch

    from sd15 import tiling
    from sd15.random_weights import random_state_dict
    from sd15.vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig()).eval().requires_grad_(False)
    vae.load_state_dict(random_state_dict(vae, 1))
    vae.to(device)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device) * 3
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad():
        image = tiling.decode(vae, z, tiled=(mode == "tiled"), tile=tile)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"size": size, "mode": mode, "device": device, "tile": tile, "seconds": round(seconds, 1),
              "peak_rss_gib": round(peak / 2**30, 2), "decode_rss_gib": round((peak - before) / 2**30, 2),
              "output_std": round(float(image.float().std()), 4)}  # fmt: skip
    if device.startswith("cuda"):
        result["decode_gpu_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (multiple of 8)")
    p.add_argument("--mode", choices=("tiled", "untiled"), default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", type=int, default=256)
    args = p.parse_args()
    if args.size and args.mode:
        print(json.dumps(measure(args.size, args.mode, args.device, args.tile)), flush=True)
        return
    runs = [(1024, "untiled"), (1024, "tiled"), (2048, "tiled")]
    for size, mode in runs:
        cmd = [sys.executable, __file__, "--size", str(size), "--mode", mode, "--device", args.device, "--tile", str(args.tile)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr.strip()[-2000:], flush=True)


if __name__ == "__main__":
    main()
