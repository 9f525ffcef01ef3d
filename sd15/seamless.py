"""Seamless images: pictures that tile, their left edge continuing their right and their top their bottom.

A convolution pads its input at the border; SD's pad with zeros, so the model sees an edge there and paints one.
Padding each side with the opposite side's pixels instead ("circular" padding) makes every convolution see the
image as drawn on a torus: the UNet and the VAE then have no border at all, and what they make repeats without a
seam. Attention and GroupNorm look at the whole image at once and have no border to begin with, so the two
models become exactly equivariant to circular shifts (by a multiple of the UNet's total downsampling): a shifted
start gives the shifted picture (tests/test_seamless.py checks this).

This is the AUTOMATIC1111 web UI's "Tiling" option (its PNGs record `Tiling: True`), which switches every
Conv2d of its model, the UNet and the VAE, to circular padding; ControlNets keep theirs, as there. The VAE
encoder's downsampling pads its right and bottom edge by hand, with zeros, in the original model and here alike.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

from torch import nn


def _convolutions(m) -> list[nn.Conv2d]:
    """The padded 3×3 convolutions of a model's UNet and VAE (1×1 convolutions have no border)."""
    return [layer for part in (m.unet, m.vae) for layer in part.modules() if isinstance(layer, nn.Conv2d) and layer.padding != (0, 0)]


@contextlib.contextmanager
def circular_padding(m, on: bool = True):
    """Within the block, the UNet's and the VAE's convolutions pad circularly (`on`), then as they were."""
    from .cuda_graphs import state_changed  # a captured graph holds the padding of its convolutions

    layers = _convolutions(m) if on else []
    before = [layer.padding_mode for layer in layers]
    for layer in layers:
        layer.padding_mode = "circular"
    if layers:
        state_changed()
    try:
        yield
    finally:
        for layer, mode in zip(layers, before):
            layer.padding_mode = mode
        if layers:
            state_changed()


def takes_seamless(fn):
    """Run `fn(m, …, seamless=…)` with circular padding when its `seamless` argument is true (the function
    records the setting; this applies it around the whole call, VAE encoding and decoding included)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        seamless = bound.arguments.get("seamless", False)
        if not isinstance(seamless, bool):
            raise ValueError(f"seamless must be True or False, got {seamless!r:.40}")
        with circular_padding(bound.arguments["m"], seamless):
            return fn(*args, **kwargs)

    return call
