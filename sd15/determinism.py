"""Bit-reproducible runs on CUDA, at some cost in speed.

On the CPU sd15 is deterministic by construction for a given thread count: every image has its own seeded
CPU generator, images are denoised one at a time, and PyTorch's CPU kernels do not race. (More threads split
sums differently, so 1 and 2 threads differ in the last float32 bits: see docs/reliability.md.)

On CUDA, some kernels pick algorithms by benchmarking (cuDNN) or accumulate with atomics, so two runs can
differ in the last bits. `enable()` asks PyTorch for deterministic algorithms everywhere:
- `torch.use_deterministic_algorithms(True)`: an operation without a deterministic CUDA kernel raises
  instead of running nondeterministically;
- cuDNN: `deterministic = True`, `benchmark = False` (no autotuning: the same algorithm every run);
- cuBLAS: `CUBLAS_WORKSPACE_CONFIG=:4096:8`, which cuBLAS needs for reproducible GEMM reductions; it must
  be set before the first cuBLAS call, so `enable()` belongs at the start of the program;
- TF32 matmul off, so reductions keep full float32 precision;
- but `torch.utils.deterministic.fill_uninitialized_memory = False`: PyTorch's deterministic mode would
  also fill every new empty tensor with NaN, so that a program reading memory it never wrote sees NaN
  instead of whatever was there. sd15 writes every element of what it allocates (its outputs are compared
  element by element with reference implementations in the tests), so the fill would only cost a write
  pass over every new feature map. A kernel that did read unwritten memory would still be caught: its
  runs would differ, which `tests/gpu` checks by comparing two deterministic runs bit for bit.
"""

from __future__ import annotations

import os
import warnings

import torch


def enable() -> None:
    """Make later CUDA work reproducible run to run (see the module docstring for what it sets)."""
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_initialized():
        warnings.warn(
            "sd15.determinism.enable() was called after CUDA started: PyTorch reads CUBLAS_WORKSPACE_CONFIG at "
            "its first matrix product, so if one already ran, the next will raise. Call enable() before any "
            "CUDA work, or start Python with CUBLAS_WORKSPACE_CONFIG=:4096:8 set.",
            stacklevel=2,
        )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.utils.deterministic.fill_uninitialized_memory = False


def is_enabled() -> bool:
    return torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
