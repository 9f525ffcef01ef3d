#!/usr/bin/env python
"""Convert an original SD1.x single-file checkpoint to a diffusers folder: a thin wrapper of `sd15 convert`,
with the argument names of diffusers' own conversion script.

    python scripts/convert_original_to_diffusers.py --checkpoint_path v1-5-pruned.ckpt --dump_path sd15-diffusers
    python scripts/convert_original_to_diffusers.py --checkpoint_path last.ckpt --dump_path out --extract_ema --half

The output is written to a temporary folder, re-read and checked, then renamed into place
(docs/checkpoints.md). The same as `sd15 convert CHECKPOINT FOLDER [--ema] [--dtype fp16] [--vae FILE]`.
"""

import argparse
import sys

from sd15.cli import main


def parse() -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", required=True, help=".safetensors or .ckpt in the original layout")
    p.add_argument("--dump_path", required=True, help="the diffusers folder to write")
    p.add_argument("--extract_ema", action="store_true", help="use the EMA weights (model_ema.*) as the UNet")
    p.add_argument("--half", action="store_true", help="write fp16 weights")
    p.add_argument("--vae_path", default=None, help="take the VAE from this file instead")
    p.add_argument("--force", action="store_true", help="replace an existing diffusers folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args()
    if args.dump_path.lower().rstrip("/").endswith(".safetensors"):  # sd15 convert would write a single file
        p.error(f"--dump_path names the diffusers folder to write, not a .safetensors file: {args.dump_path}")
    argv = ["convert", args.checkpoint_path, args.dump_path]
    argv += ["--ema"] * args.extract_ema + ["--dtype", "fp16"] * args.half
    argv += ["--force"] * args.force + ["--debug"] * args.debug
    return argv + (["--vae", args.vae_path] if args.vae_path else [])


if __name__ == "__main__":
    sys.exit(main(parse()))
