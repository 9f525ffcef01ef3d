"""Tiled VAE decoding and encoding against the untiled VAE, and when the pipeline chooses it.

Stated tolerance: the tiled result equals the untiled one to within 1e-4 of the output's range, at tile
borders as well as away from them. (Every GroupNorm uses whole-image statistics and every tile reads a halo
as wide as its convolutions need, so the two differ only by float32 rounding, ~1e-6; the tests measure the
border band and the interior separately so that a seam would show where it is.) Per-tile statistics, the
common shortcut, miss by ~1e-1 on these weights: `test_per_tile_statistics_would_not_pass` keeps the bar honest.

The 2048×2048 figure comes from scripts/measure_tiled_vae.py (too slow for the suite on a CPU).
"""

import numpy as np
import pytest
import torch

from sd15 import tiling
from sd15.random_weights import TINY, random_state_dict
from sd15.vae import AutoencoderKL, VAEConfig

TOL = 1e-4


def make_vae(config, seed=1):
    vae = AutoencoderKL(config).eval().requires_grad_(False)
    vae.load_state_dict(random_state_dict(vae, seed))
    return vae


@pytest.fixture(scope="module")
def full_vae():
    """The full-size SD1.5 VAE (128-512 channels, mid-block attention) on seeded random weights."""
    return make_vae(VAEConfig())


