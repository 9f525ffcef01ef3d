"""Which noise each image starts from, and where its sampler's later noise comes from.

Image i of a call has its own generator, seeded `seed + i`: its initial noise is the generator's first draw
and an ancestral or SDE sampler's noise the draws after it, so an image depends on its seed alone, not on its
batch. The generator is torch's CPU generator (`rng="cpu"`, the default), or CUDA's computed on the CPU
(`rng="nv"`, sd15.philox), so that a seed gives what it gives on an NVIDIA GPU. The AUTOMATIC1111 web UI (its
modules/rng.py) draws the same with its "RNG" setting "CPU", or "NV" and its default "GPU" respectively, and adds
three ways to steer the noise, which sd15 has too, so that its PNGs that use them can be made again:

- **Variation seed** (`variation_seed`, `variation_strength` s): the noise is moved along a great circle from the
  seed's noise toward another seed's, a fraction s of the way, so that small s gives images near the seed's
  image and s = 1 the variation seed's own. With a variation all images of a call share the seed and image i
  takes variation seed `variation_seed + i`: one picture, varied.
- **Seed resize** (`seed_resize_from`, (W, H) pixels): the noise of the seed as it would be for a W × H image,
  centred in this size's (cut where larger, the rest from this size's own draw), so that an image of one size
  keeps much of its layout at another.
- **Eta noise seed delta** (`eta_noise_seed_delta`, "ENSD"): the sampler's later noise comes from a generator
  seeded `seed + delta` instead of continuing the first, as NovelAI's sampler drew it (31337).

The great circle is the web UI's: each channel's column of the latent (its values down one x position) is
normalised, and the angle between the two columns sets that column's interpolation weights.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass

import torch

from .philox import PhiloxGenerator

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# where the noise comes from: torch's CPU generator, or CUDA's generator computed on the CPU (sd15.philox, the web
# UI's "NV", equal to its default "GPU" on an NVIDIA card)
RNGS = ("cpu", "nv")


def make_generator(seed: int, rng: str = "cpu"):
    """A generator of normal draws from `seed`: a CPU torch.Generator, or a PhiloxGenerator (`rng="nv"`)."""
    return PhiloxGenerator(seed) if rng == "nv" else torch.Generator().manual_seed(seed)


def randn(shape, generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The generator's next standard normal draw of `shape` on its device, in `dtype` (None: torch's global RNG)."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(tuple(shape)).to(dtype)
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def slerp(strength: float, noise: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `noise` (strength 0) to `other` (strength 1), both (C, H, W), column by column:
    with u, v each (c, :, x) column over its norm and omega = acos(u · v), the result is
    (sin((1 - s) omega) noise + sin(s omega) other) / sin(omega) there. Two noises of one seed are parallel
    (u · v ~ 1 on average), and the web UI then falls back to (s noise + (1 - s) other), which it is equal to."""
    unit = noise / noise.norm(dim=1, keepdim=True)
    unit_other = other / other.norm(dim=1, keepdim=True)
    cos = (unit * unit_other).sum(1)  # (C, W)
    if cos.mean() > 0.9995:
        return noise * strength + other * (1 - strength)
    omega = torch.acos(cos)
    return (torch.sin((1.0 - strength) * omega) / torch.sin(omega)).unsqueeze(1) * noise + (
        torch.sin(strength * omega) / torch.sin(omega)
    ).unsqueeze(1) * other


def first_draw(seed: int, shape: tuple[int, ...], rng: str = "cpu") -> torch.Tensor:
    """A fresh generator's first standard normal draw of `shape` from `seed`."""
    return randn(shape, make_generator(seed, rng))


