"""Tiled VAE decoding and encoding, for images whose activations would not fit in memory in one piece.

The VAE's memory goes to its full-resolution activations: decoding 2048×2048 holds 256 channels × 2048² floats
(4 GB in fp32) several times over inside one ResnetBlock, and its mid-block attention over 256² = 65536 latent
pixels is a 17 GB score matrix when the attention kernel materialises it. Running in spatial tiles bounds the
first, computing the attention a band of queries at a time bounds the second. Two of the VAE's layers are not
local, and cutting them naively is what makes tiled decoders show seams and colour shifts:

- GroupNorm normalises each group of channels by its mean and variance over the *whole* image. A tile that
  computes its own statistics is normalised differently from its neighbour.
- The mid block's attention mixes every latent pixel with every other.

So this module tiles only what is local and keeps the rest global:

    latent (B, 4, h, w) -> post_quant_conv, conv_in, mid block: whole, at latent resolution (attention in bands)
    each up level, layer by layer, stored whole between layers but computed tile by tile:
        ResnetBlock: stats of x over the whole image -> tiles of conv1(SiLU(GN1(x)))   -> h
                     stats of h over the whole image -> tiles of shortcut(x) + conv2(SiLU(GN2(h)))
        (after an Upsample, x = conv(nearest×2(x_low)) is recomputed per tile instead of stored, its statistics
        summed tile by tile; an identity shortcut writes its output over x)
    norm_out, SiLU, conv_out: tiles, with whole-image statistics

Every tile reads its input with an overlap (a halo) beyond its own region as wide as its convolutions need;
each tile's centre is written, the halo dropped. Every GroupNorm uses statistics over the whole image
(accumulated in float64), so a tile computes exactly what the untiled network computes at those pixels:
there are no seams to blend away, and the result equals `vae.decode` up to floating-point rounding (the tests
check 1e-4 of the output range at tile borders and away from them). Peak memory is about three full-resolution
activations of the first level (2048²: the 256-channel input at 1024², h and the output at 2048²), plus a tile's
temporaries; `scripts/measure_tiled_vae.py` measures it.

The encoder is tiled the same way (its Downsample's stride-2 convolution reads a halo of two output pixels).
`decode` and `encode` pick the tiled path by themselves when the untiled one would not fit in the memory that
is free (and retry tiled after an out-of-memory error).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import AutoencoderKL, DiagonalGaussian, MidBlock, ResnetBlock

TILE = 256  # tile side, in pixels of the layer being computed: 256² × 512 channels is 128 MB per fp32 tensor


# --------------------------------------------------------------------------- GroupNorm with given statistics


def group_stats(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/std of each (batch, group) over the whole image, in float64: (B, G) each.

    One group at a time, so the float64 copy is C/G channels, not the whole tensor.
    """
    B, C = x.shape[:2]
    G = norm.num_groups
    cg = C // G
    mean = torch.empty(B, G, dtype=torch.float64)
    rstd = torch.empty(B, G, dtype=torch.float64)
    for g in range(G):
        xg = x[:, g * cg : (g + 1) * cg].reshape(B, -1).double()  # (B, cg·H·W)
        mean[:, g] = xg.mean(dim=1).cpu()
        rstd[:, g] = (xg.var(dim=1, unbiased=False) + norm.eps).rsqrt().cpu()
    return mean, rstd


