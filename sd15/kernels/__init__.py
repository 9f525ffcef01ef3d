"""Triton kernels for the CUDA fast path, each beside the plain-PyTorch reference it must match.

- `group_norm.py`: GroupNorm (Wu & He 2018) over (B, C, H, W) feature maps, optionally fused with the
  ResBlock's per-channel embedding add before it and the SiLU after it.
- `geglu.py`: the GEGLU gate of the transformer feed-forward (Shazeer 2020), `a * gelu(gate)`.
- `add_layer_norm.py`: a transformer sublayer's residual add fused with the LayerNorm after it.

The kernel modules import triton at the top, so import them only when `triton_available()` says so;
this package itself imports nothing heavy and never fails without triton. The references
(`group_norm_reference`, `geglu_reference`, `add_layer_norm_reference`) are the readable definition and
the tests' oracle.
Callers choose between kernel and reference; there is no dispatcher here.
"""

from __future__ import annotations

import importlib
import os


def triton_available() -> bool:
    """True when triton is installed and can run here: on a CUDA device, or on the CPU through
    triton's interpreter (`TRITON_INTERPRET=1`, set before any kernel module is imported)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