@dataclass(frozen=True)
class NoiseSeeds:
    """The seeds of one call's images and how their noise is steered (see the module docstring)."""

    seeds: tuple[int, ...]  # image i's seed
    variation_seeds: tuple[int, ...] | None = None  # image i's variation seed, with variation_strength > 0
    variation_strength: float = 0.0
    resize_from: tuple[int, int] | None = None  # (width, height) in pixels
    eta_noise_seed_delta: int = 0
    downscale: int = 8  # pixels per latent position (the VAE's)
    rng: str = "cpu"  # one of RNGS

    @classmethod
    def make(cls, seed: int | None, n: int, variation_seed: int | None = None, variation_strength: float = 0.0,
             resize_from: tuple[int, int] | None = None, eta_noise_seed_delta: int = 0, downscale: int = 8,
             rng: str = "cpu") -> NoiseSeeds:  # fmt: skip
        """The seeds of n images from the call's `seed` (checked: `check_noise_settings`; None: a random one, and
        likewise the variation seed). With a variation every image has `seed`, and image i variation seed
        `variation_seed + i`; else image i has seed + i."""
        varied = variation_strength > 0
        seed = secrets.randbelow(2**32) if seed is None else int(seed)
        if varied and variation_seed is None:
            variation_seed = secrets.randbelow(2**32)
        return cls(
            seeds=tuple(seed if varied else seed + i for i in range(n)),
            variation_seeds=tuple(variation_seed + i for i in range(n)) if varied else None,
            variation_strength=float(variation_strength) if varied else 0.0,
            resize_from=tuple(resize_from) if resize_from else None,
            eta_noise_seed_delta=int(eta_noise_seed_delta),
            downscale=downscale,
            rng=rng,
        )

    def generators(self) -> list:
        """One generator per image, seeded with its seed: its first draws are the image's noise."""
        return [make_generator(s, self.rng) for s in self.seeds]

    def first_noise(self, i: int, generator, shape) -> torch.Tensor:
        """Image i's initial noise of `shape`: its generator's next draw, steered."""
        return self.steer(i, randn(shape, generator))

    def steer(self, i: int, noise: torch.Tensor) -> torch.Tensor:
        """Image i's initial noise from its generator's draw `noise` ((C, h, w) or (1, C, h, w)): the seed's noise
        at the `resize_from` size where given, moved toward the variation seed's, centred in `noise`."""
        if self.variation_strength == 0 and self.resize_from is None:
            return noise
        batched = noise.dim() == 4
        full = noise[0] if batched else noise
        if self.resize_from is None:
            base = full
        else:
            width, height = self.resize_from
            base = first_draw(self.seeds[i], (full.shape[0], height // self.downscale, width // self.downscale), self.rng)
        if self.variation_strength > 0:
            base = slerp(self.variation_strength, base, first_draw(self.variation_seeds[i], tuple(base.shape), self.rng))
        if self.resize_from is not None:
            base = _centred(base, full)
        return base.unsqueeze(0) if batched else base

    def sampler_generators(self, generators: list[torch.Generator]) -> list[torch.Generator]:
        """Where each image's sampler draws its later noise: on from its first generator, or, with an eta noise
        seed delta, from a fresh one seeded seed + delta."""
        if not self.eta_noise_seed_delta:
            return generators
        return [make_generator(s + self.eta_noise_seed_delta, self.rng) for s in self.seeds]

    def record(self, i: int) -> dict:
        """Image i's GenerationSettings fields: its seed, and the steering its PNG records."""
        return {
            "seed": self.seeds[i],
            "variation_seed": self.variation_seeds[i] if self.variation_seeds else None,
            "variation_strength": self.variation_strength,
            "seed_resize_from": self.resize_from,
            "eta_noise_seed_delta": self.eta_noise_seed_delta,
            "rng": self.rng,
        }


def _centred(small: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (C, H, W) with `small` (C, h, w) centred in it, as the web UI places it: offsets (H - h) // 2 and
    (W - w) // 2; where `small` is larger its centre is cut out, h + 2 · offset rows (one short of H when the
    difference is odd, that row left as `full` has it)."""
    out = full.clone()
    (_, h, w), (_, H, W) = small.shape, full.shape
    dy, dx = (H - h) // 2, (W - w) // 2
    rows, cols = (h if dy >= 0 else h + 2 * dy), (w if dx >= 0 else w + 2 * dx)
    top, left = max(dy, 0), max(dx, 0)  # where it goes in `full`
    cut_top, cut_left = max(-dy, 0), max(-dx, 0)  # where it comes from in `small`
    out[:, top : top + rows, left : left + cols] = small[:, cut_top : cut_top + rows, cut_left : cut_left + cols]
    return out


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_noise_settings(seed: int | None, n: int, variation_seed: int | None, variation_strength: float,
                         resize_from, eta_noise_seed_delta: int, latents_given: bool = False, rng: str = "cpu") -> None:  # fmt: skip
    """Refuse steering that cannot be done, with what to change, before anything is allocated."""
    if rng not in RNGS:
        raise ValueError(f"rng must be one of {', '.join(RNGS)}, got {rng!r:.40}")
    if isinstance(variation_strength, bool) or not isinstance(variation_strength, numbers.Real) or not (
        math.isfinite(variation_strength) and 0.0 <= variation_strength <= 1.0
    ):
        raise ValueError(f"variation strength must be a number from 0 (the seed's noise) to 1 (the variation seed's), "
                         f"got {variation_strength!r:.40}")  # fmt: skip
    if variation_seed is not None and (not _whole(variation_seed) or not SEED_RANGE[0] <= variation_seed <= SEED_RANGE[1] - (n - 1)):
        raise ValueError(f"variation seed must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]} (image i uses "
                         f"variation seed + i), got {variation_seed!r:.40}")  # fmt: skip
    if resize_from is not None:
        if not (isinstance(resize_from, (tuple, list)) and len(resize_from) == 2 and all(_whole(v) and 8 <= v <= 16384 for v in resize_from)):
            raise ValueError(f"seed_resize_from must be (width, height) in pixels, each from 8 to 16384, got {resize_from!r:.60}")
    if not _whole(eta_noise_seed_delta) or not 0 <= eta_noise_seed_delta < 2**32:
        raise ValueError(f"the eta noise seed delta must be a whole number from 0 to {2**32 - 1}, got {eta_noise_seed_delta!r:.40}")
    if seed is not None and eta_noise_seed_delta and seed + n - 1 + eta_noise_seed_delta > SEED_RANGE[1]:
        raise ValueError("seed + eta noise seed delta is larger than a generator takes; give a smaller seed")
    if latents_given and (variation_strength > 0 or resize_from is not None):
        raise ValueError("latents replace the seeded noise that a variation seed or seed resize steers; give one or the other")
