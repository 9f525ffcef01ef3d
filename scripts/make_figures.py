#!/usr/bin/env python
"""Regenerate the figures in docs/figures/ from a checkpoint.

    python scripts/make_figures.py --model weights/v1-5-pruned-emaonly.safetensors      # real weights
    python scripts/make_figures.py --random-tiny                                        # no weights needed

Writes:
  noise_schedule.png   alphas_cumprod, sigma and the timesteps of 50-step PLMS/DDIM ("leading") and
                       Euler/DPM++ ("linspace") on the 1000-step training schedule
  trajectory.png       the predicted clean image x0 after each sampler step (a grid)
  attention/NN-word.png  cross-attention heatmaps per prompt token over the final image

The figures committed to docs/ were made with --random-tiny (no real weights can be downloaded where sd15 is
developed), so the images show noise, not pictures; rerun with --model to see what they look like on SD1.5.
Needs matplotlib (`pip install -e ".[docs]"`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on mars"


def plot_schedule(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sd15 import schedule
    from sd15.samplers import plan_sampling

    abar, sigmas = schedule.alphas_cumprod().numpy(), schedule.sigmas().numpy()
    t = np.arange(len(abar))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(t, abar, label=r"$\bar\alpha_t$ (signal kept)")
    left.plot(t, 1 - abar, label=r"$1-\bar\alpha_t$ (noise)")
    for name, y in (("PLMS / DDIM, 50 steps (leading)", 1.06), ("Euler / DPM++, 50 steps (linspace)", 1.12)):
        sampler = "pndm" if name.startswith("PLMS") else "euler"
        ts = np.unique(plan_sampling(sampler, 50).timesteps.numpy())
        left.scatter(ts, np.full_like(ts, y), s=6, label=name)
    left.set_xlabel("training timestep t")
    left.set_title("scaled-linear schedule of SD1.5")
    left.legend(fontsize=8, loc="center right")
    right.semilogy(t, sigmas)
    right.set_xlabel("training timestep t")
    right.set_ylabel(r"$\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$")
    right.set_title(f"noise level: {sigmas[0]:.4f} … {sigmas[-1]:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_figures(m, out: Path, steps: int, size: int, seed: int = 0) -> list[Path]:
    import sd15
    from sd15 import visualize

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "noise_schedule.png"]
    plot_schedule(written[0])
    capture = [visualize.CROSS_ATTENTION, "step.denoised"]
    with sd15.trace(m, capture=capture, reduce=visualize.HEATMAP_REDUCE) as tr:
        image = m.generate(PROMPT, steps=steps, seed=seed, width=size, height=size)[0]
    visualize.grid(visualize.decode_trajectory(m, tr)).save(out / "trajectory.png")
    written.append(out / "trajectory.png")
    f = m.vae.downscale_factor
    heat = visualize.token_heatmaps(tr, (size // f, size // f), (size, size))
    written += visualize.save_attention_maps(out / "attention", image, heat, visualize.prompt_token_labels(m, PROMPT))
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an SD1.x checkpoint")
    source.add_argument("--random-tiny", action="store_true", help="a seeded tiny random checkpoint")
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--steps", type=int, default=None, help="default: 50 (real weights), 12 (random tiny)")
    p.add_argument("--size", type=int, default=None, help="default: 512 (real weights), 128 (random tiny)")
    args = p.parse_args()

    import sd15
    from sd15.random_weights import random_checkpoint, save_checkpoint

    if args.model:
        m = sd15.load(args.model)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            m = sd15.load(save_checkpoint(random_checkpoint("tiny", seed=0), Path(tmp) / "tiny.safetensors"))
    steps = args.steps or (50 if args.model else 12)
    size = args.size or (512 if args.model else 128)
    for path in make_figures(m, Path(args.out), steps, size):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
