"""torch.randn as CUDA computes it, on the CPU: the noise a seed gives on an NVIDIA GPU, on any machine.

torch's CUDA generator is Philox 4x32-10 (Salmon et al. 2011, "Parallel Random Numbers: As Easy as 1, 2, 3"), a
counter-based generator: the i-th number of a draw is a pure function of (seed, draw offset, i), ten rounds of

    (c0, c1, c2, c3) <- (hi(c2·M1) ^ c1 ^ k0,  lo(c2·M1),  hi(c0·M0) ^ c3 ^ k1,  lo(c0·M0))
    (k0, k1)         <- (k0 + W0, k1 + W1)                          (32-bit words, the key starting as the seed)

on the counter (offset, 0, i, 0), whose first two output words u, v give one normal number by Box-Muller:
sqrt(-2 ln U) · sin(2π V), with U and V the words scaled into (0, 1). The AUTOMATIC1111 web UI computes the
same on the CPU as its "NV" RNG setting; its default, "GPU", draws it on the GPU, so a PNG made there with the
defaults starts from this noise, not from the CPU generator's.

`PhiloxGenerator(seed)` stands in for a CUDA `torch.Generator`: each `randn` call is the next draw (offset + 1),
as the web UI's emulation counts them. The arithmetic is the web UI's: the words scaled by float32 constants in
float64, the result rounded to float32 (tests/test_philox.py checks the numbers CUDA gives for seed 0).
"""

from __future__ import annotations

import numpy as np
import torch

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # M0, M1
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)  # W0, W1: the golden ratio's and sqrt(3) - 1's bits
ROUNDS = 10
TO_UNIT = np.float32(2.3283064e-10)  # 2^-32, as a float32
TO_ANGLE = np.float32(2.3283064e-10 * 6.2831855)  # 2^-32 · 2π, as a float32


def _words(product: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) 32-bit words of 64-bit products."""
    return (product >> np.uint64(32)).astype(np.uint32), (product & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def philox_4x32(counter: list[np.ndarray], key: list[np.ndarray]) -> list[np.ndarray]:
    """Ten rounds of Philox 4x32 on `counter` (four uint32 arrays) with `key` (two uint32 arrays)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(ROUNDS):
        hi0, lo0 = _words(c0.astype(np.uint64) * np.uint64(MULTIPLIERS[0]))
        hi2, lo2 = _words(c2.astype(np.uint64) * np.uint64(MULTIPLIERS[1]))
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        if round_ < ROUNDS - 1:
            k0, k1 = k0 + np.uint32(KEY_STEPS[0]), k1 + np.uint32(KEY_STEPS[1])
    return [c0, c1, c2, c3]


def philox_normal(seed: int, offset: int, n: int) -> np.ndarray:
    """The n standard normal numbers of draw `offset` from `seed`, float32."""
    index = np.arange(n, dtype=np.uint32)
    zeros = np.zeros(n, dtype=np.uint32)
    seed64 = np.uint64(seed % 2**64)
    key = [np.full(n, seed64 & np.uint64(0xFFFFFFFF), dtype=np.uint32), np.full(n, seed64 >> np.uint64(32), dtype=np.uint32)]
    u, v, _, _ = philox_4x32([np.full(n, offset, dtype=np.uint32), zeros, index, zeros.copy()], key)
    radius = np.sqrt(-2.0 * np.log(u * np.float64(TO_UNIT) + np.float64(TO_UNIT) / 2))
    return (radius * np.sin(v * np.float64(TO_ANGLE) + np.float64(TO_ANGLE) / 2)).astype(np.float32)


class PhiloxGenerator:
    """A CUDA torch.Generator's normal draws, on the CPU: `randn(shape)` is the next draw."""

    device = torch.device("cpu")

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape) -> torch.Tensor:
        n = int(np.prod(shape)) if len(shape) else 1
        if n >= 2**32:
            raise ValueError("a Philox draw holds at most 2^32 numbers")
        values = philox_normal(self.seed, self.offset, n)
        self.offset += 1
        return torch.from_numpy(values).reshape(tuple(shape))
