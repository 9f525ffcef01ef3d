#!/usr/bin/env python
"""Prompt-to-prompt word swap (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control").

Change one word of a prompt and keep the rest of the picture: the source and the edited prompt are denoised
together, from the same noise, and for the first part of the run the edited prompt's cross-attention
probabilities are replaced by the source's, so every word's pixels stay where they were while the swapped
word's text embedding changes what is drawn there.

    python scripts/examples/prompt_to_prompt.py --model weights/v1-5-pruned-emaonly.safetensors \
        "a cat riding a bicycle" "a dog riding a bicycle" -o swap.png

Writes one image with three panels: source | edited with injected attention | edited without injection.
The two prompts must have the same number of tokens (a word swap). Runs on any checkpoint; on a random one
(`scripts/make_random_checkpoint.py`) the panels are noise, but the mechanics are the same.
"""

import argparse

import torch

import sd15
from sd15.visualize import grid


def word_swap(m, source: str, edited: str, steps: int, seed: int, size: int, inject_until: float):
    if len(m.tokenizer.tokenize(source)) != len(m.tokenizer.tokenize(edited)):
        raise SystemExit("a word swap needs prompts with the same number of tokens")
    f = m.vae.downscale_factor
    noise = torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(seed))
    latents = noise.repeat(2, 1, 1, 1)  # the same starting noise for both prompts
    last_step = int(inject_until * steps)

    def inject(probs, info):
        # The UNet sees one guided batch [uncond source, uncond edited, cond source, cond edited].
        if info["step"] >= last_step:
            return None  # keep the edited prompt's own attention for the last steps (detail)
        probs = probs.clone()
        probs[3] = probs[2]  # the edited prompt attends exactly where the source prompt did
        return probs

    settings = dict(steps=steps, latents=latents, width=size, height=size, batch_size=2)
    with sd15.trace(m, patch={"unet.*.attn2.probs": inject}):
        source_image, swapped = m.generate([source, edited], **settings)
    plain = m.generate(edited, steps=steps, latents=noise, width=size, height=size)[0]
    return [source_image, swapped, plain]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("edited")
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--inject-until", type=float, default=0.8, help="fraction of the steps that use the source maps")
    p.add_argument("-o", "--output", default="prompt_to_prompt.png")
    args = p.parse_args()
    m = sd15.load(args.model)
    panels = word_swap(m, args.source, args.edited, args.steps, args.seed, args.size, args.inject_until)
    grid(panels, columns=3).save(args.output)
    print(f"wrote {args.output}: source | edited with the source's attention | edited alone")


if __name__ == "__main__":
    main()