def apply_group_norm(x: torch.Tensor, norm: nn.GroupNorm, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """GN(x) = (x - mean_g) / std_g · weight_c + bias_c, with the given per-group statistics (a tile of x).

    Computed in float32 and rounded once to x's dtype, as torch's GroupNorm does for fp16/bf16: x - mean in
    half precision loses the group's variation when its mean is large against its spread.
    """
    mean, rstd = stats
    C = x.shape[1]
    cg = C // norm.num_groups
    mean = mean.repeat_interleave(cg, dim=1).to(x.device, torch.float32)[..., None, None]  # (B, C, 1, 1)
    rstd = rstd.repeat_interleave(cg, dim=1).to(x.device, torch.float32)[..., None, None]
    weight, bias = norm.weight.float()[:, None, None], norm.bias.float()[:, None, None]  # (C, 1, 1)
    return ((x.float() - mean) * (rstd * weight) + bias).to(x.dtype)


# --------------------------------------------------------------------------- running a local layer in tiles


def map_tiles(fn, inputs: list[torch.Tensor], size: tuple[int, int], halo: int = 1, tile: int | None = None,
              out: torch.Tensor | None = None, visit=None) -> torch.Tensor | None:  # fmt: skip
    """Compute `fn(*inputs)` tile by tile, for a layer whose output pixel depends only on inputs near it.

    size: the output's (H, W). Each input may have its own resolution (H/2, H or 2H: an Upsample or Downsample
    inside `fn`); a tile's window is its output region grown by `halo` output pixels (clamped to the image),
    scaled to each input. `fn` must return the output over that window, of which the tile's own region is
    kept: `halo` is how far wrong values reach in from a window's cut edges (1 per 3×3 convolution at the
    output's resolution). At the image border a window is not grown, so the layer's own padding applies there
    as it does untiled. Tiles and halo are even, so an input at half resolution is cut on whole pixels.
    Results go to `out` (may be an input that `fn` reads only at the pixel it writes), a new tensor, or, with
    `visit`, to visit(region) and nowhere.
    """
    tile = tile or TILE
    Ho, Wo = size
    for oy0 in range(0, Ho, tile):
        for ox0 in range(0, Wo, tile):
            oy1, ox1 = min(oy0 + tile, Ho), min(ox0 + tile, Wo)
            wy0, wx0, wy1, wx1 = max(0, oy0 - halo), max(0, ox0 - halo), min(Ho, oy1 + halo), min(Wo, ox1 + halo)
            windows = []
            for x in inputs:
                H, W = x.shape[-2:]  # window scaled to this input's resolution
                windows.append(x[..., wy0 * H // Ho : -(-wy1 * H // Ho), wx0 * W // Wo : -(-wx1 * W // Wo)])
            result = fn(*windows)[..., oy0 - wy0 : oy1 - wy0, ox0 - wx0 : ox1 - wx0]  # the tile's own region
            if visit is not None:
                visit(result)
                continue
            if out is None:
                out = torch.empty(result.shape[0], result.shape[1], Ho, Wo, dtype=result.dtype, device=result.device)
            out[..., oy0:oy1, ox0:ox1] = result
            del result, windows
    return out


def tile_stats(fn, inputs: list[torch.Tensor], size: tuple[int, int], norm: nn.GroupNorm, halo: int, tile=None):
    """`group_stats` of fn(*inputs) without storing it: sums of x and x² per group over the tiles, in float64."""
    sums = []

    def accumulate(t: torch.Tensor):
        B = t.shape[0]
        v = t.reshape(B, norm.num_groups, -1).double()  # (B, G, n)
        sums.append(torch.stack([v.sum(-1), (v * v).sum(-1), torch.full_like(v[..., 0], v.shape[-1])]).cpu())

    map_tiles(fn, inputs, size, halo, tile, visit=accumulate)
    s1, s2, n = torch.stack(sums).sum(0)  # (B, G) each
    mean = s1 / n
    return mean, ((s2 / n - mean**2).clamp(min=0) + norm.eps).rsqrt()


def resnet_block_tiled(block: ResnetBlock, x: torch.Tensor, tile: int | None = None, upsample: nn.Module | None = None) -> torch.Tensor:
    """`block(x)`, or `block(upsample(x))`, in tiles with whole-image GroupNorm statistics.

    With `upsample` (the previous level's nearest×2 + conv) the block's input, the largest tensor of the decoder
    (256 × 2048² floats for a 2048² image), is never stored: each tile recomputes its part. With an identity
    shortcut the output overwrites x, which it reads only at the pixels it writes. Peak memory: x, h and the output.
    """
    H, W = x.shape[-2:]
    size, halo = ((2 * H, 2 * W), 2) if upsample is not None else ((H, W), 1)
    inp = upsample if upsample is not None else (lambda t: t)  # the block's input, per tile
    if upsample is not None:
        s1 = tile_stats(inp, [x], size, block.norm1, halo, tile)
    else:
        s1 = group_stats(x, block.norm1)
    h = map_tiles(lambda xt: block.conv1(F.silu(apply_group_norm(inp(xt), block.norm1, s1))), [x], size, 2 * halo, tile)
    s2 = group_stats(h, block.norm2)

    def second(ht: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        u = inp(xt)
        shortcut = block.nin_shortcut(u) if hasattr(block, "nin_shortcut") else u
        return shortcut + block.conv2(F.silu(apply_group_norm(ht, block.norm2, s2)))

    in_place = upsample is None and not hasattr(block, "nin_shortcut")
    return map_tiles(second, [h, x], size, halo, tile, out=x if in_place else None)


ATTENTION_SCORES = 2**28  # scores computed at once by the mid block's banded attention: 1 GB in fp32


def mid_block(mid: MidBlock, x: torch.Tensor) -> torch.Tensor:
    """The VAE's mid block on the whole latent, its attention over all h·w pixels computed a band of queries at a
    time (at most ATTENTION_SCORES scores over the batch): at 2048² (65536 tokens) the full score matrix alone
    would be 17 GB per image."""
    x = mid.block_1(x)
    attn = mid.attn_1
    B, C, H, W = x.shape
    h = attn.norm(x)
    q, k, v = (proj(h).flatten(2).transpose(1, 2).contiguous()[:, None] for proj in (attn.q, attn.k, attn.v))  # (B, 1, T, C)
    T = H * W
    chunk = max(1, ATTENTION_SCORES // (B * T))  # queries per band: B · chunk · T scores
    out = torch.cat([F.scaled_dot_product_attention(q[:, :, s : s + chunk], k, v) for s in range(0, T, chunk)], dim=2)
    x = x + attn.proj_out(out[:, 0].transpose(1, 2).reshape(B, C, H, W))
    return mid.block_2(x)


def _norm_act_conv_tiled(norm: nn.GroupNorm, conv: nn.Conv2d, x: torch.Tensor, tile: int) -> torch.Tensor:
    stats = group_stats(x, norm)
    return map_tiles(lambda xt: conv(F.silu(apply_group_norm(xt, norm, stats))), [x], x.shape[-2:], 1, tile)


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """`vae.decode(z)` in tiles: z (B, 4, h, w) unscaled -> image (B, 3, 8h, 8w). See the module docstring."""
    tile = tile or TILE
    if tile < 2 or tile % 2:
        raise ValueError(f"the tile side must be an even number of pixels, got {tile}")
    d = vae.decoder
    h = mid_block(d.mid, d.conv_in(vae.post_quant_conv(z)))  # (B, 512, h, w): whole, for the attention
    upsample = None  # the previous level's Upsample, fused into the next ResnetBlock
    for level in reversed(d.up):
        for block in level.block:
            h, upsample = resnet_block_tiled(block, h, tile, upsample), None
        upsample = getattr(level, level.resample_name, None)
    if upsample is not None:  # an Upsample at the last level (not in SD's VAE)
        h = map_tiles(upsample, [h], (2 * h.shape[-2], 2 * h.shape[-1]), 2, tile)
    return _norm_act_conv_tiled(d.norm_out, d.conv_out, h, tile)


@torch.no_grad()
def encode_tiled(vae: AutoencoderKL, images: torch.Tensor, tile: int | None = None) -> DiagonalGaussian:
    """`vae.encode(images)` in tiles: images (B, 3, H, W) in [-1, 1] -> q(z|x) over (B, 4, H/8, W/8)."""
    tile = tile or TILE
    if tile < 2 or tile % 2:
        raise ValueError(f"the tile side must be an even number of pixels, got {tile}")
    e = vae.encoder
    h = map_tiles(e.conv_in, [images], images.shape[-2:], 2, tile)
    for level in e.down:
        for block in level.block:
            h = resnet_block_tiled(block, h, tile)
        downsample = getattr(level, level.resample_name, None)
        if downsample is not None:  # stride 2: halo of 2 output pixels (even, so input windows stay aligned)
            h = map_tiles(downsample, [h], (h.shape[-2] // 2, h.shape[-1] // 2), 2, tile)
    h = mid_block(e.mid, h)  # latent resolution, whole
    return DiagonalGaussian(vae.quant_conv(e.conv_out(F.silu(e.norm_out(h)))))


# --------------------------------------------------------------------------- choosing tiled or not


def untiled_bytes(vae: AutoencoderKL, height: int, width: int, batch: int, dtype: torch.dtype, decoder: bool = True) -> int:
    """A rough upper estimate of the untiled VAE's peak activation memory for images of height × width.

    The peak is in the first full-resolution ResnetBlock: its input (widths[1] channels in the decoder, after
    the last Upsample; widths[0] in the encoder), the input's normalised and activated copies, and the block's
    output, about four tensors of that size. (Measured on the CPU: 512×512 in fp32 peaks near 1 GB.)
    """
    widths = [vae.config.ch * m for m in vae.config.ch_mult]
    channels = widths[1] if decoder and len(widths) > 1 else widths[0]
    itemsize = torch.empty((), dtype=dtype).element_size()
    tokens = (height // vae.downscale_factor) * (width // vae.downscale_factor)
    attention_scores = batch * tokens**2 * 4  # the mid block's attention, if the kernel materialises it (fp32)
    return 4 * batch * channels * height * width * itemsize + attention_scores


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`, or None if it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            import psutil

            return psutil.virtual_memory().available
        except ImportError:
            return None
    return None


def should_tile(vae: AutoencoderKL, height: int, width: int, batch: int, device: torch.device, dtype, decoder=True) -> bool:
    """True when the untiled pass is estimated not to fit in 80% of the free memory."""
    if os.environ.get("SD15_TILED_VAE") in ("0", "1"):  # force either way (tests, benchmarks)
        return os.environ["SD15_TILED_VAE"] == "1"
    free = free_bytes(device)
    return free is not None and untiled_bytes(vae, height, width, batch, dtype, decoder) > 0.8 * free


def _is_out_of_memory(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message or "can't allocate memory" in message


def _unless_out_of_memory(fn, x: torch.Tensor):
    """fn(x), or None when it runs out of memory (the caches are emptied, so a tiled retry has room)."""
    try:
        return fn(x)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise
    if x.device.type == "cuda":
        torch.cuda.empty_cache()  # after the except block, so the error's frames no longer hold the memory
    return None


@torch.no_grad()
def decode(vae: AutoencoderKL, z: torch.Tensor, tiled: bool | None = None, tile: int | None = None) -> torch.Tensor:
    """z (B, 4, h, w), unscaled -> image (B, 3, 8h, 8w): untiled when it fits, else tiled (`tiled` forces it)."""
    f = vae.downscale_factor
    if tiled is None:
        tiled = should_tile(vae, z.shape[-2] * f, z.shape[-1] * f, z.shape[0], z.device, z.dtype)
    if not tiled and (images := _unless_out_of_memory(vae.decode, z)) is not None:
        return images
    return decode_tiled(vae, z, tile)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, tiled: bool | None = None, tile: int | None = None) -> DiagonalGaussian:
    """images (B, 3, H, W) in [-1, 1] -> q(z|x): untiled when it fits, else tiled (`tiled` forces it)."""
    if tiled is None:
        tiled = should_tile(vae, images.shape[-2], images.shape[-1], images.shape[0], images.device, images.dtype, False)
    if not tiled and (posterior := _unless_out_of_memory(vae.encode, images)) is not None:
        return posterior
    return encode_tiled(vae, images, tile)
