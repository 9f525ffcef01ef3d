#!/usr/bin/env python
"""Convert a diffusers SD1.x folder to an original single-file .safetensors checkpoint: a thin wrapper of
`sd15 convert`, with the argument names of diffusers' own conversion script.

    python scripts/convert_diffusers_to_original.py --model_path sd15-diffusers --checkpoint_path model.safetensors

The output is written under a temporary name, re-read and checked, then renamed into place
(docs/checkpoints.md). The same as `sd15 convert FOLDER CHECKPOINT.safetensors [--dtype fp16]`.
"""

import argparse
import sys

from sd15.cli import main


def parse() -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="the diffusers folder (with model_index.json)")
    p.add_argument("--checkpoint_path", required=True, help="the .safetensors file to write (sd15 writes no pickles)")
    p.add_argument("--half", action="store_true", help="write fp16 weights")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    args = p.parse_args()
    argv = ["convert", args.model_path, args.checkpoint_path]
    return argv + ["--dtype", "fp16"] * args.half + ["--force"] * args.force


if __name__ == "__main__":
    sys.exit(main(parse()))
