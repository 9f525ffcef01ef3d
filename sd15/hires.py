"""High-resolution fix: compose at the model's native size, then add detail at a larger one.

SD1.5 was trained at 512×512; asked directly for 1024×1024 it repeats its subject (two heads, tiled
landscapes) because each 512-pixel window composes on its own. The web UI's "hires. fix" avoids that:

    pass 1: text-to-image at width × height (512 × 512 by default)        -> latents (N, 4, h, w)
    upscale ×scale (sides rounded to multiples of 8):
        "lanczos": decode, Lanczos-resize the pixels, encode (the VAE tiles itself when the image is large)
        "latent":  resize the latents bilinearly (faster, softer; needs strength >= 0.5 or it stays blurry)
    pass 2: image-to-image from those latents at `strength`: exactly `hires_steps` steps (default: `steps`), the
            last hires_steps of a schedule of int(hires_steps / strength) steps, as the web UI runs its second pass
            (where plain img2img runs int(steps · strength) of `steps`)

Prompt editing's timeline goes on into the second pass, as in the web UI since 1.6: `[a:b:1.5]` or, with 20
steps, `[a:b:25]` switch halfway through a 10-step second pass (sd15.prompt_schedule).

Each pass draws from image i's seed (seed + i, see sd15.seeds) anew, as the web UI's hires fix makes a new
generator for its second pass: the second pass's noise is the seed's first draw at the upscaled size, and its
sampler's noise the draws after it (the Lanczos upscaler's VAE sample goes on from the first pass's generator).
So a seed gives the same image whatever the batch. The callback sees both passes; its info has "pass": 1 or 2.

With a ControlNet both passes are steered, each by the control image brought to its own size: the first pass's
hint is the control image at width × height, the second's the same control image (not the first hint
enlarged) at the upscaled size, as the web UI's ControlNet extension prepares its `hr_hint_cond`. The scale,
start and end are the same in both; the second pass's start and end count its own steps, as img2img's do.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from . import controlnet as controlnet_io
from . import images as image_io
from . import pipeline, tiling
from .samplers import plan_sampling, resolve_schedule, takes_schedule_types
from .seamless import takes_seamless
from .vae import LATENT_SCALE

if TYPE_CHECKING:
    from .model import StableDiffusion

UPSCALERS = ("lanczos", "latent")


def upscaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's size: width · scale and height · scale, each rounded down to a multiple of 8 (as the web
    UI: 512 × 1.15 is 584)."""
    return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)


def second_pass_plan(sampler: str, hires_steps: int, strength: float, karras: bool = False, eta: float = 0.0,
                     schedule_type: str | None = None, discard_penultimate_sigma: bool = False):  # fmt: skip
    """The second pass's SamplingPlan: the last `hires_steps` steps of an int(hires_steps / strength)-step
    schedule (strength capped at 0.999, as the web UI's setup_img2img_steps does), so that it runs exactly
    `hires_steps` steps from about `strength`'s noise level."""
    total = int(hires_steps / min(strength, 0.999))
    if total > 1000:
        why = "more than the model's 1000 timesteps"
    else:
        try:
            plan = plan_sampling(sampler, total, karras=karras, eta=eta, schedule_type=schedule_type,
                                 discard_penultimate_sigma=discard_penultimate_sigma)  # fmt: skip
            return dataclasses.replace(plan, start=plan.steps - hires_steps)  # plan.steps: ddim_uniform's own count
        except ValueError as e:  # e.g. PLMS's grid at 1000 steps
            why = f"which {sampler} cannot run ({e})"
    raise ValueError(f"{hires_steps} hires steps at strength {strength:g} need a {total}-step schedule, {why}; "
                     "raise the strength or lower the hires steps")  # fmt: skip


