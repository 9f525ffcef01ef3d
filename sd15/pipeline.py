"""Text-to-image and image-to-image: prompts and noise in, images out.

    prompt ──tokenizer──> ids (B, 77) ──text_encoder──> context (B, 77, 768)      (and the same for the
                                                                                   negative prompt, "" by default)
    seed ──CPU generator──> noise (B, 4, H/8, W/8)   [img2img: VAE-encoded image, noised to the start step]
    sampler loop: eps = eps_u + s · (eps_c - eps_u), the UNet run once on [uncond; cond]   (classifier-free
                  guidance, Ho & Salimans 2022)
    latents / 0.18215 ──VAE decoder──> image (B, 3, H, W) in [-1, 1] -> PIL / numpy

Reproducibility: image i of a call gets its own CPU generator seeded with seed + i, for its initial noise,
its VAE sample (img2img) and its sampler noise (ancestral and SDE samplers). Images are denoised one at a
time by default (`batch_size=1`), so on the CPU an image is bit-identical whatever `num_images` is; a larger
`batch_size` is faster on a GPU, and changes results only in the last bits of floating-point rounding.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from . import images as image_io
from .samplers import SAMPLERS, plan_sampling
from .vae import LATENT_SCALE

if TYPE_CHECKING:
    from .model import StableDiffusion

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_PIXELS = 4096 * 4096  # refuse absurd sizes before allocating anything


@dataclass
class GenerationSettings:
    """Everything that determines a generated image (what the PNG's `parameters` chunk records)."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    width: int
    height: int
    karras: bool = False
    eta: float = 0.0
    strength: float | None = None  # img2img only


def check_settings(steps: int, guidance_scale: float, sampler: str, width: int, height: int, num_images: int = 1):
    """Refuse impossible settings with a message that says what to change."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1 or steps > 1000:
        raise ValueError(f"steps must be a whole number from 1 to 1000, got {steps!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance scale must be a finite number, got {guidance_scale!r}")
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, int) or side < 8 or side % 8:
            raise ValueError(f"{name} must be a positive multiple of 8 pixels, got {side!r}")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}×{height} is larger than sd15 allows ({MAX_PIXELS} pixels); SD1.5 works best near 512×512")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"the number of images must be at least 1, got {num_images!r}")


def _prompt_lists(prompt, negative_prompt, num_images: int) -> tuple[list[str], list[str]]:
    """One prompt and one negative prompt per image, prompt-major: [p0, p0, …, p1, p1, …]."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if not prompts or len(negatives) != len(prompts):
        raise ValueError("give at least one prompt, and one negative prompt or one per prompt")
    repeat = lambda items: [x for x in items for _ in range(num_images)]  # noqa: E731
    return repeat(prompts), repeat(negatives)


def encode_text(m: "StableDiffusion", prompts: list[str]) -> torch.Tensor:
    """Prompts -> context (B, 77, D) on the model's device and dtype."""
    ids = m.tokenizer(prompts).to(m.device)
    return m.text_encoder(ids)


def guided_eps_model(m: "StableDiffusion", cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float):
    """eps(x, t) with classifier-free guidance: eps_u + s · (eps_c - eps_u), one UNet call on [uncond; cond].

    With s <= 1 the unconditional branch is skipped (as diffusers does) and eps = eps_c.
    """

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in, t_in = x.to(m.dtype), t.to(m.device)
        trace = getattr(m, "_trace", None)  # sd15.hooks: records the two branches when asked to
        if trace is not None:
            trace.guided = guidance_scale > 1.0
        if guidance_scale <= 1.0:
            eps = m.unet(x_in, t_in, cond).to(x.dtype)
            return trace.visit("step.eps", eps) if trace is not None and trace.wants("step.eps") else eps
        eps_u, eps_c = m.unet(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), torch.cat([uncond, cond])).chunk(2)
        eps = (eps_u + guidance_scale * (eps_c - eps_u)).to(x.dtype)
        if trace is not None:
            for name, value in (("step.eps_uncond", eps_u), ("step.eps_cond", eps_c), ("step.eps", eps)):
                if trace.wants(name):
                    trace.visit(name, value)
        return eps

    return eps_model


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _finish(m: "StableDiffusion", latents: torch.Tensor, output_type: str):
    if output_type == "latent":
        return latents
    with torch.no_grad():
        decoded = torch.cat([m.vae.decode(z[None].to(m.dtype) / LATENT_SCALE) for z in latents])
    return image_io.to_numpy(decoded) if output_type == "np" else image_io.to_pil(decoded)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", leave=False)


def _run(m, plan, prompts, negatives, start_latents, generators, guidance_scale, batch_size, callback, progress):
    """Denoise each image (or each batch of `batch_size` images) from its start latent."""
    finished, bar = [], _progress(len(prompts) * (len(plan.timesteps) - plan.start), progress)
    stopped = False
    for lo in range(0, len(prompts), batch_size):
        hi = min(lo + batch_size, len(prompts))
        with torch.no_grad():
            cond = encode_text(m, prompts[lo:hi])
            uncond = encode_text(m, negatives[lo:hi]) if guidance_scale > 1.0 else None
        eps_model = guided_eps_model(m, cond, uncond, guidance_scale)

        trace = getattr(m, "_trace", None)
        if trace is not None:
            trace.begin_images(lo)

        def step_callback(info: dict, first: int = lo) -> bool:
            if bar is not None:
                bar.update(hi - first)
            if trace is not None:
                trace.end_step(info)
            nonlocal stopped
            stopped = callback is not None and callback({**info, "images": range(first, hi)}) is True
            return stopped

        generator = generators[lo] if hi - lo == 1 else generators[lo:hi]
        with torch.no_grad():
            latents = plan.sample(eps_model, start_latents[lo:hi], generator=generator, callback=step_callback)
        finished.append(latents)
        if stopped:
            break
    if bar is not None:
        bar.close()
    return torch.cat(finished)


