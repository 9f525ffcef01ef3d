"""The denoising UNet of Stable Diffusion v1.x, with cross-attention to the text.

Reproduces `UNetModel` of CompVis `ldm/modules/diffusionmodules/openaimodel.py` (Ronneberger et al. 2015
UNet, as extended with timestep conditioning by Ho et al. 2020 and Dhariwal & Nichol 2021, and with
text cross-attention by Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"), keeping its module names so that the original checkpoint's keys
(`model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`, …) load as they are.
Only the branches SD1.x uses are kept.

Shape of the SD1.5 network for a 64×64 latent (512×512 image), batch B:

    x (B, 4, 64, 64) ── input_blocks.0 conv ──> (B, 320, 64, 64)
    level 0: 2 × [ResBlock 320, SpatialTransformer]  -> Downsample -> 32×32      input_blocks 1-3
    level 1: 2 × [ResBlock 640, SpatialTransformer]  -> Downsample -> 16×16      input_blocks 4-6
    level 2: 2 × [ResBlock 1280, SpatialTransformer] -> Downsample -> 8×8        input_blocks 7-9
    level 3: 2 × [ResBlock 1280]                                                 input_blocks 10-11
    middle_block: ResBlock, SpatialTransformer, ResBlock at 8×8 × 1280
    output_blocks 0-11 mirror the input blocks, each ResBlock taking the concatenated skip connection;
    out: GroupNorm, SiLU, conv -> eps (B, 4, 64, 64)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention


@dataclass(frozen=True)
class UNetConfig:
    """`unet_config.params` of `configs/stable-diffusion/v1-inference.yaml`."""

    in_channels: int = 4  # latent channels (9 for the inpainting model: latent, mask, masked latent)
    out_channels: int = 4  # predicted noise has the latent's shape
    model_channels: int = 320  # width of the first level
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of each level, in units of model_channels
    num_heads: int = 8  # attention heads at every level (SD2 fixes the head width instead)
    transformer_depth: int = 1  # BasicTransformerBlocks per SpatialTransformer
    context_dim: int = 768  # width of the text encoder's hidden state

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "UNetConfig":
        """Infer the configuration of an original-layout UNet state dict from its tensor shapes.

        `num_heads` cannot be read off shapes; every SD1.x model uses 8.
        """
        model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
        out_channels = sd["out.2.weight"].shape[0] if "out.2.weight" in sd else 4  # a ControlNet has no `out`
        # Input blocks come in levels: num_res_blocks ResBlocks, then a Downsample (`op`), except the last level.
        downsample_blocks = sorted(int(k.split(".")[1]) for k in sd if k.endswith(".op.weight"))
        num_res_blocks = downsample_blocks[0] - 1 if downsample_blocks else _count_input_blocks(sd) - 1
        num_levels = len(downsample_blocks) + 1
        channel_mult, attention_resolutions = [], []
        for level in range(num_levels):
            first = 1 + level * (num_res_blocks + 1)  # index of the level's first ResBlock
            channel_mult.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels)
            if f"input_blocks.{first}.1.proj_in.weight" in sd:
                attention_resolutions.append(2**level)
        depth = 1 + max((int(m[1]) for k in sd if (m := re.search(r"transformer_blocks\.(\d+)\.", k))), default=0)
        context = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), 768)
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            attention_resolutions=tuple(sorted(attention_resolutions, reverse=True)),
            num_res_blocks=num_res_blocks,
            channel_mult=tuple(channel_mult),
            transformer_depth=depth,
            context_dim=context,
        )


def _count_input_blocks(sd: dict[str, torch.Tensor]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim).

    emb[:, i] = cos(t · ω_i), emb[:, dim/2 + i] = sin(t · ω_i), with ω_i = max_period^(-i / (dim/2)),
    as in openaimodel.py (Vaswani et al. 2017's positional encoding, cosine half first).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def GroupNorm32(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """openaimodel's `normalization()`: 32 groups."""
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (openaimodel.ResBlock).

    h = conv(SiLU(GN(x))); h += Linear(SiLU(emb)); h = conv(dropout(SiLU(GN(h)))); out = skip(x) + h.
    x (B, C_in, H, W), emb (B, 4·model_channels) -> (B, C_out, H, W).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),  # keeps the conv at index 3, as the checkpoint names it
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention of the SpatialTransformer (ldm/modules/attention.py, CrossAttention).

    With `context=None` it is self-attention over the image tokens (attn1); with the text encoder's
    hidden state as context it is cross-attention from image tokens to prompt tokens (attn2).
    x (B, HW, D), context (B, T, D_ctx) -> (B, HW, D). q, k, v have no bias.
    """

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        self.probs_hook = None  # set by sd15.hooks to see or edit this layer's attention probabilities

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, HW, D), (B, T, D), (B, T, D)
        hook = self.probs_hook if self.probs_hook is not None and self.probs_hook.wanted() else None
        return self.to_out(attention(q, k, v, self.heads, probs_hook=hook))  # (B, HW, D)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): proj(x) = [a, g]; out = a · GELU(g)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4× inner width; `net.0.proj` and `net.2` as the checkpoint names them."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, GEGLU feed-forward.

    x = x + attn1(LN(x)); x = x + attn2(LN(x), context); x = x + ff(LN(x)). x (B, HW, D) -> (B, HW, D).
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (ldm/modules/attention.py, SpatialTransformer).

    x (B, C, H, W) -> GN -> 1×1 conv -> tokens (B, HW, C) -> blocks -> (B, C, H, W) -> 1×1 conv, + x.
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int):
        super().__init__()
        self.norm = GroupNorm32(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return self.proj_out(h) + x


class Downsample(nn.Module):
    """3×3 convolution of stride 2: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3×3 convolution.

    The target size is the matching skip connection's, so that latents whose side is not a multiple
    of 8 come back to the size they went down from (as diffusers' `upsample_size` does).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers that hands each one the inputs it takes: emb, context, or a target size."""

    def forward(self, x, emb, context, upsample_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


def time_embedding(c: UNetConfig) -> nn.Sequential:
    """`time_embed`: the sinusoidal embedding (model_channels wide) -> Linear, SiLU, Linear -> 4·model_channels."""
    emb_dim = 4 * c.model_channels
    return nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def encoder_blocks(c: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """`input_blocks`, the UNet's way down, and the width of each block's output (the skip connections).

    Shared with sd15.controlnet, whose trainable copy of the encoder has the same blocks under the same names.
    """
    ch, emb_dim = c.model_channels, 4 * c.model_channels
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
    skip_channels = [ch]  # the width of every feature map the output blocks will concatenate
    ds = 1  # current downsampling factor
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            layers = [ResBlock(ch, emb_dim, mult * c.model_channels)]
            ch = mult * c.model_channels
            if ds in c.attention_resolutions:
                layers.append(SpatialTransformer(ch, c.num_heads, c.transformer_depth, c.context_dim))
            blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(c.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
            ds *= 2
    return blocks, skip_channels


def middle_block(c: UNetConfig) -> TimestepEmbedSequential:
    """`middle_block` at the lowest resolution: ResBlock, SpatialTransformer, ResBlock."""
    ch, emb_dim = c.model_channels * c.channel_mult[-1], 4 * c.model_channels
    return TimestepEmbedSequential(
        ResBlock(ch, emb_dim, ch), SpatialTransformer(ch, c.num_heads, c.transformer_depth, c.context_dim), ResBlock(ch, emb_dim, ch)
    )


class UNet(nn.Module):
    """eps_θ(x_t, t, c): predicts the noise in latent x_t at timestep t given text context c.

    x (B, in_channels, h, w), t (B,) float or int timesteps in [0, 1000), context (B, T, context_dim)
    -> (B, out_channels, h, w). Any h, w work (sizes not divisible by 8 included).
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = c = config
        self.time_embed = time_embedding(c)
        self.input_blocks, skip_channels = encoder_blocks(c)
        self.middle_block = middle_block(c)

        emb_dim, ch, ds = 4 * c.model_channels, skip_channels[-1], 2 ** (len(c.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(SpatialTransformer(ch, c.num_heads, c.transformer_depth, c.context_dim))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`down_residuals` (one per input block, each shaped like its output) and `mid_residual` (shaped like
        the middle block's output) are a ControlNet's (sd15.controlnet): added to the skip connections and to
        the middle block's output, as ldm's ControlledUnetModel adds its `control`. Without them, the plain UNet."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (B, 4·C)
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if mid_residual is not None:
            h = h + mid_residual.to(h.dtype)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals has {len(down_residuals)} tensors; this UNet has {len(skips)} skip connections")
            skips = [skip + residual.to(skip.dtype) for skip, residual in zip(skips, down_residuals)]
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = block(h, emb, context, upsample_size=skips[-1].shape[-2:] if skips else None)
        return self.out(h)
