"""Live previews: a cheap look at the image while it is being denoised.

Decoding the latent with the VAE costs as much as several UNet steps, so previews use one of two shortcuts:

- `latent_to_rgb`: each latent pixel's 4 channels mapped linearly to RGB, rgb = z · C + b with C (4, 3). For
  SD1.x's VAE the web UI's "approx cheap" coefficients are used (`SD15_LATENT_RGB`, no bias); `fit_latent_rgb`
  fits C and b to any VAE by least squares (a random test VAE, a fine-tuned one). The result has the latent's
  resolution (64×64 for 512×512), blurry but with the right colours and layout; it is upscaled for viewing.
- TAESD (Ollin Boer Bohan, github.com/madebyollin/taesd), a tiny convolutional decoder distilled from SD's
  VAE: 1.2 M parameters, full-resolution output, 64 channels throughout:

      latents (B, 4, h, w), as the UNet sees them (scaled by 0.18215)
        Clamp: 3 · tanh(z / 3); conv 4 -> 64, ReLU
        3 × [3 Blocks, Upsample ×2 (nearest), conv (no bias)]   -> (B, 64, 8h, 8w)
        Block, conv 64 -> 3                                     -> image in [0, 1]
      Block(x) = ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)

  `TAESDDecoder` is that nn.Sequential with the original file's indices, so `taesd_decoder.safetensors` (or .pth)
  loads as is; diffusers' `AutoencoderTiny` files (`decoder.layers.N…`, N one less: diffusers drops the Clamp
  module) load by one rule.

The command line's `--preview FILE` writes the x_0 estimate of the current step (`info["denoised"]`) every N steps.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import images as image_io
from .checkpoint import CheckpointError, check_state_dict, open_checkpoint
from .vae import LATENT_SCALE

# Rows: latent channels 0-3; columns: R, G, B. Maps the UNet's (scaled) latents to RGB in about [-1, 1].
SD15_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def latent_to_rgb(latents: torch.Tensor, coefficients: torch.Tensor = SD15_LATENT_RGB, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> approximate image (B, 3, h, w) in [-1, 1]: rgb = z · C (+ b)."""
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), coefficients.to(latents.device, torch.float32))
    if bias is not None:
        rgb = rgb + bias.to(rgb.device, torch.float32)[:, None, None]
    return rgb.clamp(-1, 1)