def generate(
    m: "StableDiffusion",
    prompt: str | list[str],
    negative_prompt: str | list[str] = "",
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "pndm",
    seed: int | None = None,
    width: int = 512,
    height: int = 512,
    num_images: int = 1,
    latents: torch.Tensor | None = None,
    output_type: str = "pil",
    callback: Callable[[dict], bool | None] | None = None,
    karras: bool = False,
    eta: float = 0.0,
    batch_size: int = 1,
    progress: bool = False,
):
    """Text-to-image. Returns a list of PIL images, or a float array (N, H, W, 3) in [0, 1] ("np"), or the
    final latents (N, 4, H/8, W/8), unscaled by 0.18215 ("latent"); N = len(prompts) × num_images, in
    prompt order. PIL images carry their settings in `image.info["sd15"]` (a GenerationSettings).

    `latents` replaces the seeded initial noise (unit variance, (N, 4, H/8, W/8)); `callback(info)` is
    called after every step with {"i", "t", "sigma", "x", "denoised", "images"} and stops the run by
    returning True (the images finished so far, and the current one as it stands, are returned).
    """
    check_settings(steps, guidance_scale, sampler, width, height, num_images)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    prompts, negatives = _prompt_lists(prompt, negative_prompt, num_images)
    seed = secrets.randbelow(2**32) if seed is None else int(seed)
    generators = _generators(seed, len(prompts))
    f = m.vae.downscale_factor
    shape = (m.unet.config.out_channels, height // f, width // f)
    if latents is None:
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])  # (N, 4, h, w) on the CPU
    else:
        noise = latents.float().cpu()
        if noise.shape != (len(prompts), *shape):
            raise ValueError(f"latents must have shape {(len(prompts), *shape)}, got {tuple(noise.shape)}")
    plan = plan_sampling(sampler, steps, karras=karras, eta=eta)
    start = plan.noise_latents(noise).to(m.device)
    result = _run(m, plan, prompts, negatives, start, generators, guidance_scale, batch_size, callback, progress)
    out = _finish(m, result, output_type)
    if output_type == "pil":
        for i, image in enumerate(out):
            image.info["sd15"] = GenerationSettings(
                prompts[i], negatives[i], steps, guidance_scale, sampler, seed + i, width, height, karras, eta
            )
    return out


def img2img(
    m: "StableDiffusion",
    image,
    prompt: str | list[str],
    strength: float = 0.75,
    negative_prompt: str | list[str] = "",
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "pndm",
    seed: int | None = None,
    num_images: int = 1,
    output_type: str = "pil",
    callback: Callable[[dict], bool | None] | None = None,
    karras: bool = False,
    eta: float = 0.0,
    fit: str = "resize",
    batch_size: int = 1,
    progress: bool = False,
):
    """Image-to-image (SDEdit, Meng et al. 2022): encode the image, noise it to the timestep that
    `strength` selects (1.0 = pure noise, 0.0 = unchanged), and denoise the last int(steps · strength)
    steps. `image`: a PIL image, an array, or a (1, 3, H, W) tensor in [-1, 1]; sides that are not
    multiples of 8 are brought to one by `fit` ("resize" or "crop", see sd15.images).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    pixels = image_io.to_tensor(image, fit)  # (1, 3, H, W) in [-1, 1]
    if pixels.shape[0] != 1:
        raise ValueError("img2img takes one image; call it once per image")
    height, width = pixels.shape[-2:]
    check_settings(steps, guidance_scale, sampler, width, height, num_images)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    prompts, negatives = _prompt_lists(prompt, negative_prompt, num_images)
    seed = secrets.randbelow(2**32) if seed is None else int(seed)
    generators = _generators(seed, len(prompts))
    plan = plan_sampling(sampler, steps, strength=strength, karras=karras, eta=eta)
    with torch.no_grad():
        posterior = m.vae.encode(pixels.to(m.device, m.dtype))
    starts = []
    for g in generators:  # per image: its VAE sample, then its noise, from its own generator
        init = posterior.sample(g).float().cpu() * LATENT_SCALE  # (1, 4, h, w)
        noise = torch.randn(init.shape, generator=g)
        starts.append(plan.noise_latents(noise, init))
    start = torch.cat(starts).to(m.device)
    result = _run(m, plan, prompts, negatives, start, generators, guidance_scale, batch_size, callback, progress)
    out = _finish(m, result, output_type)
    if output_type == "pil":
        for i, im in enumerate(out):
            im.info["sd15"] = GenerationSettings(
                prompts[i], negatives[i], steps, guidance_scale, sampler, seed + i, width, height, karras, eta, strength
            )
    return out
