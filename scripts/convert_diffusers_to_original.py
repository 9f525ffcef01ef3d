#!/usr/bin/env python
"""Convert a diffusers SD1.x folder to an original single-file .safetensors checkpoint: a thin wrapper of
`sd15 convert`, with the argument names of diffusers' own conversion script.

    python scripts/convert_diffusers_to_original.py --model_path sd15-diffusers --checkpoint_path model.safetensors

The output is written under a temporary name, re-read and checked, then renamed into place
(docs/checkpoints.md). The same as `sd15 convert FOLDER CHECKPOINT.safetensors [--dtype fp16]`.
"""

import argparse
import sys
from pathlib import Path

from sd15.cli import main


def parse() -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="the diffusers folder (with model_index.json)")
    p.add_argument("--checkpoint_path", required=True, help="the .safetensors file to write (sd15 writes no pickles)")
    p.add_argument("--half", action="store_true", help="write fp16 weights")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args()
    if not (Path(args.model_path) / "model_index.json").is_file():  # else sd15 convert would only copy a file
        p.error(f"--model_path must be a diffusers folder (with model_index.json): {args.model_path}")
    if not args.checkpoint_path.lower().endswith(".safetensors"):  # else sd15 convert would write a diffusers folder
        p.error(f"--checkpoint_path must end in .safetensors (sd15 writes no pickles): {args.checkpoint_path}")
    argv = ["convert", args.model_path, args.checkpoint_path]
    return argv + ["--dtype", "fp16"] * args.half + ["--force"] * args.force + ["--debug"] * args.debug


if __name__ == "__main__":
    sys.exit(main(parse()))
