"""Text-to-image and image-to-image: prompts and noise in, images out.

    prompt ──tokenizer──> ids (B, 77) ──text_encoder──> context (B, 77, 768)      (and the same for the
                                                                                   negative prompt, "" by default)
        a prompt past 75 tokens: k chunks of 77, context (B, 77·k, 768); emphasis, textual inversion,
        <lora:…> tags and CLIP skip as the AUTOMATIC1111 web UI reads them (sd15.prompts, docs/prompting.md)
    seed ──CPU generator──> noise (B, 4, H/8, W/8)   [img2img: VAE-encoded image, noised to the start step]
    sampler loop: eps = eps_u + s · (eps_c - eps_u), the UNet run once on [uncond; cond]   (classifier-free
                  guidance, Ho & Salimans 2022; once on each when they differ in length)
    latents / 0.18215 ──VAE decoder──> image (B, 3, H, W) in [-1, 1] -> PIL / numpy

Reproducibility: image i of a call gets its own CPU generator seeded with seed + i, for its initial noise,
its VAE sample (img2img) and its sampler noise (ancestral and SDE samplers). Images are denoised one at a
time by default (`batch_size=1`), so on the CPU an image is bit-identical whatever `num_images` is; a larger
`batch_size` is faster on a GPU, and changes results only in the last bits of floating-point rounding.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from . import controlnet as controlnet_io
from . import images as image_io
from . import lora as lora_io
from . import prompt_schedule
from . import prompts as prompt_io
from . import safety_checker as safety
from . import tiling
from .samplers import SAMPLERS, plan_sampling, resolve_schedule
from .seamless import takes_seamless
from .seeds import SEED_RANGE, NoiseSeeds, check_noise_settings
from .vae import LATENT_SCALE

if TYPE_CHECKING:
    from .model import StableDiffusion

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_PIXELS = 4096 * 4096  # refuse absurd sizes before allocating anything
MAX_IMAGES = 10_000  # per call: more is a batch job (sd15 batch), which also resumes after a stop


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
    clip_skip: int = 1  # 1: CLIP's last layer; 2: the penultimate one
    ti_hashes: dict[str, str] = field(default_factory=dict)  # textual inversions the prompts use: {name: hash}
    lora_hashes: dict[str, str] = field(default_factory=dict)  # LoRAs in effect: {name: hash}
    hires_scale: float | None = None  # hires fix (sd15.hires): the upscale factor; `strength` is its second pass's
    hires_steps: int | None = None
    hires_upscaler: str | None = None  # "lanczos" or "latent"
    mask_blur: float | None = None  # inpainting (sd15.inpaint)
    inpaint_padding: int | None = None  # inpainting "only masked": the margin around the mask's box
    # One {"model", "hash", "weight", "guidance_start", "guidance_end"} per ControlNet (sd15.controlnet.settings_record)
    controlnets: list[dict] = field(default_factory=list)
    schedule_type: str | None = None  # a noise schedule other than the sampler's own and Karras: "exponential"
    pad_conds: bool = False  # the prompt and negative prompt padded to one length (the web UI's "Pad conds")
    # how the seed's noise was steered (sd15.seeds): toward a variation seed's, from another size's, ENSD
    variation_seed: int | None = None
    variation_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None  # (width, height)
    eta_noise_seed_delta: int = 0
    seamless: bool = False  # circular padding: an image that tiles (the web UI's "Tiling", sd15.seamless)
    # a hires fix's second pass, where it differs from the first (sd15.hires)
    hires_sampler: str | None = None
    hires_schedule_type: str | None = None
    hires_prompt: str | None = None
    hires_negative_prompt: str | None = None
    hires_guidance_scale: float | None = None
    discard_penultimate_sigma: bool = False  # the web UI's for DPM2 (sd15.samplers.plan_sampling)
    rng: str = "cpu"  # where the noise comes from: torch's CPU generator, or CUDA's ("nv", sd15.seeds)


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite(value) -> bool:
    """A real number, not a bool, finite as a float (10**400 is not: it has no float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_settings(steps: int, guidance_scale: float, sampler: str, width: int, height: int, num_images: int = 1, *,
                   seed: int | None = None, eta: float = 0.0, batch_size: int = 1, karras: bool = False,
                   schedule_type: str | None = None):  # fmt: skip
    """Refuse impossible settings with a message that says what to change, before anything is allocated."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if not _whole(steps) or steps < 1 or steps > 1000:
        raise ValueError(f"steps must be a whole number from 1 to 1000, got {steps!r}")
    # grids that break at the top of that range; Karras (or another schedule) where it has no meaning
    plan_sampling(sampler, steps, karras=bool(karras), schedule_type=schedule_type)
    if not _finite(guidance_scale):
        raise ValueError(f"guidance scale must be a finite number, got {guidance_scale!r:.40}")
    for name, side in (("width", width), ("height", height)):
        if not _whole(side) or side < 8 or side % 8:
            raise ValueError(f"{name} must be a positive multiple of 8 pixels, got {side!r}")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}×{height} is larger than sd15 allows ({MAX_PIXELS} pixels); SD1.5 works best near 512×512")
    if not _whole(num_images) or num_images < 1 or num_images > MAX_IMAGES:
        raise ValueError(f"the number of images must be a whole number from 1 to {MAX_IMAGES}, got {num_images!r}")
    if not _whole(batch_size) or batch_size < 1:
        raise ValueError(f"batch size must be a whole number of at least 1, got {batch_size!r}")
    if seed is not None and (not _whole(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1] - (num_images - 1)):
        raise ValueError(f"seed must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]} (image i uses seed + i), "
                         f"got {seed!r}")  # fmt: skip
    if not _finite(eta) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number from 0 (DDIM) to 1 (as random as DDPM), got {eta!r}")


def given_latents(latents, shape: tuple[int, ...]) -> torch.Tensor:
    """The caller's starting noise (a tensor or array of `shape`), as float32 on the CPU, checked to be finite
    (NaN noise would run every step and end in a NumericsError)."""
    if not isinstance(latents, torch.Tensor):
        if type(latents).__module__ != "numpy":
            raise ValueError(f"latents must be a tensor of shape {shape}, got {type(latents).__name__}")
        latents = torch.from_numpy(latents)
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
    noise = latents.float().cpu()
    if not torch.isfinite(noise).all():
        raise ValueError("latents hold NaN or infinite values; give finite noise (unit variance)")
    return noise


def check_prompts(*prompts) -> None:
    """Each argument a prompt or a list of prompts: text that a PNG can record (UTF-8), whose prompt-editing
    brackets parse (sd15.prompt_schedule), refused before the run rather than after it."""
    for group in prompts:
        for text in [group] if isinstance(group, str) else group if isinstance(group, (list, tuple)) else [group]:
            if not isinstance(text, str):
                raise ValueError(f"a prompt must be text (a str), got {type(text).__name__} {text!r:.60}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(f"prompt {text!r:.60} holds {text[error.start]!r}, which is not a Unicode character "
                                 f"(a lone surrogate, from bytes that are not UTF-8); give the prompt as UTF-8") from None  # fmt: skip
            if "[" in text:  # prompt editing's syntax errors (nesting too deep) before the run, not at its first step
                prompt_schedule.parse(text)


def _prompt_lists(prompt, negative_prompt, num_images: int) -> tuple[list[str], list[str]]:
    """One prompt and one negative prompt per image, prompt-major: [p0, p0, …, p1, p1, …]."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if not prompts or len(negatives) != len(prompts):
        raise ValueError("give at least one prompt, and one negative prompt or one per prompt")
    repeat = lambda items: [x for x in items for _ in range(num_images)]  # noqa: E731
    return repeat(prompts), repeat(negatives)


def encode_text(m: "StableDiffusion", prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """Prompts -> context (B, 77·k, D) on the model's device and dtype: k = 1 for prompts of up to 75
    tokens, one more per further 75 (emphasis, BREAK, textual inversion: see sd15.prompts)."""
    return prompt_io.encode_prompts(m, prompts, clip_skip)


def guided_eps_model(m: "StableDiffusion", cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float,
                     concat=None, control=None):  # fmt: skip
    """eps(x, t) with classifier-free guidance: eps_u + s · (eps_c - eps_u), one UNet call on [uncond; cond]
    when the two have as many tokens, else one call each (as the web UI does unless it pads them).

    With s <= 1 the unconditional branch is skipped (as diffusers does) and eps = eps_c. `concat` (B, C', h, w),
    if given, is appended to x's channels at every call (the inpainting UNet's mask and masked-image latents).
    `control(x, t, context, part)`, if given, returns the ControlNet residuals of that UNet call (or None);
    it sees x without `concat` (ControlNets take the 4 latent channels); `part` says which branches the call
    holds: "both" ([uncond; cond]), "cond" or "uncond".
    """
    guided = guidance_scale > 1.0
    together = guided and uncond.shape[1] == cond.shape[1]
    # one context tensor per branch for the whole run, so that the fast path computes its cross-attention k/v once
    both = torch.cat([uncond, cond]) if together else None  # (2B, T, D)

    def unet(x_in: torch.Tensor, t_in: torch.Tensor, part: str) -> torch.Tensor:
        context = {"both": both, "cond": cond, "uncond": uncond}[part]
        residuals = control(x_in, t_in, context, part) if control is not None else None
        if concat is not None:
            extra = concat.to(x_in).repeat(x_in.shape[0] // concat.shape[0], 1, 1, 1)
            x_in = torch.cat([x_in, extra], dim=1)  # (B, 4 + C', h, w)
        trace = getattr(m, "_trace", None)  # sd15.hooks: which branches the UNet's points see
        if trace is not None:
            trace.branch = part if guided else None
        try:
            if residuals is None:
                return m.unet(x_in, t_in, context)
            down, mid = residuals  # sd15.cuda_graphs gives them static buffers: such calls replay a graph too
            return m.unet(x_in, t_in, context, down_residuals=down, mid_residual=mid)
        finally:
            if trace is not None:
                trace.branch = None

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in, t_in = x.to(m.dtype), t.to(m.device)
        trace = getattr(m, "_trace", None)  # sd15.hooks: records the two branches when asked to
        if not guided:
            eps = unet(x_in, t_in, "cond").to(x.dtype)
            return trace.visit("step.eps", eps) if trace is not None and trace.wants("step.eps") else eps
        if together:
            eps_u, eps_c = unet(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), "both").chunk(2)
        else:
            eps_u, eps_c = unet(x_in, t_in, "uncond"), unet(x_in, t_in, "cond")
        eps = (eps_u + guidance_scale * (eps_c - eps_u)).to(x.dtype)
        if trace is not None:
            for name, value in (("step.eps_uncond", eps_u), ("step.eps_cond", eps_c), ("step.eps", eps)):
                if trace.wants(name):
                    trace.visit(name, value)
        return eps

    return eps_model


def schedule_fields(karras: bool, schedule_type: str | None) -> dict:
    """The GenerationSettings fields of a noise schedule: `karras` for Karras's, `schedule_type` for any other
    but the sampler's own (so that settings, PNGs and batch ids without one are what they were)."""
    name = resolve_schedule(karras, schedule_type)
    return {"karras": name == "karras", "schedule_type": None if name in ("default", "karras") else name}


def record_settings(m: "StableDiffusion", images, prompts: list[str], negatives: list[str], noise: NoiseSeeds,
                    controlnets=(), **fields) -> None:  # fmt: skip
    """Attach to each PIL image the GenerationSettings its PNG will record (image i: prompts[i], its seed and
    variation seed), with the LoRAs and textual inversions its prompt used, and the ControlNets of the run."""
    for i, image in enumerate(images):
        image.info["sd15"] = GenerationSettings(
            prompt=lora_io.recorded_prompt(m, prompts[i]), negative_prompt=negatives[i], **noise.record(i),
            **fields, **prompt_io.adapter_hashes(m, prompts[i], negatives[i]), controlnets=list(controlnets),
        )  # fmt: skip


def noise_seeds(m, seed: int | None, n: int, variation_seed: int | None = None, variation_strength: float = 0.0,
                seed_resize_from=None, eta_noise_seed_delta: int = 0, latents=None, rng: str = "cpu") -> NoiseSeeds:  # fmt: skip
    """The checked seeds of a call's n images and how their noise is drawn and steered (sd15.seeds)."""
    check_noise_settings(seed, n, variation_seed, variation_strength, seed_resize_from, eta_noise_seed_delta,
                         latents_given=latents is not None, rng=rng)  # fmt: skip
    return NoiseSeeds.make(seed, n, variation_seed, variation_strength, seed_resize_from, eta_noise_seed_delta,
                           downscale=m.vae.downscale_factor, rng=rng)  # fmt: skip


class NumericsError(ValueError):
    """A model produced NaN or infinite values; no image is returned for it."""


def decode_latents(m: "StableDiffusion", z: torch.Tensor) -> torch.Tensor:
    """VAE decode of unscaled latents, guarded: a half-precision decode that overflows (the well-known
    black-image failure of SD's VAE in fp16) is retried in fp32 with a warning; NaN/Inf is never returned."""
    images = tiling.decode(m.vae, z.to(m.dtype))  # in tiles when the image would not fit in memory at once
    if torch.isfinite(images).all():
        return images
    dtype = next(m.vae.parameters()).dtype
    if dtype != torch.float32:
        warnings.warn(f"the VAE overflowed in {dtype} (NaN/Inf in the image); decoding again in float32")
        m.vae.float()  # converting back afterwards is exact: every half value is a float32 value
        try:
            images = tiling.decode(m.vae, z.float())
        finally:
            m.vae.to(dtype)
        if torch.isfinite(images).all():
            return images
    raise NumericsError("the VAE decoder produced NaN/Inf values even in float32; the checkpoint's VAE may be damaged")


def _finish(m: "StableDiffusion", latents: torch.Tensor, output_type: str, composite=None):
    """Latents -> the output type: decode, `composite(images)` (inpainting's paste-back), then the safety
    checker when the model has one (a flagged image becomes black; PIL images get `info["nsfw"]`)."""
    if not torch.isfinite(latents).all():
        raise NumericsError(
            f"the UNet produced NaN/Inf latents (model dtype {m.dtype}); try --dtype fp32 or bf16, a lower "
            "guidance scale, or check the checkpoint"
        )
    if output_type == "latent":
        return latents
    with torch.no_grad():
        decoded = torch.cat([decode_latents(m, z[None] / LATENT_SCALE) for z in latents])
        if composite is not None:
            decoded = composite(decoded)
        decoded, nsfw = safety.censor(getattr(m, "safety_checker", None), decoded)
    if output_type == "np":
        return image_io.to_numpy(decoded)
    images = image_io.to_pil(decoded)
    for image, flagged in zip(images, nsfw or []):
        image.info["nsfw"] = flagged
    return images


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", leave=False)


def _run(m, plan, prompts, *args, clip_skip: int = 1, concat=None, on_predictor=None, controls=(), guess_mode=False,
         base_steps=None, pad_conds=False):  # fmt: skip
    """`_denoise` with the LoRAs the prompts name (`<lora:name:scale>`) applied for its duration. `base_steps`:
    in a hires fix's second pass, the first pass's steps, after which prompt editing's timeline goes on.
    `pad_conds`: pad with the encoding of "", made before those LoRAs apply (the web UI's, made at load time)."""
    with torch.no_grad():
        pad_with = prompt_io.encode_prompts(m, [""], clip_skip) if pad_conds else None
    with lora_io.prompt_loras(m, prompts):
        return _denoise(m, plan, prompts, *args, clip_skip=clip_skip, concat=concat, on_predictor=on_predictor,
                        controls=controls, guess_mode=guess_mode, base_steps=base_steps, pad_with=pad_with)  # fmt: skip


def _encoded_schedules(m, texts: list[str], steps: int, base_steps, clip_skip: int) -> dict[str, tuple[list[int], torch.Tensor]]:
    """{text: (last step of each stretch, contexts (S, 77·k, D))} for each distinct prompt of `texts`: its
    stretches' texts (sd15.prompt_schedule) encoded together, once, as the web UI does."""
    encoded = {}
    for text in dict.fromkeys(texts):
        stretches = prompt_schedule.schedule(text, steps, base_steps)
        counts = prompt_schedule.encoding_counts(text, steps, base_steps)
        distinct = list(dict.fromkeys(t for _, t in stretches))  # alternation comes back to a text: encoded once
        with torch.no_grad():
            contexts = prompt_io.encode_schedule(m, distinct, clip_skip, [counts.get(t, 1) for t in distinct])
        encoded[text] = ([last for last, _ in stretches], contexts[[distinct.index(t) for _, t in stretches]])
    return encoded


def _conditioning_at(encoded: dict, texts: list[str], step: int) -> torch.Tensor:
    """The batch's context (B, T, D) at `step`: each text's stretch holding it, stacked (sd15.prompts.stack_contexts)."""
    rows = []
    for text in texts:
        ends, contexts = encoded[text]
        rows.append(contexts[next((i for i, last in enumerate(ends) if step <= last), len(ends) - 1)])
    return prompt_io.stack_contexts(rows)


def _scheduled_eps_model(m, plan, prompts, negatives, guidance_scale, clip_skip, concat, controls=(), guess_mode=False,
                         base_steps=None, pad_with=None):  # fmt: skip
    """The guided eps model for a batch, with the conditioning its prompts ask for at each step: one context
    for plain prompts; for prompt editing and alternation (sd15.prompt_schedule) one per stretch of steps,
    each encoded once; and the residuals of the ControlNets (`controls`) active at that step. The prompt and
    the negative prompt keep their own lengths unless `pad_with` (the encoding of "", sd15.prompts.pad_pair) is
    given. Returns it and a one-item list the step callback keeps at the number of sampler evaluations done.

    PLMS (pndm) evaluates its first step twice (the warm-up's correction), so it makes one evaluation more than
    it has steps: evaluations 0 and 1 are step 1, evaluation k > 1 is step k. Prompt editing counts steps, as
    its syntax says; the ControlNets' start and end count evaluations, as diffusers' `controlnet_keep` does."""
    steps = plan.steps - plan.start
    evaluations = len(plan.timesteps) - plan.start  # = steps, + 1 for PLMS
    extra = evaluations - steps
    evaluations_done = [0]
    guided = guidance_scale > 1.0

    def control(x, t, context, part):
        return controlnet_io.residuals(controls, x, t, context, part, evaluations_done[0], evaluations, guess_mode)

    encoded = _encoded_schedules(m, prompts + (negatives if guided else []), steps, base_steps, clip_skip)
    ends = sorted({last for text in prompts + (negatives if guided else []) for last in encoded[text][0]})
    stretches = []
    for last in ends:  # a new stretch wherever any prompt of the batch changes
        cond = _conditioning_at(encoded, prompts, last)
        uncond = _conditioning_at(encoded, negatives, last) if guided else None
        if guided and pad_with is not None:
            cond, uncond = prompt_io.pad_pair(cond, uncond, pad_with)
        stretches.append((last, guided_eps_model(m, cond, uncond, guidance_scale, concat, control if controls else None)))

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        steps_done = max(evaluations_done[0] - extra, 0)  # the stretch holding step steps_done + 1
        model = next((model for last, model in stretches if steps_done < last), stretches[-1][1])
        return model(x, t)

    return eps_model, evaluations_done


def _denoise(m, plan, prompts, negatives, start_latents, generators, guidance_scale, batch_size, callback, progress, clip_skip=1,
             concat=None, on_predictor=None, controls=(), guess_mode=False, base_steps=None, pad_with=None):  # fmt: skip
    """Denoise each image (or each batch of `batch_size` images) from its start latent. `on_predictor(info)`,
    if given, sees the intermediate points of Heun and DPM2 (a), with info["images"] as the callback gets it."""
    finished, bar = [], _progress(len(prompts) * (len(plan.timesteps) - plan.start), progress)
    stopped = False
    for lo in range(0, len(prompts), batch_size):
        hi = min(lo + batch_size, len(prompts))
        trace = getattr(m, "_trace", None)
        if trace is not None:
            trace.begin_images(lo)  # before encoding, so text-encoder records carry this batch's numbers
        eps_model, evaluations_done = _scheduled_eps_model(m, plan, prompts[lo:hi], negatives[lo:hi], guidance_scale, clip_skip,
                                                     None if concat is None else concat[lo:hi], controls, guess_mode,
                                                     base_steps, pad_with)  # fmt: skip

        def step_callback(info: dict, first: int = lo) -> bool:
            evaluations_done[0] = info["i"] + 1
            if bar is not None:
                bar.update(hi - first)
            if trace is not None:
                trace.end_step(info)
            nonlocal stopped
            stopped = callback is not None and callback({**info, "images": range(first, hi)}) is True
            return stopped

        generator = generators[lo] if hi - lo == 1 else generators[lo:hi]
        with torch.no_grad():
            predictor = None if on_predictor is None else (lambda info, rows=range(lo, hi): on_predictor({**info, "images": rows}))
            latents = plan.sample(eps_model, start_latents[lo:hi], generator=generator, callback=step_callback, on_predictor=predictor)
        finished.append(latents)
        if stopped:
            break
    if bar is not None:
        bar.close()
    return torch.cat(finished)


@takes_seamless
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
    discard_penultimate_sigma: bool = False,
    rng: str = "cpu",
):
    """Text-to-image. Returns a list of PIL images, or a float array (N, H, W, 3) in [0, 1] ("np"), or the
    final latents (N, 4, H/8, W/8), unscaled by 0.18215 ("latent"); N = len(prompts) × num_images, in
    prompt order. PIL images carry their settings in `image.info["sd15"]` (a GenerationSettings).

    Prompts take the web UI's syntax (emphasis, BREAK, `<lora:name:scale>`, textual-inversion trigger
    words, any length: see sd15.prompts); `clip_skip=2` conditions on CLIP's penultimate layer. A prompt and a
    negative prompt of different lengths (in 77-token chunks) keep them, as in the web UI, unless `pad_conds`
    (its "Pad prompt/negative prompt" option) pads the shorter with the encoding of "".

    `latents` replaces the seeded initial noise (unit variance, (N, 4, H/8, W/8)); `callback(info)` is
    called after every step with {"i", "t", "sigma", "sigma_next", "x", "denoised", "images"} and stops the run by
    returning True (the images finished so far, and the current one as it stands, are returned).

    ControlNet (sd15.controlnet, docs/controlnet.md): `controlnet` (from `sd15.load_controlnet`) and its
    `control_image` (PIL, array or tensor in [0, 1]; PIL images are resized to width × height), or lists of both
    (their residuals are summed); `controlnet_conditioning_scale` multiplies the residuals; the ControlNet is
    applied from step fraction `control_guidance_start` to `control_guidance_end` (each one value or one per
    ControlNet); `guess_mode` runs it on the conditional half only, as diffusers' guess mode.

    Image i's noise comes from seed + i. The web UI's ways to steer it (sd15.seeds): `variation_strength` > 0
    moves it toward `variation_seed`'s (then every image has `seed`, and image i `variation_seed + i`: None picks
    one); `seed_resize_from` (width, height) centres the seed's noise for that size; `eta_noise_seed_delta` (ENSD)
    draws an ancestral sampler's noise from seed + delta. `seamless`: an image that tiles (sd15.seamless).
    `discard_penultimate_sigma`: the grid of steps + 1 steps without its next-to-last noise level, as the web UI
    runs DPM2 (sd15.samplers.plan_sampling). `rng`: "cpu" (torch's CPU generator) or "nv" (CUDA's, computed on
    the CPU: what a seed gives on an NVIDIA GPU, the web UI's default).
    """
    check_settings(steps, guidance_scale, sampler, width, height, num_images, seed=seed, eta=eta, batch_size=batch_size)
    check_prompts(prompt, negative_prompt)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    prompts, negatives = _prompt_lists(prompt, negative_prompt, num_images)
    seeds = noise_seeds(m, seed, len(prompts), variation_seed, variation_strength, seed_resize_from,
                        eta_noise_seed_delta, latents, rng)  # fmt: skip
    generators = seeds.generators()
    f = m.vae.downscale_factor
    shape = (m.unet.config.out_channels, height // f, width // f)
    if latents is None:  # (N, 4, h, w) on the CPU
        noise = torch.stack([seeds.first_noise(i, g, shape) for i, g in enumerate(generators)])
    else:
        noise = given_latents(latents, (len(prompts), *shape))
    generators = seeds.sampler_generators(generators)
    controls = controlnet_io.prepare_controls(m, controlnet, control_image, controlnet_conditioning_scale,
                                              control_guidance_start, control_guidance_end, width, height, guess_mode)  # fmt: skip
    plan = plan_sampling(sampler, steps, karras=karras, eta=eta, schedule_type=schedule_type, discard_penultimate_sigma=discard_penultimate_sigma)
    start = plan.noise_latents(noise).to(m.device)
    result = _run(m, plan, prompts, negatives, start, generators, guidance_scale, batch_size, callback, progress, clip_skip=clip_skip,
                  controls=controls, guess_mode=guess_mode, pad_conds=pad_conds)  # fmt: skip
    out = _finish(m, result, output_type)
    if output_type == "pil":
        record_settings(m, out, prompts, negatives, seeds, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                        width=width, height=height, **schedule_fields(karras, schedule_type), eta=eta, clip_skip=clip_skip,
                        pad_conds=pad_conds, seamless=seamless, discard_penultimate_sigma=discard_penultimate_sigma,
                        controlnets=controlnet_io.settings_record(controls, guess_mode))  # fmt: skip
    return out


@takes_seamless
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
    schedule_type: str | None = None,
    fit: str = "resize",
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
    discard_penultimate_sigma: bool = False,
    rng: str = "cpu",
):
    """Image-to-image (SDEdit, Meng et al. 2022): encode the image, noise it to the timestep that
    `strength` selects (1.0 = pure noise, 0.0 = unchanged), and denoise the last int(steps · strength)
    steps. `image`: a PIL image, an array, or a (1, 3, H, W) tensor in [-1, 1]; sides that are not
    multiples of 8 are brought to one by `fit` ("resize" or "crop", see sd15.images).
    ControlNet arguments as `generate`'s; the control image is brought to the (fitted) input image's size (with
    fit="crop", one of the input's own size is cut as the input is), and the start and end fractions count the
    int(steps · strength) steps that run. The seed arguments as `generate`'s: they steer each image's noise,
    which its generator draws after the image's VAE sample (diffusers' order).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    pixels = image_io.to_tensor(image, fit)  # (1, 3, H, W) in [-1, 1]
    if pixels.shape[0] != 1:
        raise ValueError("img2img takes one image; call it once per image")
    height, width = pixels.shape[-2:]
    check_settings(steps, guidance_scale, sampler, width, height, num_images, seed=seed, eta=eta, batch_size=batch_size)
    check_prompts(prompt, negative_prompt)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    prompts, negatives = _prompt_lists(prompt, negative_prompt, num_images)
    seeds = noise_seeds(m, seed, len(prompts), variation_seed, variation_strength, seed_resize_from, eta_noise_seed_delta,
                        rng=rng)  # fmt: skip
    generators = seeds.generators()
    source = image_io.source_size(image)
    if controlnet is not None and fit == "crop" and source not in (None, (width, height)):
        from .inpaint import centre_cut_control_images  # here: sd15.inpaint imports this module

        control_image = centre_cut_control_images(control_image, source, width, height)  # cut as the image was
    controls = controlnet_io.prepare_controls(m, controlnet, control_image, controlnet_conditioning_scale,
                                              control_guidance_start, control_guidance_end, width, height, guess_mode)  # fmt: skip
    plan = plan_sampling(sampler, steps, strength=strength, karras=karras, eta=eta, schedule_type=schedule_type,
                         discard_penultimate_sigma=discard_penultimate_sigma)  # fmt: skip
    with torch.no_grad():
        posterior = tiling.encode(m.vae, pixels.to(m.device, m.dtype))
    starts = []
    for i, g in enumerate(generators):  # per image: its VAE sample, then its noise, from its own generator
        init = posterior.sample(g).float().cpu() * LATENT_SCALE  # (1, 4, h, w)
        noise = seeds.first_noise(i, g, init.shape)
        starts.append(plan.noise_latents(noise, init))
    start = torch.cat(starts).to(m.device)
    result = _run(m, plan, prompts, negatives, start, seeds.sampler_generators(generators), guidance_scale, batch_size, callback, progress, clip_skip=clip_skip,
                  controls=controls, guess_mode=guess_mode, pad_conds=pad_conds)  # fmt: skip
    out = _finish(m, result, output_type)
    if output_type == "pil":
        record_settings(m, out, prompts, negatives, seeds, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                        width=width, height=height, **schedule_fields(karras, schedule_type), eta=eta, strength=strength,
                        clip_skip=clip_skip, pad_conds=pad_conds, seamless=seamless,
                        discard_penultimate_sigma=discard_penultimate_sigma,
                        controlnets=controlnet_io.settings_record(controls, guess_mode))  # fmt: skip
    return out