def upscale_latents(m: "StableDiffusion", latents: torch.Tensor, width: int, height: int, upscaler: str, generators) -> torch.Tensor:
    """Scaled latents (N, 4, h, w) -> scaled latents (N, 4, height/8, width/8), by `upscaler` (see the module)."""
    f = m.vae.downscale_factor
    if upscaler == "latent":
        return F.interpolate(latents.float(), size=(height // f, width // f), mode="bilinear", align_corners=False)
    out = []
    with torch.no_grad():
        for z, g in zip(latents, generators):
            image = image_io.to_pil(pipeline.decode_latents(m, z[None] / LATENT_SCALE))[0]
            big = image_io.to_tensor(image.resize((width, height), Image.LANCZOS))  # (1, 3, height, width)
            posterior = tiling.encode(m.vae, big.to(m.device, m.dtype))
            out.append(posterior.sample(g).float() * LATENT_SCALE)
    return torch.cat(out)


def second_pass_settings(sampler: str, guidance_scale: float, karras: bool, schedule_type: str | None, eta: float,
                         hires_sampler: str | None = None, hires_schedule_type: str | None = None,
                         hires_guidance_scale: float | None = None, discard_penultimate_sigma: bool = False) -> dict:  # fmt: skip
    """The second pass's sampler, guidance scale, schedule (karras, schedule_type, discard_penultimate_sigma) and
    DDIM eta: the hires ones where given, else the first pass's. A schedule the first pass had but the hires sampler
    cannot take (ddim, pndm, lcm) is dropped, as the web UI applies none to them; one asked for the hires pass is
    checked."""
    second = hires_sampler or sampler
    if hires_schedule_type is not None:
        name = resolve_schedule(False, hires_schedule_type)
        karras, schedule_type = name == "karras", None if name in ("default", "karras") else name
    elif not takes_schedule_types(second):
        karras, schedule_type = False, None
    return dict(sampler=second, guidance_scale=guidance_scale if hires_guidance_scale is None else hires_guidance_scale,
                karras=karras, schedule_type=schedule_type, eta=eta if second == "ddim" else 0.0,
                discard_penultimate_sigma=discard_penultimate_sigma and takes_schedule_types(second))  # fmt: skip


def _second_pass_texts(texts: list[str], given, num_images: int) -> list[str]:
    """One prompt (or negative prompt) per image for the second pass: the first pass's, or `given` (one text for
    all, or one per prompt, each for its num_images images)."""
    if given is None:
        return texts
    given = [given] * (len(texts) // num_images) if isinstance(given, str) else list(given)
    if len(given) * num_images != len(texts):
        raise ValueError(f"a hires prompt is one text or one per prompt ({len(texts) // num_images}), got {len(given)}")
    return [text for text in given for _ in range(num_images)]


def check_hires_settings(width, height, scale, strength, steps, hires_steps, upscaler, sampler, guidance_scale=7.5,
                         num_images=1, karras: bool = False, schedule_type: str | None = None,
                         discard_penultimate_sigma: bool = False) -> tuple[int, int, int]:  # fmt: skip
    """Refuse a second pass that cannot run, before anything is loaded; returns its width, height and steps.
    `sampler`, `guidance_scale` and the schedule are the second pass's (`second_pass_settings`)."""
    if upscaler not in UPSCALERS:
        raise ValueError(f"upscaler must be one of {UPSCALERS}, got {upscaler!r}")
    if not 1.0 <= scale <= 4.0:
        raise ValueError(f"the hires scale must be between 1 and 4, got {scale!r}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"the hires strength must be in (0, 1], got {strength!r}")
    hires_steps = hires_steps or steps  # 0, the web UI's "same as steps", too
    big_w, big_h = upscaled_size(width, height, scale)
    pipeline.check_settings(hires_steps, guidance_scale, sampler, big_w, big_h, num_images, karras=karras, schedule_type=schedule_type)
    second_pass_plan(sampler, hires_steps, strength, karras=karras, schedule_type=schedule_type,
                     discard_penultimate_sigma=discard_penultimate_sigma)  # a schedule the sampler cannot run
    return big_w, big_h, hires_steps


@takes_seamless
def hires_fix(
    m: "StableDiffusion",
    prompt: str | list[str],
    negative_prompt: str | list[str] = "",
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "pndm",
    seed: int | None = None,
    width: int = 512,
    height: int = 512,
    scale: float = 2.0,
    strength: float = 0.5,
    hires_steps: int | None = None,
    upscaler: str = "lanczos",
    num_images: int = 1,
    output_type: str = "pil",
    callback: Callable[[dict], bool | None] | None = None,
    karras: bool = False,
    eta: float = 0.0,
    schedule_type: str | None = None,
    batch_size: int = 1,
    progress: bool = False,
    clip_skip: int = 1,
    pad_conds: bool = False,
    controlnet=None,
    control_image=None,
    controlnet_conditioning_scale: float | list[float] = 1.0,
    control_guidance_start: float | list[float] = 0.0,
    control_guidance_end: float | list[float] = 1.0,
    guess_mode: bool = False,
    variation_seed: int | None = None,
    variation_strength: float = 0.0,
    seed_resize_from: tuple[int, int] | None = None,
    eta_noise_seed_delta: int = 0,
    seamless: bool = False,
    hires_sampler: str | None = None,
    hires_schedule_type: str | None = None,
    hires_prompt: str | list[str] | None = None,
    hires_negative_prompt: str | list[str] | None = None,
    hires_guidance_scale: float | None = None,
    discard_penultimate_sigma: bool = False,
    rng: str = "cpu",
):
    """Text-to-image at width × height, upscaled by `scale` and refined by image-to-image at `strength`.

    Returns what `generate` returns, at the upscaled size. PIL images carry `info["sd15"]` (the first pass's
    settings, with `strength` the second pass's) and `info["sd15_hires"]` ({"scale", "steps", "upscaler",
    "width", "height"}).

    ControlNet arguments as sd15.pipeline.generate's, for both passes: each pass gets the control image resized
    to its own size (see the module docstring). A control image given as floats (an array or a tensor) is never
    resized, so it cannot fit both passes: give a PIL image or a uint8 array.

    The seed arguments as generate's (sd15.seeds); a variation and a seed resize steer both passes' noise, as the
    web UI's hires fix does, and with an eta noise seed delta everything drawn after the first noise comes from
    the seed + delta generators.

    The second pass may run its own sampler (`hires_sampler`; its schedule `hires_schedule_type`, else the first
    pass's where the sampler takes one), prompt and negative prompt (`hires_prompt`, `hires_negative_prompt`: one
    text, or one per prompt) and guidance scale (`hires_guidance_scale`), as the web UI's Hires sampler, Hires
    schedule type, Hires prompt, Hires negative prompt and Hires CFG Scale; None: the first pass's.
    """
    pipeline.check_settings(steps, guidance_scale, sampler, width, height, num_images, seed=seed, eta=eta, batch_size=batch_size)
    pipeline.check_prompts(prompt, negative_prompt)
    second = second_pass_settings(sampler, guidance_scale, karras, schedule_type, eta, hires_sampler, hires_schedule_type,
                                  hires_guidance_scale, discard_penultimate_sigma)  # fmt: skip
    pipeline.check_prompts(*(t for t in (hires_prompt, hires_negative_prompt) if t is not None))
    big_w, big_h, hires_steps = check_hires_settings(width, height, scale, strength, steps, hires_steps, upscaler,
                                                     second["sampler"], second["guidance_scale"], num_images,
                                                     karras=second["karras"], schedule_type=second["schedule_type"],
                                                     discard_penultimate_sigma=second["discard_penultimate_sigma"])  # fmt: skip
    if output_type not in pipeline.OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {pipeline.OUTPUT_TYPES}, got {output_type!r}")
    control = (controlnet, control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end)
    small_controls = controlnet_io.prepare_controls(m, *control, width, height, guess_mode)  # both checked before pass 1
    big_controls = controlnet_io.prepare_controls(m, *control, big_w, big_h, guess_mode)
    prompts, negatives = pipeline._prompt_lists(prompt, negative_prompt, num_images)
    prompts2, negatives2 = _second_pass_texts(prompts, hires_prompt, num_images), _second_pass_texts(negatives, hires_negative_prompt, num_images)
    seeds = pipeline.noise_seeds(m, seed, len(prompts), variation_seed, variation_strength, seed_resize_from,
                                 eta_noise_seed_delta, rng=rng)  # fmt: skip
    generators = seeds.generators()
    f = m.vae.downscale_factor
    channels = m.unet.config.out_channels

    def tagged(n: int):
        return None if callback is None else (lambda info: callback({**info, "pass": n}))

    stopped = []

    def first_callback(info):
        result = callback({**info, "pass": 1}) if callback is not None else None
        if result is True:
            stopped.append(True)
        return result

    plan = plan_sampling(sampler, steps, karras=karras, eta=eta, schedule_type=schedule_type,
                         discard_penultimate_sigma=discard_penultimate_sigma)  # fmt: skip
    noise = torch.stack([seeds.first_noise(i, g, (channels, height // f, width // f)) for i, g in enumerate(generators)])
    generators = seeds.sampler_generators(generators)
    latents = pipeline._run(m, plan, prompts, negatives, plan.noise_latents(noise).to(m.device), generators, guidance_scale,
                            batch_size, first_callback, progress, clip_skip=clip_skip, controls=small_controls,
                            guess_mode=guess_mode, pad_conds=pad_conds)  # fmt: skip
    if not stopped:
        init = upscale_latents(m, latents, big_w, big_h, upscaler, generators).cpu()  # (N, 4, H/8, W/8)
        plan = second_pass_plan(second["sampler"], hires_steps, strength, karras=second["karras"], eta=second["eta"],
                                schedule_type=second["schedule_type"],
                                discard_penultimate_sigma=second["discard_penultimate_sigma"])  # fmt: skip
        generators = seeds.generators()  # anew from each image's seed, as the web UI's second pass draws
        noise = torch.cat([seeds.first_noise(i, g, (1, *init.shape[1:])) for i, g in enumerate(generators)])
        generators = seeds.sampler_generators(generators)
        start = plan.noise_latents(noise, init).to(m.device)
        latents = pipeline._run(m, plan, prompts2, negatives2, start, generators, second["guidance_scale"], batch_size, tagged(2),
                                progress, clip_skip=clip_skip, controls=big_controls, guess_mode=guess_mode,
                                base_steps=steps, pad_conds=pad_conds)  # fmt: skip
    out = pipeline._finish(m, latents, output_type)
    if output_type == "pil":
        pipeline.record_settings(m, out, prompts, negatives, seeds, steps=steps, guidance_scale=guidance_scale,
                                 sampler=sampler, width=width, height=height, **pipeline.schedule_fields(karras, schedule_type), eta=eta,
                                 strength=strength, clip_skip=clip_skip, pad_conds=pad_conds, seamless=seamless,
                                 discard_penultimate_sigma=discard_penultimate_sigma, hires_scale=scale, hires_steps=hires_steps,
                                 hires_upscaler=upscaler, controlnets=controlnet_io.settings_record(small_controls, guess_mode))  # fmt: skip
        for i, im in enumerate(out):
            im.info["sd15_hires"] = {"scale": scale, "steps": hires_steps, "upscaler": upscaler, "width": big_w, "height": big_h}
            im.info["sd15"] = dataclasses.replace(
                im.info["sd15"],  # the second pass's own settings, where they are not the first's
                hires_sampler=hires_sampler if hires_sampler not in (None, sampler) else None,
                hires_schedule_type=hires_schedule_type,
                hires_prompt=prompts2[i] if prompts2[i] != prompts[i] else None,
                hires_negative_prompt=negatives2[i] if negatives2[i] != negatives[i] else None,
                hires_guidance_scale=hires_guidance_scale if hires_guidance_scale not in (None, guidance_scale) else None,
            )
    return out
