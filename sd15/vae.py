"""The KL-regularised autoencoder that maps 512×512 images to 64×64×4 latents and back.

Reproduces `AutoencoderKL` of CompVis `ldm/models/autoencoder.py` with the `Encoder` and `Decoder` of
`ldm/modules/diffusionmodules/model.py` (Esser et al. 2021, "Taming Transformers"; Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", section 3 and appendix G), under the
checkpoint's names (`first_stage_model.encoder.down.0.block.1.conv2.weight`, …).

    image (B, 3, H, W) in [-1, 1]
      encoder: conv_in -> 4 levels of ResnetBlocks (128, 256, 512, 512), downsampling ×2 three times
               -> mid (ResnetBlock, AttnBlock, ResnetBlock) -> GN, SiLU, conv_out -> (B, 8, H/8, W/8)
      quant_conv (1×1) -> mean, logvar (B, 4, H/8, W/8) each: a diagonal Gaussian q(z|x)
    z (B, 4, H/8, W/8)
      post_quant_conv (1×1) -> decoder: conv_in -> mid -> 4 levels upsampling ×2 three times
               -> GN, SiLU, conv_out -> image (B, 3, H, W)

The diffusion model works on z · LATENT_SCALE, which gives the latents roughly unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention

LATENT_SCALE = 0.18215  # `scale_factor` of v1-inference.yaml: the UNet sees z · 0.18215


@dataclass(frozen=True)
class VAEConfig:
    """`first_stage_config.params.ddconfig` (and `embed_dim`) of v1-inference.yaml."""

    ch: int = 128  # width of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of each level, in units of ch
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    in_channels: int = 3  # image channels
    out_ch: int = 3
    z_channels: int = 4  # latent channels
    embed_dim: int = 4  # channels after quant_conv (equal to z_channels in SD)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "VAEConfig":
        """Infer the configuration of an original-layout VAE state dict from its tensor shapes."""
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
        num_res_blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        return cls(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            in_channels=in_channels,
            out_ch=sd["decoder.conv_out.weight"].shape[0],
            z_channels=sd["decoder.conv_in.weight"].shape[1],
            embed_dim=sd["post_quant_conv.weight"].shape[0],
        )


def Normalize(channels: int) -> nn.GroupNorm:
    """model.py's `Normalize`: 32 groups, eps 1e-6."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """h = conv2(SiLU(GN(conv1(SiLU(GN(x)))))); out = shortcut(x) + h. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W pixels, with 1×1 convolutions as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, HW, C)
        h = attention(q, k, v, heads=1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3×3 stride-2 conv with no padding: (H, W) -> (H/2, W/2).

    The asymmetric pad is the original model's; it differs from a symmetric padding=1.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): ResnetBlocks, then resampling."""

    def __init__(self, channels: list[int], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(channels, channels[1:]))
        self.attn = nn.ModuleList()  # SD's VAE has no attention outside the mid block (attn_resolutions: [])
        if resample is not None:
            setattr(self, resample_name, resample)
        self.resample_name = resample_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2·z_channels, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = c.ch
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            self.down.append(Level([ch] + [width] * c.num_res_blocks, None if last else Downsample(width), "downsample"))
            ch = width
        self.mid = MidBlock(ch)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch·ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h·f, w·f).

    `up` is indexed by resolution like `down` (up.0 is the full-resolution level) but run from the
    last index to the first, as in the original code.
    """

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch)
        levels = []
        for i in reversed(range(len(widths))):
            levels.append(Level([ch] + [widths[i]] * (c.num_res_blocks + 1), Upsample(widths[i]) if i else None, "upsample"))
            ch = widths[i]
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch·ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), with logvar clamped to [-30, 20] as in the original."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, z, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std · ε, with ε drawn on the generator's device (CPU by default) for reproducibility."""
        from .seeds import randn  # a torch.Generator or sd15.philox's

        noise = randn(self.mean.shape, generator)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """encode: image (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over z (B, 4, H/8, W/8);
    decode: z (B, 4, H/8, W/8), unscaled -> image (B, 3, H, W) in about [-1, 1]."""

    scale_factor = LATENT_SCALE

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along each side: 8 for SD's VAE."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(images).sample(generator))
