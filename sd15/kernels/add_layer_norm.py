"""The residual add fused with the LayerNorm after it, the epilogue of each sublayer of a transformer block.

A SD1.x `BasicTransformerBlock` (sd15/unet.py) runs three pre-norm sublayers over tokens x (B, T, D):

    x = x + attn1(norm1(x));  x = x + attn2(norm2(x), context);  x = x + ff(norm3(x))

Run in PyTorch, each `x + sublayer(...)` is a pass that reads two (B, T, D) tensors and writes one, and the
LayerNorm after it reads that sum again (and once more for its statistics, in some kernels). The kernel
here does both in one pass: it reads x and the sublayer's output once, and writes the new residual stream
and its normalised copy, which the next sublayer takes as input. Twice per block, 16 blocks per UNet call.

    s = x + delta                               (rounded to x's dtype, as the reference add rounds it)
    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias      (statistics over the last dim, float32)

Each program normalises whole rows (D = 320, 640 or 1280 in SD1.5: a row fits in one tile), so the mean
and the variance come from one tile held in registers: centred before squaring, no E[x²] - E[x]².
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

TILE_ELEMENTS = 4096  # rows per program = TILE_ELEMENTS // next_power_of_2(D): 8 rows of 320 or 640, 2 of 1280


def add_layer_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(s, LayerNorm(s)) for s = x + delta, both (…, D) in x's dtype: what the reference block computes."""
    s = x + delta
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Triton `add_layer_norm_reference`: one pass over x and delta (…, D), statistics in float32."""
    assert x.shape == delta.shape, f"the residual {tuple(x.shape)} and the sublayer output {tuple(delta.shape)} differ"
    *lead, features = x.shape
    x2 = x.contiguous().reshape(-1, features)  # (M, D), M = B*T
    d2 = delta.to(x.dtype).contiguous().reshape(-1, features)
    total, normed = torch.empty_like(x2), torch.empty_like(x2)
    rows = x2.shape[0]
    if rows == 0 or features == 0:
        return total.reshape(x.shape), normed.reshape(x.shape)
    block_features = triton.next_power_of_2(features)
    block_rows = max(1, TILE_ELEMENTS // block_features)
    grid = (triton.cdiv(rows, block_rows),)
    _add_layer_norm_kernel[grid](
        x2, d2, weight, bias, total, normed, rows, features, eps,
        BLOCK_ROWS=block_rows, BLOCK_FEATURES=block_features,
    )  # fmt: skip
    return total.reshape(*lead, features), normed.reshape(*lead, features)


@triton.jit
def _add_layer_norm_kernel(x_ptr, delta_ptr, weight_ptr, bias_ptr, total_ptr, normed_ptr, rows, features, eps,
                           BLOCK_ROWS: tl.constexpr, BLOCK_FEATURES: tl.constexpr):  # fmt: skip
    """Rows [pid·BLOCK_ROWS, +BLOCK_ROWS) whole: total = x + delta, normed = LayerNorm(total)."""
    m = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
    f = tl.arange(0, BLOCK_FEATURES)  # (BLOCK_FEATURES,)
    in_row = f < features
    inside = (m < rows)[:, None] & in_row[None, :]  # (BLOCK_ROWS, BLOCK_FEATURES)
    offsets = m.to(tl.int64)[:, None] * features + f[None, :]  # int64: M * D can pass 2^31
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    total = (x + delta).to(total_ptr.dtype.element_ty)  # the residual stream, rounded like the reference add
    tl.store(total_ptr + offsets, total, mask=inside)

    s = total.to(tl.float32)
    mean = tl.sum(s, axis=1) / features  # (BLOCK_ROWS,): masked lanes hold 0
    centred = tl.where(inside, s - mean[:, None], 0.0)
    variance = tl.sum(centred * centred, axis=1) / features  # biased, as LayerNorm's
    inverse_std = 1.0 / tl.sqrt(variance + eps)
    weight = tl.load(weight_ptr + f, mask=in_row, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + f, mask=in_row, other=0.0).to(tl.float32)
    normed = centred * inverse_std[:, None] * weight[None, :] + bias[None, :]
    tl.store(normed_ptr + offsets, normed.to(normed_ptr.dtype.element_ty), mask=inside)
