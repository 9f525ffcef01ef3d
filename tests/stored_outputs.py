"""Seeded end-to-end runs whose outputs are stored in tests/data/stored_outputs.npz.

The parity tests compare sd15 with diffusers on the same weights, which catches an error only while the
oracle is installed and agrees. These runs compare sd15 with itself as it was: one seeded run per public
entry point (text-to-image with two samplers, image-to-image, inpainting), on the tiny random checkpoint
the other tests use. A change that moves their pixels is either a bug or a deliberate change of output,
which then regenerates the file (`python scripts/make_stored_outputs.py`) and says why in its commit.

The runs are fp32 on the CPU, 64×64 pixels, a few steps each, and take a few seconds in all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sd15.random_weights import random_checkpoint

STORED = __file__.rsplit("/", 1)[0] + "/data/stored_outputs.npz"


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return random_checkpoint("tiny", seed=0, ema=True)  # the same weights as conftest's tiny_checkpoint


def _gradient_image() -> np.ndarray:
    """A 64×64 RGB uint8 image with structure in every channel (no file needed)."""
    y, x = np.mgrid[0:64, 0:64]
    return np.stack([4 * x, 4 * y, 255 - 2 * (x + y)], axis=-1).astype(np.uint8)  # (H, W, 3)


def _mask() -> np.ndarray:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 24:56] = 255  # white: repaint
    return mask


RUN = dict(seed=1234, output_type="np", guidance_scale=7.5)

CASES: dict[str, Callable] = {
    "txt2img_pndm": lambda m: m.generate(["a red bicycle", "a lighthouse"], negative_prompt="blurry", steps=5,
                                         width=64, height=64, **RUN),  # fmt: skip
    "txt2img_euler_a_karras": lambda m: m.generate("a (cat:1.3) on a [mat:rug:2]", steps=5, sampler="euler_a", karras=True,
                                                   width=64, height=64, **RUN),  # fmt: skip
    "img2img_ddim": lambda m: m.img2img(_gradient_image(), "a watercolour", strength=0.6, steps=6, sampler="ddim", **RUN),
    "inpaint_dpmpp_2m_sde": lambda m: m.inpaint(_gradient_image(), _mask(), "a window", steps=5,
                                                sampler="dpmpp_2m_sde", **RUN),  # fmt: skip
}


def compute(m) -> dict[str, np.ndarray]:
    """Each case's images, (N, H, W, 3) float32 in [0, 1]."""
    return {name: np.asarray(case(m), dtype=np.float32) for name, case in CASES.items()}
