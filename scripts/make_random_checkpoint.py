#!/usr/bin/env python
"""Write a seeded random Stable Diffusion 1.x checkpoint in the exact original layout.

    python scripts/make_random_checkpoint.py weights/random-full.safetensors --size full
    python scripts/make_random_checkpoint.py /tmp/tiny.ckpt --size tiny --inpainting --ema
    python scripts/make_random_checkpoint.py /tmp/canny.safetensors --size tiny --controlnet   # a ControlNet for it

Every key, shape and prefix is that of the real `v1-5-pruned-emaonly` file (`--size full`, about 4.3 GB
in fp32), or of a tiny model with the same structure (`--size tiny`) for fast tests. `--controlnet` writes a
ControlNet for that model instead, in the layout of ControlNet 1.1's files (`control_model.` keys). Used by the tests,
demos and benchmarks, since no real weights can be downloaded where sd15 is developed.
"""

import argparse

import torch

from sd15.random_weights import SIZES, random_checkpoint, random_controlnet, save_checkpoint

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="output path: .safetensors, or .ckpt for a pickled Lightning-style file")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--inpainting", action="store_true", help="9-channel UNet input, as sd-v1-5-inpainting")
    p.add_argument("--ema", action="store_true", help="also write model_ema.* weights")
    p.add_argument("--old-clip-keys", action="store_true", help="CLIP keys without `text_model.`, as older files")
    p.add_argument("--controlnet", action="store_true", help="a ControlNet for the model of this --size and --seed")
    args = p.parse_args()
    if args.controlnet and (args.inpainting or args.ema or args.old_clip_keys):
        p.error("--controlnet writes a ControlNet alone; --inpainting, --ema and --old-clip-keys are for checkpoints")
    if args.controlnet:
        sd = random_controlnet(args.size, args.seed, dtype=DTYPES[args.dtype])
    else:
        sd = random_checkpoint(args.size, args.seed, args.inpainting, args.ema, args.old_clip_keys, DTYPES[args.dtype])
    path = save_checkpoint(sd, args.output)
    print(f"wrote {path} ({len(sd)} tensors, {path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
