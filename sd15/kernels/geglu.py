"""GEGLU, the gated feed-forward activation of the SD1.x transformer blocks (Shazeer 2020, "GLU Variants
Improve Transformer"): `ff.net.0.proj` maps (B, T, D) to (B, T, 2F) with F = 4D, and GEGLU halves it to
`a * gelu(gate)` where `a, gate = h.chunk(2, -1)` (CompVis `ldm/modules/attention.py`, `GEGLU`).

Run in PyTorch this is a gelu kernel reading the gate half and writing its result, then a multiply
reading that and the other half: two passes over memory for a few flops. The Triton kernel reads h once
and writes the (…, F) output once, computing in float32 and rounding once.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Tiles of 8 rows × 256 features: F = 1280, 2560 and 5120 in SD1.5 are multiples of 256, so no lane is
# masked, and 256 fp16 values are four 128-byte lines of each half.
BLOCK_ROWS = 8
BLOCK_FEATURES = 256


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """(…, 2F) -> (…, F): `a * gelu(gate)` with the exact (erf) GELU, in h's dtype, as CompVis computes it."""
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """Triton `geglu_reference`: (…, 2F) -> (…, F), h's dtype, computed in float32 and rounded once."""
    *lead, two_f = h.shape
    assert two_f % 2 == 0, f"GEGLU needs an even last dimension, got {two_f}"
    features = two_f // 2
    h = h.contiguous().reshape(-1, two_f)  # (M, 2F), M = B*T
    rows = h.shape[0]
    out = torch.empty(rows, features, device=h.device, dtype=h.dtype)  # (M, F)
    if out.numel() == 0:
        return out.reshape(*lead, features)
    block_features = min(BLOCK_FEATURES, triton.next_power_of_2(features))
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(features, block_features))
    _geglu_kernel[grid](h, out, rows, features, BLOCK_ROWS=BLOCK_ROWS, BLOCK_FEATURES=block_features)
    return out.reshape(*lead, features)


@triton.jit
def _geglu_kernel(h_ptr, out_ptr, rows, features, BLOCK_ROWS: tl.constexpr, BLOCK_FEATURES: tl.constexpr):
    """out[m, f] = h[m, f] * gelu(h[m, F + f]) on one (BLOCK_ROWS, BLOCK_FEATURES) tile."""
    m = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,)
    f = tl.program_id(1) * BLOCK_FEATURES + tl.arange(0, BLOCK_FEATURES)  # (BLOCK_FEATURES,)
    inside = (m < rows)[:, None] & (f < features)[None, :]  # (BLOCK_ROWS, BLOCK_FEATURES)
    h_row = h_ptr + m.to(tl.int64)[:, None] * (2 * features)  # row starts, int64: M * 2F can pass 2^31
    a = tl.load(h_row + f[None, :], mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(h_row + features + f[None, :], mask=inside, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))  # gate·Φ(gate), Φ the normal CDF
    out = out_ptr + m.to(tl.int64)[:, None] * features + f[None, :]
    tl.store(out, (a * gelu).to(out_ptr.dtype.element_ty), mask=inside)
