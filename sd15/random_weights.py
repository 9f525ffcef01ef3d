"""Seeded random checkpoints in the exact original SD1.x layout, full size or tiny.

No real weights can be downloaded where sd15 is developed and tested, so tests, demos and benchmarks run
on checkpoints made here: every key, shape and prefix as in `v1-5-pruned-emaonly`, values drawn from a
seeded generator at scales that keep activations finite and informative (weights ~ N(0, 1/fan_in),
norm scales near 1, small non-zero biases, so a swapped or missing tensor changes the output).

`scripts/make_random_checkpoint.py` is the command-line front of this module.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, ema_key
from .clip import CLIPTextConfig, CLIPTextModel
from .controlnet import CONTROL_PREFIX, ControlNet
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

FULL = {"unet": UNetConfig(), "vae": VAEConfig(), "text_encoder": CLIPTextConfig()}
# The smallest model that keeps every structural feature of SD1.x: three UNet levels of which the last has
# no attention, two ResBlocks per level, GroupNorm's 32 groups, 8 UNet heads, 12 CLIP heads, the real
# vocabulary, and a VAE that downsamples by 8 like the real one.
TINY = {
    "unet": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 1), context_dim=48),
    "vae": VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    "text_encoder": CLIPTextConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2),
}
SIZES = {"full": FULL, "tiny": TINY}


def random_tensor(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """One parameter's random value, scaled by its role (read off its name and shape)."""
    if key.endswith("position_ids"):
        return torch.arange(shape[-1])[None]
    noise = torch.randn(shape, generator=generator)
    if len(shape) == 1:  # 1-D weights are GroupNorm/LayerNorm scales; the rest are biases
        return (1.0 + 0.1 * noise) if key.endswith("weight") else 0.05 * noise
    if "embedding" in key:
        return 0.5 * noise
    fan_in = math.prod(shape[1:])
    return noise / math.sqrt(fan_in)


def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, v.shape, generator) for k, v in module.state_dict().items()}


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The 12 schedule buffers that ldm's LatentDiffusion stores (computed in float64 as it does)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    variance = betas * (1 - prev) / (1 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": variance,
        "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    return {k: v.float() for k, v in buffers.items()}


def random_checkpoint(
    size: str = "tiny",
    seed: int = 0,
    inpainting: bool = False,
    ema: bool = False,
    old_clip_keys: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A full original-layout state dict: UNet, VAE, CLIP text encoder and the schedule buffers.

    `inpainting` makes the UNet take 9 input channels; `ema` adds `model_ema.*` copies of the UNet
    (slightly different values, so a test can tell which was loaded); `old_clip_keys` writes CLIP keys
    without `text_model.`, as older files do.
    """
    configs = SIZES[size]
    unet_config = configs["unet"]
    if inpainting:
        unet_config = UNetConfig(**{**unet_config.__dict__, "in_channels": 9})
    with torch.device("meta"):
        unet, vae, clip = UNet(unet_config), AutoencoderKL(configs["vae"]), CLIPTextModel(configs["text_encoder"])
    clip_prefix = "cond_stage_model.transformer." if old_clip_keys else CLIP_PREFIX
    sd: dict[str, torch.Tensor] = {}
    for offset, (prefix, module) in enumerate(((UNET_PREFIX, unet), (VAE_PREFIX, vae), (clip_prefix, clip))):
        for k, v in random_state_dict(module, seed * 3 + offset).items():
            sd[prefix + k] = v
    if ema:
        generator = torch.Generator().manual_seed(seed + 10_000)
        for k in unet.state_dict():
            w = sd[UNET_PREFIX + k]
            sd[ema_key(k)] = w + 0.01 * torch.randn(w.shape, generator=generator) * w.std().clamp(min=1e-3)
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    sd.update(schedule_buffers())
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def random_controlnet(size: str = "tiny", seed: int = 0, prefix: str = CONTROL_PREFIX,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
    """A ControlNet for the `size` model in the layout of ControlNet 1.1's files (`control_model.` keys; `prefix=""`
    for files without it). Its zero convolutions are random too, not zero as before training, so that the
    residuals reach the UNet and a test sees them."""
    with torch.device("meta"):
        net = ControlNet(SIZES[size]["unet"])
    sd = {prefix + k: v for k, v in random_state_dict(net, seed * 3 + 20_000).items()}
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def save_checkpoint(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write as .safetensors or, for any other suffix, as a Lightning-style pickle under `state_dict`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 0, "epoch": 0}, path)
    return path


CACHE_VARIABLE = "SD15_RANDOM_WEIGHTS_CACHE"


def random_checkpoint_file(size: str, seed: int, folder: str | os.PathLike) -> Path:
    """`random_checkpoint(size, seed)` saved as .safetensors in `folder`, or in the folder named by the
    environment variable SD15_RANDOM_WEIGHTS_CACHE when it is set, where the file is made once and reused
    by later runs (the GPU session's scripts each need the same full-size weights, which take seconds to
    draw). The file is written under a temporary name and renamed, so a killed run leaves no partial file."""
    folder = Path(os.environ.get(CACHE_VARIABLE) or folder)
    path = folder / f"random-sd15-{size}-seed{seed}.safetensors"
    if not path.exists():
        partial = save_checkpoint(random_checkpoint(size, seed=seed), folder / f".{path.stem}.{os.getpid()}.partial.safetensors")
        os.replace(partial, path)
    return path
