"""GroupNorm (Wu & He 2018, "Group Normalization"), fused with the SiLU after it and the add before it.

Every ResBlock of the UNet and the VAE computes `silu(group_norm(h))`, and the second norm of a UNet
ResBlock reads `h + emb_layers(emb)[:, :, None, None]`. GroupNorm is memory-bound: it does a few flops
per element it moves. Run unfused, the add, the norm and the SiLU (Ramachandran et al. 2017, "Searching
for Activation Functions") each read and write the whole feature map; fused, the map is read twice (once
for the statistics, once to normalise) and written once.

`group_norm_reference` is the definition and the tests' oracle; `group_norm` is the Triton version, laid
out for channels_last (B, H, W, C) fp16/bf16 maps but correct for any memory format.
"""

import torch
import triton
import triton.language as tl

# Statistics: each program reduces tiles of STATS_TILE_ELEMENTS values of one (batch, group), and at most
# MAX_STATS_CHUNKS programs share a group. 4096 fp32 values are 32 registers a thread at 4 warps. Splitting
# a group matters for the VAE decoder: 32 groups of a 512×512 map are 32 programs, too few to fill a GPU.
STATS_TILE_ELEMENTS = 4096
MAX_STATS_CHUNKS = 64
# Normalisation: tiles of 64 positions × 64 channels. Every SD1.5 width (128 … 2560) is a multiple of
# 64, so no lane is masked, and 64 fp16 channels of one position are one 128-byte line in channels_last.
APPLY_BLOCK_HW = 64
APPLY_BLOCK_C = 64


def group_norm_reference(x, weight, bias, num_groups, eps, silu=False, channel_bias=None):
    """`silu(GroupNorm(x + channel_bias))` in plain PyTorch, with statistics in float32 (or float64).

    x (B, C, H, W) in any dtype and memory format; weight, bias (C,); channel_bias (B, C) or None,
    added in float32 before the statistics. Returns x's dtype and memory format.
    """
    B, C, H, W = x.shape
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    if channel_bias is not None:
        h = h + channel_bias.to(compute)[:, :, None, None]
    groups = h.reshape(B, num_groups, -1)  # (B, G, C/G*H*W)
    mean = groups.mean(-1, keepdim=True)
    var = groups.var(-1, unbiased=False, keepdim=True)  # biased, as GroupNorm divides by the group size
    h = ((groups - mean) * torch.rsqrt(var + eps)).reshape(B, C, H, W)
    h = h * weight.to(compute)[:, None, None] + bias.to(compute)[:, None, None]
    if silu:
        h = h * torch.sigmoid(h)
    return h.to(x.dtype).contiguous(memory_format=_memory_format(x))