def smooth_latent(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 4, max(1, h // 4), max(1, w // 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic") * 4 + torch.randn(1, 4, h, w, generator=g)


def border_band(size, tile, width):
    """A boolean mask of the pixels within `width` of a tile border (tiles of `tile` output pixels)."""
    idx = torch.arange(size)
    return ((idx % tile) < width) | ((idx % tile) >= tile - width)


def test_tiled_decode_matches_untiled_full_size_vae(full_vae):
    z = smooth_latent(16, 24)
    with torch.no_grad():
        full = full_vae.decode(z)
        tiled = tiling.decode_tiled(full_vae, z, tile=64)  # 2×3 tiles at full resolution, 1 at latent size
    scale = full.abs().max()
    err = (tiled - full).abs() / scale
    rows, cols = border_band(128, 64, 8), border_band(192, 64, 8)
    band = rows[:, None] | cols[None, :]
    assert err[..., band].max() < TOL  # at the tile borders
    assert err[..., ~band].max() < TOL  # away from them
    assert full.std() > 0.1


@pytest.mark.parametrize("h, w, tile", [(13, 21, 40), (8, 8, 2), (5, 9, 6)])
def test_tiled_decode_and_encode_any_size_and_tile(h, w, tile):
    vae = make_vae(TINY["vae"])
    z = smooth_latent(h, w, seed=h)
    images = torch.rand(1, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(w)) * 2 - 1
    with torch.no_grad():
        full, tiled = vae.decode(z), tiling.decode_tiled(vae, z, tile=tile)
        enc, enc_tiled = vae.encode(images), tiling.encode_tiled(vae, images, tile=tile)
    assert tiled.shape == full.shape == (1, 3, 8 * h, 8 * w)
    assert (tiled - full).abs().max() / full.abs().max() < TOL
    assert (enc_tiled.mean - enc.mean).abs().max() / enc.mean.abs().max() < TOL
    assert (enc_tiled.logvar - enc.logvar).abs().max() / enc.logvar.abs().max() < TOL


def test_per_tile_statistics_would_not_pass(full_vae):
    """Decoding each tile on its own (its own GroupNorm statistics and attention) is far off: the check above
    is able to fail."""
    z = smooth_latent(16, 16)
    with torch.no_grad():
        full = full_vae.decode(z)
        halves = torch.cat([full_vae.decode(z[..., :, :8]), full_vae.decode(z[..., :, 8:])], dim=-1)
    assert (halves - full).abs().max() / full.abs().max() > 100 * TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_with_given_statistics_is_as_exact_as_torchs_in_half_precision(dtype):
    """Normalising a half-precision tile in its own dtype rounds the group mean: where the mean is large
    against the spread (here 100 against 1), that error was 3-20 times torch's own GroupNorm's."""
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
        norm.bias.copy_(torch.randn(16, generator=g))
    x = (torch.randn(2, 16, 24, 24, generator=g) + 100).to(dtype)
    half = torch.nn.GroupNorm(4, 16, eps=1e-6).to(dtype)
    half.load_state_dict(norm.state_dict())
    with torch.no_grad():
        exact = norm(x.float())  # the same inputs, in float32
        theirs = half(x).float()
        ours = tiling.apply_group_norm(x, half, tiling.group_stats(x, half))
    assert ours.dtype == dtype
    assert (ours.float() - exact).abs().max() <= 1.5 * (theirs - exact).abs().max()


def test_mid_block_attention_bands_count_the_batch(monkeypatch):
    """The band of queries is sized so that the whole batch's scores stay within ATTENTION_SCORES."""
    vae = make_vae(TINY["vae"])
    z = torch.cat([smooth_latent(8, 8, seed=1), smooth_latent(8, 8, seed=2)])  # B = 2, T = 64 at the mid block
    with torch.no_grad():
        expected = vae.decode(z)
    scores, real = [], torch.nn.functional.scaled_dot_product_attention

    def counted(q, k, v, *args, **kwargs):
        scores.append(q.shape[0] * q.shape[-2] * k.shape[-2])  # B · Tq · Tk
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(tiling, "ATTENTION_SCORES", 2 * 16 * 64)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    tiled = tiling.decode_tiled(vae, z, tile=16)
    assert scores and max(scores) <= 2 * 16 * 64
    assert (tiled - expected).abs().max() / expected.abs().max() < TOL


def test_odd_tile_is_refused():
    with pytest.raises(ValueError, match="even"):
        tiling.decode_tiled(make_vae(TINY["vae"]), torch.zeros(1, 4, 4, 4), tile=5)


def test_decode_tiles_when_memory_is_short_or_runs_out(monkeypatch):
    vae = make_vae(TINY["vae"])
    z = smooth_latent(6, 6)
    calls = []
    real = tiling.decode_tiled
    monkeypatch.setattr(tiling, "decode_tiled", lambda *a, **k: calls.append("tiled") or real(*a, **k))
    monkeypatch.delenv("SD15_TILED_VAE", raising=False)
    expected = vae.decode(z)

    monkeypatch.setattr(tiling, "free_bytes", lambda device: 10**12)
    assert torch.allclose(tiling.decode(vae, z), expected) and calls == []
    monkeypatch.setattr(tiling, "free_bytes", lambda device: 1000)  # too little for the untiled estimate
    assert torch.allclose(tiling.decode(vae, z), expected, atol=1e-5) and calls == ["tiled"]

    monkeypatch.setattr(tiling, "free_bytes", lambda device: 10**12)

    def out_of_memory(_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(vae, "decode", out_of_memory)
    assert torch.allclose(tiling.decode(vae, z), expected, atol=1e-5) and calls == ["tiled", "tiled"]
    monkeypatch.setattr(vae, "decode", lambda _: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not swallowed
        tiling.decode(vae, z)


def test_untiled_estimate_is_in_the_measured_range():
    """512×512 in fp32 measured ~1 GB on the CPU (the estimate is an upper bound, scales with pixels)."""
    vae = AutoencoderKL.__new__(AutoencoderKL)
    vae.config = VAEConfig()
    one = tiling.untiled_bytes(vae, 512, 512, 1, torch.float32)
    assert 0.7e9 < one < 1.5e9
    # at 2048² the mid block's attention scores alone (65536² floats) are 17 GB, beyond this 24 GB machine's reach
    assert tiling.untiled_bytes(vae, 2048, 2048, 1, torch.float32) > 16 * 0.9 * one + 17e9


def test_pipeline_output_is_the_same_tiled(tiny_model, monkeypatch):
    kwargs = dict(steps=2, seed=3, width=64, height=64, output_type="np")
    monkeypatch.setenv("SD15_TILED_VAE", "0")
    untiled = tiny_model.generate("a cat", **kwargs)
    img_untiled = tiny_model.img2img(untiled[0], "a cat", steps=2, seed=1, output_type="np")
    monkeypatch.setenv("SD15_TILED_VAE", "1")
    monkeypatch.setattr(tiling, "TILE", 16)
    tiled = tiny_model.generate("a cat", **kwargs)
    img_tiled = tiny_model.img2img(untiled[0], "a cat", steps=2, seed=1, output_type="np")
    assert np.abs(tiled - untiled).max() < 1e-5
    assert np.abs(img_tiled - img_untiled).max() < 1e-4