@torch.no_grad()
def fit_latent_rgb(vae, size: int = 32, samples: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares C (4, 3) and b (3,) such that z · C + b approximates the VAE's decode of z, each latent
    pixel against the mean colour of the f×f image pixels it decodes to. Latents are drawn smooth (a coarse
    random field upsampled) so that neighbouring pixels agree as in real images."""
    g = torch.Generator().manual_seed(seed)
    p = next(vae.parameters())
    f = vae.downscale_factor
    z = torch.randn(samples, 4, size // 8, size // 8, generator=g)
    z = F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)  # (S, 4, size, size), scaled
    images = vae.decode((z / LATENT_SCALE).to(p.device, p.dtype)).float().cpu()
    targets = F.avg_pool2d(images, f)  # (S, 3, size, size): colour per latent pixel
    X = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, 4), torch.ones(z.numel() // 4, 1)], dim=1)  # (n, 5)
    Y = targets.permute(0, 2, 3, 1).reshape(-1, 3)  # (n, 3)
    solution = torch.linalg.lstsq(X, Y).solution  # (5, 3)
    return solution[:4], solution[4]


# --------------------------------------------------------------------------- TAESD


class Clamp(nn.Module):
    """3 · tanh(x / 3): a soft clamp of the latents to about [-3, 3]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class TAESDBlock(nn.Module):
    """ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x)); skip is a 1×1 conv when the width changes."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESDDecoder(nn.Sequential):
    """Scaled latents (B, 4, h, w) -> image (B, 3, 8h, 8w) in [0, 1] (`decode` gives [-1, 1]). Indices as in
    taesd.py's `Decoder`: 0 Clamp, 1 conv, 2 ReLU, 3-5 Blocks, 6 Upsample, 7 conv, …, 18 Block, 19 conv."""

    def __init__(self, latent_channels: int = 4, width: int = 64, blocks: tuple[int, ...] = (3, 3, 3, 1)):
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, width), nn.ReLU()]
        for i, n in enumerate(blocks):
            layers += [TAESDBlock(width, width) for _ in range(n)]
            if i < len(blocks) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(width, width, bias=False)]
        layers.append(_conv(width, 3))
        super().__init__(*layers)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> image in [-1, 1], as `AutoencoderKL.decode(latents / 0.18215)` approximately."""
        p = next(self.parameters())
        return self(latents.to(p.device, p.dtype)).mul(2).sub(1)


_DIFFUSERS_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _taesd_key(key: str) -> str | None:
    """A file's key -> TAESDDecoder's, or None for keys that are not the decoder's (an AutoencoderTiny's encoder)."""
    if (match := _DIFFUSERS_KEY.match(key)) is not None:
        return f"{int(match[1]) + 1}.{match[2]}"  # diffusers has no Clamp module: its indices are one lower
    if key.startswith(("encoder.", "decoder.")):
        return None
    return key


def load_taesd_decoder(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> TAESDDecoder:
    """Load `taesd_decoder.safetensors` / `.pth`, or a diffusers AutoencoderTiny file or folder
    (`diffusion_pytorch_model.safetensors`). Strict: every decoder tensor must be present and used."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / n for n in ("taesd_decoder.safetensors", "diffusion_pytorch_model.safetensors", "taesd_decoder.pth")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            names = ", ".join(c.name for c in candidates)
            raise CheckpointError(f"{path} holds no TAESD decoder weights (none of {names})")
        path = found[0]
    ckpt = open_checkpoint(path)
    keys = {ours: key for key in ckpt.keys() if (ours := _taesd_key(key)) is not None}
    decoder = TAESDDecoder()
    check_state_dict("TAESD decoder", {k: tuple(v.shape) for k, v in decoder.state_dict().items()},
                     {k: ckpt.shape(fk) for k, fk in keys.items()})  # fmt: skip
    decoder.load_state_dict({k: ckpt.get(fk) for k, fk in keys.items()}, strict=True)
    return decoder.to(device=device or "cpu", dtype=dtype or torch.float32).eval().requires_grad_(False)


# --------------------------------------------------------------------------- writing previews


class Previewer:
    """A step callback that writes `path` (PNG) every `every` steps, and after step `total` when it is given:
    the step's x_0 estimate through TAESD when a decoder is given, else through `latent_to_rgb` (upscaled to
    image size). Chain it with another callback through `then`.

    Each write goes to a temporary file renamed over `path`, so a viewer never sees half a file. A preview that
    cannot be written (a full disk, a folder that went away) is a warning, once; the run goes on.
    """

    def __init__(self, path: str | os.PathLike, every: int = 5, total: int | None = None, taesd: TAESDDecoder | None = None,
                 coefficients: torch.Tensor = SD15_LATENT_RGB, bias: torch.Tensor | None = None, then=None):  # fmt: skip
        if every < 1:
            raise ValueError(f"preview interval must be at least 1 step, got {every}")
        self.path, self.every, self.total, self.taesd = Path(path), every, total, taesd
        self.coefficients, self.bias, self.then = coefficients, bias, then
        self.written = 0
        self.failed = False  # a write has failed (and been warned about)

    def image(self, denoised: torch.Tensor):
        """Scaled latents (1, 4, h, w) -> PIL preview."""
        with torch.no_grad():
            if self.taesd is not None:
                pixels = self.taesd.decode(denoised)
            else:
                rgb = latent_to_rgb(denoised, self.coefficients, self.bias)
                pixels = F.interpolate(rgb, scale_factor=8, mode="bilinear", align_corners=False)
        return image_io.to_pil(pixels.float().cpu())[0]

    def __call__(self, info: dict):
        i = info["i"] + 1
        if i % self.every == 0 or (self.total is not None and i == self.total):
            try:
                self._write(self.image(info["denoised"][:1]))
                self.written += 1
            except OSError as e:  # minutes of sampling are not lost to a preview
                if not self.failed:
                    warnings.warn(f"preview not written to {self.path} ({e}); the run goes on without it", stacklevel=2)
                self.failed = True
        return self.then(info) if self.then is not None else None

    def _write(self, image) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")  # one per process: runs may share a preview
        try:
            image.save(tmp, format="PNG")
            os.replace(tmp, self.path)  # a viewer never sees a half-written file
        finally:
            tmp.unlink(missing_ok=True)
