"""Scaled dot-product attention, the one function every sd15 model calls.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V          (Vaswani et al. 2017, eq. 1)

The UNet's self- and cross-attention, the VAE's mid-block attention and the CLIP text transformer all
come through `attention()`, so that a faster kernel (or a hook that needs the attention probabilities)
changes one place. Two paths compute the same thing:

- the default path calls `torch.nn.functional.scaled_dot_product_attention`, which picks a fused
  kernel (flash, memory-efficient, cuDNN) when one applies and never materialises the (Tq, Tk) matrix;
- `explicit=True` writes the softmax out in plain PyTorch. It is the readable reference, the oracle of
  the tests, and the path to take when the probabilities themselves are wanted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, h, T, D/h)."""
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)  # (B, h, T, D/h)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, T, D/h) -> (B, T, D)."""
    B, h, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, h * d)  # (B, T, D)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) for per-head q (B, h, Tq, d) and k (B, h, Tk, d) -> (B, h, Tq, Tk)."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, h, Tq, Tk)
    if causal:
        Tq, Tk = scores.shape[-2:]
        future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    # softmax in float32 so that fp16 scores of large magnitude do not overflow
    return scores.float().softmax(dim=-1).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    causal: bool = False,
    explicit: bool = False,
    probs_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Multi-head attention over already-projected queries, keys and values.

    q: (B, Tq, D); k, v: (B, Tk, D); returns (B, Tq, D). `causal` lets position i attend only to
    positions <= i (the CLIP text transformer). `explicit` selects the plain-PyTorch reference path.
    `probs_hook(probs) -> probs` sees (and may replace) the probabilities (B, h, Tq, Tk); it implies the
    explicit path, since fused kernels never form them (see sd15.hooks).
    """
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)  # (B, h, T, d)
    if explicit or probs_hook is not None:
        probs = attention_probabilities(q, k, causal)  # (B, h, Tq, Tk)
        if probs_hook is not None:
            probs = probs_hook(probs)
        out = probs @ v  # (B, h, Tq, d)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, Tq, d)
    return merge_heads(out)  # (B, Tq, D)