def group_norm(x, weight, bias, num_groups, eps, silu=False, channel_bias=None):
    """Triton `group_norm_reference`: same arguments, same result to within output rounding, and the
    output in x's memory format (channels_last for views that are neither NCHW nor NHWC).

    Three launches: partial statistics of tiles of each group, their combination into a mean and rstd
    per (batch, group), and one pass that normalises, applies the affine, the SiLU, and stores.
    """
    B, C, H, W = x.shape
    assert C % num_groups == 0, f"{C} channels do not split into {num_groups} groups"
    assert C * H * W < 2**31, "offsets within one image are int32"
    y = torch.empty_like(x)  # keeps x's memory format
    if x.numel() == 0:
        return y
    # The kernels see the map as (B, C, HW) through strides, which needs H and W to merge into one axis:
    # true of NCHW and NHWC, but not of every view.
    if not _hw_merges(x):
        x = x.contiguous(memory_format=torch.channels_last)
    if not _hw_merges(y):
        y = torch.empty_like(x, memory_format=torch.channels_last)
    HW, cg = H * W, C // num_groups
    cb = channel_bias.contiguous() if channel_bias is not None else x  # x: an unread placeholder

    block_cg = triton.next_power_of_2(cg)
    block_hw = max(1, STATS_TILE_ELEMENTS // block_cg)
    num_tiles = triton.cdiv(HW, block_hw)
    num_chunks = min(num_tiles, MAX_STATS_CHUNKS)
    partial = torch.empty(3, B * num_groups, num_chunks, device=x.device, dtype=torch.float32)
    _partial_stats_kernel[(B * num_groups, num_chunks)](
        x, cb, partial[0], partial[1], partial[2],
        HW, C, cg, num_tiles, num_chunks, x.stride(0), x.stride(1), x.stride(3),
        HAS_CHANNEL_BIAS=channel_bias is not None, BLOCK_HW=block_hw, BLOCK_CG=block_cg,
    )  # fmt: skip
    mean = torch.empty(B * num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _finalize_stats_kernel[(B * num_groups,)](
        partial[0], partial[1], partial[2], mean, rstd, num_chunks, eps,
        BLOCK_CHUNKS=triton.next_power_of_2(MAX_STATS_CHUNKS),  # one compiled variant for every shape
    )  # fmt: skip
    grid = (triton.cdiv(HW, APPLY_BLOCK_HW), triton.cdiv(C, APPLY_BLOCK_C), B)
    _apply_kernel[grid](
        x, cb, weight.contiguous(), bias.contiguous(), mean, rstd, y,
        HW, C, cg, x.stride(0), x.stride(1), x.stride(3), y.stride(0), y.stride(1), y.stride(3),
        HAS_CHANNEL_BIAS=channel_bias is not None, SILU=silu, BLOCK_HW=APPLY_BLOCK_HW, BLOCK_C=APPLY_BLOCK_C,
    )  # fmt: skip
    return y


def _hw_merges(x: torch.Tensor) -> bool:
    return x.stride(2) == x.stride(3) * x.shape[3]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


# Why centred tiles and Chan's merge, not running sums of x and x²: var = E[x²] - E[x]² cancels in float32
# when |mean| >> std, which VAE decoder activations can be (its groups hold up to 2M values); at
# mean/std = 1e3 the two terms agree in their first 6 digits, float32 keeps about 7, and the variance comes
# out with errors of tens of percent (measured: 20%). Here each tile, held in registers, is centred on its
# own mean before squaring, and tiles are merged with the pairwise update of Chan, Golub & LeVeque (1979),
# so errors stay relative to the variance itself. What is left is the float32 error of the mean, a few
# units in the last place of |mean|, which is also what storing the mean in float32 costs.
@triton.jit
def _partial_stats_kernel(
    x_ptr, cb_ptr, count_ptr, mean_ptr, m2_ptr,  # count, mean, m2: (B*G, num_chunks) float32
    HW, C, cg, num_tiles, num_chunks, stride_b, stride_c, stride_hw,
    HAS_CHANNEL_BIAS: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_CG: tl.constexpr,
):  # fmt: skip
    """Count, mean and sum of squared deviations (m2) of tiles chunk, chunk + num_chunks, … of one group."""
    bg = tl.program_id(0)  # b * G + g
    chunk = tl.program_id(1)
    b = bg // (C // cg)
    g = bg % (C // cg)
    c = g * cg + tl.arange(0, BLOCK_CG)  # (BLOCK_CG,) channels of group g
    c_in = tl.arange(0, BLOCK_CG) < cg
    x_ptr += b.to(tl.int64) * stride_b
    if HAS_CHANNEL_BIAS:
        cb = tl.load(cb_ptr + b * C + c, mask=c_in, other=0.0).to(tl.float32)  # (BLOCK_CG,)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for tile in range(chunk, num_tiles, num_chunks):
        hw = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)  # (BLOCK_HW,)
        inside = (hw < HW)[:, None] & c_in[None, :]  # (BLOCK_HW, BLOCK_CG)
        v = tl.load(x_ptr + hw[:, None] * stride_hw + c[None, :] * stride_c, mask=inside, other=0.0)
        v = v.to(tl.float32)
        if HAS_CHANNEL_BIAS:
            v = tl.where(inside, v + cb[None, :], 0.0)
        tile_count = (tl.minimum(HW - tile * BLOCK_HW, BLOCK_HW) * cg).to(tl.float32)
        tile_mean = tl.sum(v) / tile_count
        tile_m2 = tl.sum(tl.where(inside, (v - tile_mean) * (v - tile_mean), 0.0))
        # Chan et al.: merge (count, mean, m2) with the tile's.
        delta = tile_mean - mean
        total = count + tile_count
        mean += delta * (tile_count / total)
        m2 += tile_m2 + delta * delta * (count * tile_count / total)
        count = total
    tl.store(count_ptr + bg * num_chunks + chunk, count)
    tl.store(mean_ptr + bg * num_chunks + chunk, mean)
    tl.store(m2_ptr + bg * num_chunks + chunk, m2)


@triton.jit
def _finalize_stats_kernel(
    count_ptr, mean_ptr, m2_ptr, group_mean_ptr, group_rstd_ptr,  # group_mean, group_rstd: (B*G,)
    num_chunks, eps, BLOCK_CHUNKS: tl.constexpr,
):  # fmt: skip
    """Merge the chunks of one group, all at once: the same update as above, summed over chunks."""
    bg = tl.program_id(0)
    i = tl.arange(0, BLOCK_CHUNKS)
    offsets = bg * num_chunks + i
    inside = i < num_chunks
    n = tl.load(count_ptr + offsets, mask=inside, other=0.0)  # (BLOCK_CHUNKS,)
    chunk_mean = tl.load(mean_ptr + offsets, mask=inside, other=0.0)
    chunk_m2 = tl.load(m2_ptr + offsets, mask=inside, other=0.0)
    total = tl.sum(n)
    mean = tl.sum(n * chunk_mean) / total
    var = (tl.sum(chunk_m2) + tl.sum(n * (chunk_mean - mean) * (chunk_mean - mean))) / total
    tl.store(group_mean_ptr + bg, mean)
    tl.store(group_rstd_ptr + bg, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _apply_kernel(
    x_ptr, cb_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, y_ptr,  # mean, rstd: (B*G,)
    HW, C, cg, stride_xb, stride_xc, stride_xhw, stride_yb, stride_yc, stride_yhw,
    HAS_CHANNEL_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """y = silu((x + cb - mean) * rstd * weight + bias) on one (BLOCK_HW, BLOCK_C) tile of image b."""
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)  # (BLOCK_HW,)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,), may span several groups
    b = tl.program_id(2)
    c_in = c < C
    inside = (hw < HW)[:, None] & c_in[None, :]  # (BLOCK_HW, BLOCK_C)
    stats = b * (C // cg) + c // cg  # each channel's (b, g)
    mean = tl.load(mean_ptr + stats, mask=c_in, other=0.0)  # (BLOCK_C,)
    scale = tl.load(rstd_ptr + stats, mask=c_in, other=0.0) * tl.load(w_ptr + c, mask=c_in).to(tl.float32)
    shift = tl.load(b_ptr + c, mask=c_in).to(tl.float32)
    x_ptrs = x_ptr + b.to(tl.int64) * stride_xb + hw[:, None] * stride_xhw + c[None, :] * stride_xc
    v = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
    if HAS_CHANNEL_BIAS:
        v += tl.load(cb_ptr + b * C + c, mask=c_in, other=0.0).to(tl.float32)[None, :]
    h = (v - mean[None, :]) * scale[None, :] + shift[None, :]
    if SILU:
        h = h * tl.sigmoid(h)
    y_ptrs = y_ptr + b.to(tl.int64) * stride_yb + hw[:, None] * stride_yhw + c[None, :] * stride_yc
    tl.store(y_ptrs, h.to(y_ptr.dtype.element_ty), mask=inside)
