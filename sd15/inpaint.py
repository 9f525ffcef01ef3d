"""Inpainting: repaint the masked part of an image from a prompt, keep the rest.

The mask is white (>= 0.5) where the image is to be repainted and black where it is kept; it is binarised at
0.5, as diffusers does. Two kinds of checkpoint inpaint, in two ways:

- An inpainting checkpoint (`sd-v1-5-inpainting`, UNet input_blocks.0 with 9 input channels) was trained for it:
  at every step the UNet sees [x (4), mask (1), masked-image latents (4)], where the mask is resized to latent
  size (nearest) and the masked image (the image with the repainted region set to 0, i.e. grey) is VAE-encoded
  and scaled by 0.18215 (FACTS.md). This reproduces diffusers' `StableDiffusionInpaintPipeline`.
- A regular checkpoint (4 channels) is steered instead: after every sampler step the known region of x is
  replaced by the original image's latents noised to the step's new noise level (the clean latents after the
  last step), x <- (1 - m) · noised(init) + m · x, as diffusers' pipeline does for such a UNet (Lugmayr et
  al. 2022, "RePaint", without its resampling). Heun and DPM2 are blended at their intermediate point too
  (Heun's Euler point, DPM2's midpoint), before the model sees it, as diffusers' interleaved half steps are; the
  kept region is noised to the step's sigma_next there, as diffusers does (for DPM2 that is below the midpoint's
  own sigma_mid; for DPM2 ancestral the two are equal).

Around that:
- `paste_back` (default on) composites the result onto the original pixels through the mask, so pixels the mask
  keeps are returned exactly as given (the VAE does not reproduce them exactly otherwise).
- `mask_blur` (pixels) feathers that composite as the web UI's "Mask blur" does: the mask blurred by a Gaussian of
  that standard deviation, doubled and clipped, so the whole mask is repainted and the new pixels fade out over
  about 2·mask_blur pixels outside it (kept pixels farther away stay exact). In padding mode the blurred mask
  itself (0.5 on the mask's edge), as the web UI's "only masked".
- `padding` (pixels) switches to inpainting only around the mask, as the web UI's "only masked" and diffusers'
  `padding_mask_crop` do: the mask's bounding box, grown by `padding` on each side and then to the aspect ratio
  of width × height (default 512 × 512), is cut out, resized to width × height, inpainted, resized back and
  pasted into the untouched full image. Small regions of large images get the model's full resolution. A
  ControlNet's control image is taken as a picture of the full image: brought to its size (Lanczos, as
  img2img does), then cut with the same box and resized like the image, so the hint lines up with the crop the
  model sees, as the web UI's ControlNet extension does in "only masked" inpainting.

Image and mask must have the same size. The mask may be a single-channel image (mode "1", "L", "I;16", "I",
"F"), a grey RGB(A) image with opaque alpha (converted by luma, as PIL's convert("L")), an array (H, W) or
(H, W, 1) (uint8, bool or floats in [0, 1]) or a tensor (H, W), (1, H, W) or (1, 1, H, W) in [0, 1]. A coloured
or transparent mask is refused with a message: it is usually the image passed in place of the mask.

Randomness, per image i from the generator seeded seed + i, in diffusers' order: the image's VAE sample (regular
checkpoint, or strength < 1), the initial noise (unless `latents` gives it), the masked image's VAE sample
(inpainting checkpoint; a regular checkpoint draws and discards it, as diffusers does, so ancestral samplers see
the same noise).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from . import controlnet as controlnet_io
from . import images as image_io
from . import pipeline, schedule, tiling
from .samplers import plan_sampling
from . import seeds as seeds_io
from .seamless import takes_seamless
from .vae import LATENT_SCALE

if TYPE_CHECKING:
    from .model import StableDiffusion

MASK_THRESHOLD = 0.5  # mask >= 0.5 is repainted
CROP_SIZE = 512  # default working size of padding (crop) mode: the model's native resolution


# --------------------------------------------------------------------------- images and masks in


def image_tensor(image) -> torch.Tensor:
    """A PIL image, an array (H, W, 3|4) uint8 or [0, 1] floats, or a tensor (1, 3, H, W) in [-1, 1] -> float32
    (1, 3, H, W) in [-1, 1], at its own size (alpha flattened onto white, as sd15.images does)."""
    if isinstance(image, torch.Tensor):
        t = image.float()[None] if image.ndim == 3 else image.float()
        if t.ndim != 4 or tuple(t.shape[:2]) != (1, 3):
            raise ValueError(f"an image tensor must be (1, 3, H, W) in [-1, 1]; got shape {tuple(image.shape)}")
        return t
    if isinstance(image, np.ndarray):
        a = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise ValueError(f"an image array must be (H, W, 3) or (H, W, 4); got shape {image.shape}")
        image = Image.fromarray((image_io.unit_floats(a, "image") * 255).round().astype(np.uint8))
    rgb = image_io._to_pil_rgb(image)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1


_COLOUR_MASK = ("the mask is a colour image; give a black-and-white mask (white = repaint, black = keep). "
                "Were the image and the mask swapped?")  # fmt: skip


def mask_tensor(mask) -> torch.Tensor:
    """A mask in any of the forms the module docstring lists -> float32 (1, 1, H, W) in [0, 1]."""
    if isinstance(mask, torch.Tensor):
        t = mask.float()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] != 1:
            raise ValueError(f"a mask tensor must have one channel: (H, W), (1, H, W) or (1, 1, H, W); got {tuple(mask.shape)}")
        t = t.reshape(1, 1, *t.shape[-2:]) if t.ndim in (2, 3) else None
        if t is None:
            raise ValueError(f"a mask tensor must be (H, W), (1, H, W) or (1, 1, H, W); got {tuple(mask.shape)}")
        array = t[0, 0].numpy()
    elif isinstance(mask, np.ndarray):
        a = mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            return mask_tensor(Image.fromarray(a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8)))
        if a.ndim != 2:
            raise ValueError(f"a mask array must be (H, W) or (H, W, 1); got shape {mask.shape}")
        array = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    elif isinstance(mask, Image.Image):
        array = _pil_mask_array(mask)
    else:
        raise TypeError(f"expected a mask image, array or tensor, got {type(mask).__name__}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError("mask values must lie in [0, 1] (uint8 masks in [0, 255])")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]


def _pil_mask_array(mask: Image.Image) -> np.ndarray:
    mask = ImageOps.exif_transpose(mask)  # as shown, like the image (sd15.images)
    mode = mask.mode
    if mode in ("1", "L"):
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if mode.startswith("I;16") or mode == "I":  # 16-bit PNGs open as I;16 or I
        return np.asarray(mask, dtype=np.float32) / 65535.0
    if mode == "F":
        return np.asarray(mask, dtype=np.float32)
    if mode in ("LA", "RGBA", "PA") or (mode == "P" and "transparency" in mask.info):
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        if (alpha < 255).any():
            raise ValueError("the mask has transparent pixels; give an opaque black-and-white mask (white = repaint)")
    rgb = np.asarray(mask.convert("RGB"), dtype=np.int16)
    if (rgb.max(axis=-1) - rgb.min(axis=-1)).max() > 16:  # grey up to JPEG noise
        raise ValueError(_COLOUR_MASK)
    return np.asarray(mask.convert("RGB").convert("L"), dtype=np.float32) / 255.0


def fit_mask(mask: torch.Tensor, fit: str) -> torch.Tensor:
    """Bring a (1, 1, H, W) mask to multiples of 8 exactly as sd15.images fits the image ("resize": Lanczos,
    "crop": the centre)."""
    H, W = mask.shape[-2:]
    h, w = H - H % 8, W - W % 8
    if (h, w) == (H, W):
        return mask
    if fit == "crop":
        top, left = (H - h) // 2, (W - w) // 2
        return mask[..., top : top + h, left : left + w]
    # in 8-bit, as diffusers' mask processor resizes an "L" image (Lanczos' overshoot clipped on the way)
    levels = (mask[0, 0].numpy() * 255).round().astype(np.uint8)
    resized = Image.fromarray(levels, mode="L").resize((w, h), Image.LANCZOS)
    return torch.from_numpy(np.array(resized, dtype=np.float32) / 255.0)[None, None]


def feather(hard: torch.Tensor, blur: float, whole_image: bool = True) -> torch.Tensor:
    """The paste-back mask, as the web UI's `mask_for_overlay` for its "Mask blur": `hard` (1, 1, H, W) in {0, 1}
    blurred by a Gaussian of standard deviation `blur` (edges replicated, so a mask touching the image border is
    not faded there). For the whole image it is doubled and clipped, clip(2 · (G_blur * hard), 0, 1): 1 on the
    mask (but for corners and regions narrower than about 2·blur), fading to 0 about 2·blur pixels outside it. In
    padding ("only masked") mode it is the blurred mask itself, 0.5 on the mask's edge.
    """
    if blur <= 0:
        return hard
    side = max(hard.shape[-2:])
    radius = max(1, math.ceil(min(3 * blur, side)))  # beyond the image's side, only edge copies
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-((x / blur) ** 2) / 2)
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.pad(hard, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return (2 * blurred).clamp(0, 1) if whole_image else blurred


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) to `size` (at most `limit`) around its centre, shifted to lie inside [0, limit)."""
    size = min(size, limit)
    lo = max(0, min(limit - size, (lo + hi) // 2 - size // 2))
    return lo, lo + size


def crop_region(hard: torch.Tensor, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the bounding box of `hard` (H, W), grown by `padding` on every side, then its shorter
    side grown to the aspect ratio width : height, all within the image."""
    H, W = hard.shape
    ys, xs = torch.nonzero(hard, as_tuple=True)
    x0, x1 = max(0, int(xs.min()) - padding), min(W, int(xs.max()) + 1 + padding)
    y0, y1 = max(0, int(ys.min()) - padding), min(H, int(ys.max()) + 1 + padding)
    if (x1 - x0) * height < (y1 - y0) * width:  # too narrow for the aspect ratio
        x0, x1 = _grow(x0, x1, round((y1 - y0) * width / height), W)
    else:
        y0, y1 = _grow(y0, y1, round((x1 - x0) * height / width), H)
    return x0, y0, x1, y1


def _resize(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic with antialiasing (a Lanczos-like result for tensors)."""
    if tuple(t.shape[-2:]) == (height, width):
        return t
    return F.interpolate(t, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def _fill_resize(t: torch.Tensor, height: int, width: int, black: float = 0.0) -> torch.Tensor:
    """A crop to the working size keeping its aspect ratio, as diffusers' resize_mode="fill" (and the web UI's
    "resize and fill") does for a crop that the image's border kept from reaching width : height: resized to fit,
    centred, and the margins filled by stretching its first and last rows (or columns). Where the aspect ratio is
    reached, a plain resize. `black`: the value of black (-1 for pixels in [-1, 1]), left in an odd margin's last row."""
    h, w = t.shape[-2:]
    fit_width = width / height < w / h  # wider than the working size: fit its width, fill above and below
    src_w = width if fit_width else w * height // h
    src_h = height if not fit_width else h * width // w
    resized = _resize(t, src_h, src_w)
    out = torch.full((*t.shape[:-2], height, width), black, dtype=t.dtype)
    top, left = height // 2 - src_h // 2, width // 2 - src_w // 2
    out[..., top : top + src_h, left : left + src_w] = resized
    if fit_width and top > 0:
        out[..., :top, :] = resized[..., :1, :]
        out[..., top + src_h : 2 * top + src_h, :] = resized[..., -1:, :]  # an odd margin's last row stays 0, as diffusers'
    elif not fit_width and left > 0:
        out[..., :, :left] = resized[..., :, :1]
        out[..., :, left + src_w : 2 * left + src_w] = resized[..., :, -1:]
    return out


def _crop_resize(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The way back from _fill_resize, as diffusers' resize_mode="crop": resized to cover height × width keeping its
    aspect ratio, the centre kept."""
    h, w = t.shape[-2:]
    fit_width = width / height > w / h
    src_w = width if fit_width else w * height // h
    src_h = height if not fit_width else h * width // w
    resized = _resize(t, src_h, src_w)
    top, left = src_h // 2 - height // 2, src_w // 2 - width // 2
    return resized[..., top : top + height, left : left + width]


def crop_control_images(control_image, image_size: tuple[int, int], region, width: int, height: int):
    """Padding mode's control images: each (a PIL image, array or tensor, or a list of them) brought to the full
    image's `image_size` (W, H) by sd15.controlnet.control_image, cut to `region` and resized to width × height as
    the image is -> (1, 3, height, width), in the same form (one, or a list). None entries stay None.

    The inpaint ControlNet's -1 ("to be filled", sd15.control_preprocess.inpaint_condition) is resized as the mask
    is, thresholded at 0.5, and the other pixels from the known ones alone (a normalised resize: Σ w·v·k / Σ w·k,
    k = 1 where known), so that no -1 bleeds into the colours around the hole.
    """
    x0, y0, x1, y1 = region

    def crop(image):
        if image is None:
            return None  # refused by prepare_controls, which counts the images
        cut = controlnet_io.control_image(image, *image_size)[..., y0:y1, x0:x1]  # (1, 3, h, w), [0, 1] or -1
        marked = (cut == -1).any(dim=1, keepdim=True).float()  # (1, 1, h, w)
        if not marked.any():
            return _fill_resize(cut, height, width).clamp(0, 1)
        known = 1 - marked
        values = _fill_resize(cut * known, height, width) / _fill_resize(known, height, width).clamp(min=1e-6)
        return torch.where(_fill_resize(marked, height, width) >= MASK_THRESHOLD, -1.0, values.clamp(0, 1))

    if isinstance(control_image, (list, tuple)):
        return [crop(image) for image in control_image]
    return crop(control_image)


def centre_cut_control_images(control_image, image_size: tuple[int, int], width: int, height: int):
    """fit="crop"'s control images: one of the image's own `image_size` (W, H) is cut to the same centre
    width × height as the image, so its hint lines up with the pixels kept (a resize would squeeze it against
    them); others are left to sd15.controlnet.control_image, which resizes them to width × height as before."""
    W, H = image_size
    left, top = (W - width) // 2, (H - height) // 2  # as sd15.images' fit="crop"

    def size(image):  # (W, H) as the control image will be read, or None
        if isinstance(image, Image.Image):
            return controlnet_io.control_rgb(image).size  # EXIF rotation applied
        if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim >= 2:
            return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else (image.shape[-1], image.shape[-2])
        return None

    def cut(image):
        if image is None or size(image) != image_size:
            return image
        return crop_control_images(image, image_size, (left, top, left + width, top + height), width, height)

    if isinstance(control_image, (list, tuple)):
        return [cut(image) for image in control_image]
    return cut(control_image)


# --------------------------------------------------------------------------- denoising


def _known_region_blender(plan, init: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, callback):
    """A step callback for a 4-channel UNet: x <- (1 - m) · init noised to the new level + m · x, in place,
    then the user's callback (`callback=None`: the blend alone, for Heun's and DPM2's intermediate point). init,
    noise: (N, 4, h, w) on x's device; mask (1, 1, h, w)."""
    n_run = len(plan.timesteps) - plan.start
    abar = schedule.alphas_cumprod()

    def blend(info: dict):
        x, rows, i = info["x"], info["images"], info["i"]
        x0, eps = init[rows.start : rows.stop], noise[rows.start : rows.stop]
        if i == n_run - 1:  # after the last step: the clean latents
            known = x0
        elif plan.sigmas is None:  # VP samplers: diffusers' add_noise at the next listed timestep
            a = abar[int(plan.timesteps[plan.start + i + 1])]
            known = a**0.5 * x0 + (1 - a) ** 0.5 * eps
        else:  # x = x_0 + sigma eps
            known = x0 + info["sigma_next"] * eps
        x.copy_((1 - mask) * known + mask * x)  # the samplers continue from this x
        return callback(info) if callback is not None else None

    return blend


def _denoise(m, pixels, hard, prompts, negatives, plan, seeds, latents, strength, guidance_scale,
             batch_size, callback, progress, clip_skip, controls=(), guess_mode=False, pad_conds=False):  # fmt: skip
    """Final latents (N, 4, h, w) for the fitted image `pixels` (1, 3, H, W) and binary mask `hard` (1, 1, H, W)."""
    in_channels = m.unet.config.in_channels
    latent_channels = m.unet.config.out_channels
    if in_channels not in (latent_channels, 2 * latent_channels + 1):
        raise ValueError(f"the UNet takes {in_channels} input channels; inpainting needs 4 (regular) or 9 (inpainting)")
    inpainting_unet = in_channels != latent_channels
    f = m.vae.downscale_factor
    h, w = pixels.shape[-2] // f, pixels.shape[-1] // f
    N = len(prompts)
    if latents is not None:
        latents = pipeline.given_latents(latents, (N, latent_channels, h, w))
    with torch.no_grad():
        image_posterior = None
        if not inpainting_unet or strength < 1.0:
            image_posterior = tiling.encode(m.vae, pixels.to(m.device, m.dtype))
        masked_posterior = None
        if inpainting_unet:  # the kept part of the image, the repainted part 0 (grey)
            masked_posterior = tiling.encode(m.vae, (pixels * (hard < MASK_THRESHOLD)).to(m.device, m.dtype))
    inits, noises, masked, starts = [], [], [], []
    generators = seeds.generators()
    for i, g in enumerate(generators):  # per image, from its own generator, in diffusers' order
        init = image_posterior.sample(g).float().cpu() * LATENT_SCALE if image_posterior is not None else None
        if latents is None:
            noise = seeds.first_noise(i, g, (1, latent_channels, h, w))
        else:
            noise = latents[i : i + 1].float().cpu()
        if masked_posterior is not None:
            masked.append(masked_posterior.sample(g).float().cpu() * LATENT_SCALE)
        else:
            seeds_io.randn((1, latent_channels, h, w), g)  # diffusers' discarded masked-image sample
        starts.append(plan.noise_latents(noise) if strength == 1.0 else plan.noise_latents(noise, init))
        inits.append(init)
        noises.append(noise)
    start = torch.cat(starts).to(m.device)
    mask_latent = F.interpolate(hard, size=(h, w))  # (1, 1, h, w), nearest, as diffusers
    concat, step_callback, on_predictor = None, callback, None
    if inpainting_unet:
        concat = torch.cat([mask_latent.expand(N, -1, -1, -1), torch.cat(masked)], dim=1).to(m.device)  # (N, 5, h, w)
    else:
        known = (plan, torch.cat(inits).to(m.device), torch.cat(noises).to(m.device), mask_latent.to(m.device))
        step_callback = _known_region_blender(*known, callback)
        on_predictor = _known_region_blender(*known, None)
    return pipeline._run(m, plan, prompts, negatives, start, seeds.sampler_generators(generators), guidance_scale, batch_size, step_callback,
                         progress, clip_skip=clip_skip, concat=concat, on_predictor=on_predictor, controls=controls,
                         guess_mode=guess_mode, pad_conds=pad_conds)  # fmt: skip


@takes_seamless
def inpaint(
    m: "StableDiffusion",
    image,
    mask,
    prompt: str | list[str],
    strength: float = 1.0,
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
    mask_blur: float = 0.0,
    padding: int | None = None,
    paste_back: bool = True,
    width: int | None = None,
    height: int | None = None,
    latents: torch.Tensor | None = None,
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
    """Repaint where `mask` is white, guided by `prompt`; see the module docstring for both kinds of checkpoint.

    image: PIL image, array or (1, 3, H, W) tensor in [-1, 1]; mask: the same size (forms in the module
    docstring). strength: 1.0 starts the masked region from pure noise; less keeps some of what is there
    (SDEdit, as img2img). fit: how sides that are not multiples of 8 are made so ("resize" or "crop").
    mask_blur, padding, paste_back, width, height: see the module docstring (width and height are padding
    mode's working size). latents: the initial noise (N, 4, h, w) in place of the seeded one.
    Returns what `generate` returns for `output_type` ("latent": the final latents, without paste-back; not
    in padding mode). PIL images carry `info["sd15"]` (GenerationSettings, Size the working size).
    ControlNet arguments as sd15.pipeline.generate's; the control image is brought to the (fitted) image's
    size. With `padding` it is a picture of the whole image, cut and resized as the image is (crop_control_images).
    The seed arguments as generate's (sd15.seeds); they steer the noise each image's generator draws after its
    VAE sample, as img2img's.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if not (math.isfinite(mask_blur) and mask_blur >= 0):
        raise ValueError(f"mask_blur must be a number of pixels >= 0, got {mask_blur!r}")
    if padding is not None and (not isinstance(padding, int) or padding < 0):
        raise ValueError(f"padding must be a whole number of pixels >= 0, got {padding!r}")
    if output_type not in pipeline.OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {pipeline.OUTPUT_TYPES}, got {output_type!r}")
    source = image_tensor(image)  # (1, 3, H, W) at the image's own size
    soft_mask = mask_tensor(mask)  # (1, 1, H, W)
    if soft_mask.shape[-2:] != source.shape[-2:]:
        (mh, mw), (ih, iw) = soft_mask.shape[-2:], source.shape[-2:]
        raise ValueError(f"the mask is {mw}×{mh} pixels but the image is {iw}×{ih}; they must be the same size")
    hard_source = (soft_mask >= MASK_THRESHOLD).float()
    if not hard_source.any():
        raise ValueError("the mask is black everywhere: nothing to repaint (white marks what to repaint)")

    if padding is None:
        if width is not None or height is not None:
            raise ValueError("width and height set padding mode's working size; without padding the output keeps the image's size")
        pixels = image_io.to_tensor(source, fit)  # (1, 3, H, W), multiples of 8
        hard = (fit_mask(soft_mask, fit) >= MASK_THRESHOLD).float()
        if not hard.any():
            raise ValueError(f"the mask's white pixels are lost when the image is brought to multiples of 8 (fit={fit!r}): "
                             "nothing would be repainted; draw a larger mask, or use the other fit")  # fmt: skip
        region = None
    else:
        if output_type == "latent":
            raise ValueError("padding mode pastes into the full image; it has no latent output")
        width, height = width or CROP_SIZE, height or CROP_SIZE
        pipeline.check_settings(steps, guidance_scale, sampler, width, height, num_images)
        region = crop_region(hard_source[0, 0], padding, width, height)
        x0, y0, x1, y1 = region
        pixels = _fill_resize(source[..., y0:y1, x0:x1], height, width, black=-1.0).clamp(-1, 1)
        hard = (_fill_resize(hard_source[..., y0:y1, x0:x1], height, width) >= MASK_THRESHOLD).float()
        if not hard.any():  # a sliver of mask lost in the resize: keep its pixels
            hard = (F.interpolate(hard_source[..., y0:y1, x0:x1], size=(height, width), mode="nearest") > 0).float()
    H, W = pixels.shape[-2:]
    pipeline.check_settings(steps, guidance_scale, sampler, W, H, num_images, seed=seed, eta=eta, batch_size=batch_size)
    pipeline.check_prompts(prompt, negative_prompt)
    if controlnet is not None and region is not None:  # padding mode: the hint of the crop the model sees
        control_image = crop_control_images(control_image, (source.shape[-1], source.shape[-2]), region, W, H)
    elif controlnet is not None and fit == "crop" and (W, H) != (source.shape[-1], source.shape[-2]):
        control_image = centre_cut_control_images(control_image, (source.shape[-1], source.shape[-2]), W, H)
    controls = controlnet_io.prepare_controls(m, controlnet, control_image, controlnet_conditioning_scale,
                                              control_guidance_start, control_guidance_end, W, H, guess_mode)  # fmt: skip
    prompts, negatives = pipeline._prompt_lists(prompt, negative_prompt, num_images)
    seeds = pipeline.noise_seeds(m, seed, len(prompts), variation_seed, variation_strength, seed_resize_from,
                                 eta_noise_seed_delta, latents, rng)  # fmt: skip
    plan = plan_sampling(sampler, steps, strength=strength, karras=karras, eta=eta, schedule_type=schedule_type,
                         discard_penultimate_sigma=discard_penultimate_sigma)  # fmt: skip
    result = _denoise(m, pixels, hard, prompts, negatives, plan, seeds, latents, strength, guidance_scale,
                      batch_size, callback, progress, clip_skip, controls, guess_mode, pad_conds)  # fmt: skip

    def composite(decoded: torch.Tensor) -> torch.Tensor:
        decoded = decoded.float().cpu()
        if region is None:  # whole image: keep the known pixels exactly
            return torch.lerp(pixels, decoded, feather(hard, mask_blur)) if paste_back else decoded
        x0, y0, x1, y1 = region
        back = _crop_resize(decoded, y1 - y0, x1 - x0).clamp(-1, 1)  # (N, 3, crop h, crop w)
        out = source.repeat(decoded.shape[0], 1, 1, 1)
        crop = out[..., y0:y1, x0:x1]
        out[..., y0:y1, x0:x1] = torch.lerp(crop, back, feather(hard_source, mask_blur, whole_image=False)[..., y0:y1, x0:x1]) if paste_back else back
        return out

    out = pipeline._finish(m, result, output_type, composite if (paste_back or region is not None) else None)
    if output_type == "pil":
        pipeline.record_settings(m, out, prompts, negatives, seeds, steps=steps, guidance_scale=guidance_scale,
                                 sampler=sampler, width=W, height=H, **pipeline.schedule_fields(karras, schedule_type),
                                 eta=eta, strength=strength,
                                 clip_skip=clip_skip, pad_conds=pad_conds, seamless=seamless,
                                 discard_penultimate_sigma=discard_penultimate_sigma, mask_blur=mask_blur, inpaint_padding=padding,
                                 controlnets=controlnet_io.settings_record(controls, guess_mode))  # fmt: skip
    return out
