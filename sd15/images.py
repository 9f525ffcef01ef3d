"""Converting between user images (PIL, numpy, tensors) and the VAE's (B, 3, H, W) tensors in [-1, 1].

The VAE downsamples by 8, so image sides must be multiples of 8. An image of any other size is brought to
one by `fit`:
- "resize" (default, as diffusers does): scaled down to the largest multiple of 8 in each side, with a
  Lanczos filter (a 513×770 image becomes 512×768, slightly squeezed);
- "crop": the centre crop of that size is kept, with no resampling (edge pixels are lost instead).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

FITS = ("resize", "crop")


def _fit_pil(image: Image.Image, fit: str) -> Image.Image:
    W, H = image.size
    w, h = W - W % 8, H - H % 8
    if (w, h) == (W, H):
        return image
    if w == 0 or h == 0:
        raise ValueError(f"image of {W}×{H} pixels is too small: each side must be at least 8 pixels")
    if fit == "resize":
        return image.resize((w, h), Image.LANCZOS)
    if fit == "crop":
        left, top = (W - w) // 2, (H - h) // 2
        return image.crop((left, top, left + w, top + h))
    raise ValueError(f"fit must be one of {FITS}, got {fit!r}")


def _to_pil_rgb(image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A PIL image of any mode as RGB, as it is shown: EXIF rotation applied, transparency flattened onto
    `background`, 16-bit values scaled to 8 bits. Floating-point images (mode F) have no fixed range: refused."""
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)  # a photo stored sideways with an EXIF rotation: as it is shown
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            flat = Image.new("RGBA", image.size, (*background, 255))
            return Image.alpha_composite(flat, image.convert("RGBA")).convert("RGB")
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64) / 257.0
            return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")
        if image.mode == "F":
            raise ValueError("a floating-point image (PIL mode F) has no fixed range of values; save it as an 8- or "
                             "16-bit image, or pass an array of floats in [0, 1]")  # fmt: skip
        return image.convert("RGB")
    raise TypeError(f"expected a PIL image, got {type(image).__name__}")


def open_image(path, what: str, data: bytes | None = None, max_pixels: int | None = None) -> Image.Image:
    """Read an image file as it is shown (EXIF rotation applied), refusing one larger than sd15 can use before
    its pixels are decoded; `what` names it in the one-line ValueError ("control image"). `data`: the file's
    bytes, already read (sd15.batch decodes the bytes it hashed). `max_pixels`: the limit, by default what the
    model can work on (sd15.pipeline.MAX_PIXELS); inpainting's padding mode, which works on a crop, takes more."""
    import io
    import warnings

    from PIL import UnidentifiedImageError

    from .pipeline import MAX_PIXELS as MODEL_PIXELS  # here: sd15.pipeline imports this module

    MAX_PIXELS = max_pixels or MODEL_PIXELS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sd15's own, lower limit is checked below
            with Image.open(path if data is None else io.BytesIO(data)) as im:  # reads the header only
                W, H = im.size
                if W * H <= MAX_PIXELS and min(W, H) >= 8:
                    return ImageOps.exif_transpose(im)  # decoded here; a photo stored sideways: as it is shown
    except Image.DecompressionBombError:  # PIL's own limit, checked as it reads the header
        raise ValueError(f"the {what} {path} is larger than sd15 allows ({MAX_PIXELS} pixels)") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:  # PIL's ValueError: a damaged file
        raise ValueError(f"cannot read the {what} {path}: {e}") from None
    if W * H > MAX_PIXELS:
        raise ValueError(f"the {what} {path} is {W}×{H}, larger than sd15 allows ({MAX_PIXELS} pixels)")
    raise ValueError(f"the {what} {path} is {W}×{H} pixels, too small: each side must be at least 8")


def unit_floats(array: np.ndarray, what: str) -> np.ndarray:
    """An image array as float32 in [0, 1]: uint8 divided by 255, floats as they are. Other integer types and
    floats outside [0, 1] (an array of 0 … 255 floats, say) are refused, not clipped into a white image."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating) and array.dtype != np.bool_:
        raise ValueError(f"an {what} array of {array.dtype} has no known range; give uint8 (0 … 255) or floats in [0, 1]")
    array = array.astype(np.float32)
    if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise ValueError(f"{what} array values must lie in [0, 1] as floats (uint8 in 0 … 255); got {array.min():g} … "
                         f"{array.max():g}: divide a 0 … 255 array by 255 or convert it to uint8")  # fmt: skip
    return array


def source_size(image) -> tuple[int, int] | None:
    """(W, H) of an image as `to_tensor` reads it before `fit` (a PIL image as shown, EXIF rotation applied; an
    array (H, W, C) or (1, H, W, C); a tensor (…, H, W)), or None for anything else."""
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).size
    if isinstance(image, np.ndarray) and image.ndim in (3, 4):
        return image.shape[-2], image.shape[-3]
    if isinstance(image, torch.Tensor) and image.ndim >= 2:
        return image.shape[-1], image.shape[-2]
    return None


def to_tensor(images, fit: str = "resize") -> torch.Tensor:
    """PIL image(s), a uint8 or float array (H, W, 3) / (B, H, W, 3) in [0, 255] / [0, 1], or a float tensor
    (B, 3, H, W) in [-1, 1] -> float32 tensor (B, 3, H, W) in [-1, 1] with H and W multiples of 8."""
    if isinstance(images, torch.Tensor):
        t = images.float()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"image tensors must be (B, 3, H, W) in [-1, 1]; got shape {tuple(images.shape)}")
        if t.shape[-1] % 8 or t.shape[-2] % 8:
            if fit == "crop":
                H, W = t.shape[-2:]
                top, left = (H % 8) // 2, (W % 8) // 2
                return t[..., top : top + H - H % 8, left : left + W - W % 8]
            return torch.cat([to_tensor(to_pil(x[None])[0], fit) for x in t])
        return t
    if isinstance(images, np.ndarray):
        array = images
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image arrays must be (H, W, 3) or (B, H, W, 3); got shape {images.shape}")
        array = unit_floats(array, "image")
        pil = [Image.fromarray((array_ * 255).round().astype(np.uint8).squeeze()) for array_ in array]
        return to_tensor(pil, fit)
    if isinstance(images, Image.Image):
        images = [images]
    tensors = []
    for image in images:
        rgb = _fit_pil(_to_pil_rgb(image), fit)
        array = np.asarray(rgb, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
        tensors.append(torch.from_numpy(array).permute(2, 0, 1) * 2 - 1)
    if len({t.shape for t in tensors}) > 1:
        raise ValueError("all images of a batch must have the same size")
    return torch.stack(tensors)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] -> float32 array (B, H, W, 3) in [0, 1]."""
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """VAE output (B, 3, H, W) in [-1, 1] -> RGB PIL images (rounded to the nearest of 256 levels)."""
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in to_numpy(images)]
