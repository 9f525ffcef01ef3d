"""The Triton kernels of sd15.kernels against their plain-PyTorch references, and the references against
torch.nn.functional. Without a GPU the kernels run in triton's interpreter, which must be switched on
before `triton.jit` decorates them, hence the environment variable above the imports.

Tolerances follow from where each side rounds. Half-precision outputs are computed in float32 and rounded
once, so kernel and reference land on the same or neighbouring representable values: at most one ulp,
which is `eps·|value|` for eps = 2^-10 (fp16) or 2^-7 (bf16). (The interpreter rounds float32 to bf16
by truncation, not to nearest; that too stays within one ulp.) Near zero the float32 difference before
rounding (~1e-6 on O(1) outputs) is what counts, hence a small atol.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sd15.kernels import triton_available  # noqa: E402

try:
    from sd15.kernels import group_norm as gn
    from sd15.kernels.add_layer_norm import add_layer_norm, add_layer_norm_reference
    from sd15.kernels.geglu import geglu, geglu_reference
except ImportError as error:  # every test here fails with this message; the rest of the suite still runs
    TRITON_MISSING = f"sd15.kernels needs triton, which our CI installs (pip install triton): {error!r}"
else:
    TRITON_MISSING = None


@pytest.fixture(autouse=True)
def _require_triton():
    if TRITON_MISSING:
        pytest.fail(TRITON_MISSING, pytrace=False)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol). float32: sums of a few thousand terms in different orders differ by ~1e-6 relative; 1e-5
# leaves a margin of ten.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2**-10, 1e-5), torch.bfloat16: (2**-7, 1e-5)}


def _inputs(B, C, H, W, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g).to(DEVICE, dtype)  # (B, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # strides of (B, H, W, C)
    weight = (1 + 0.5 * torch.randn(C, generator=g)).to(DEVICE, dtype)
    bias = (0.5 * torch.randn(C, generator=g)).to(DEVICE, dtype)
    channel_bias = torch.randn(B, C, generator=g).to(DEVICE, dtype)
    return x, weight, bias, channel_bias


def test_triton_available():
    assert triton_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_reference_matches_torch(dtype, channels_last):
    x, weight, bias, cb = _inputs(2, 96, 11, 13, dtype, channels_last)
    for silu in (False, True):
        for channel_bias in (None, cb):
            h = x.float() if channel_bias is None else x.float() + channel_bias.float()[:, :, None, None]
            expected = F.group_norm(h, 32, weight.float(), bias.float(), 1e-5)
            expected = (F.silu(expected) if silu else expected).to(dtype)
            out = gn.group_norm_reference(x, weight, bias, 32, 1e-5, silu=silu, channel_bias=channel_bias)
            rtol, atol = TOLERANCE[dtype]
            torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
            assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu, fuse_bias", [(False, False), (True, True)])  # silu alone: test_group_norm_strided_view
def test_group_norm_matches_reference(dtype, channels_last, silu, fuse_bias):
    # C = 96 in 32 groups: 3 channels a group (not a power of two); H·W = 143 fills no block exactly.
    x, weight, bias, cb = _inputs(2, 96, 11, 13, dtype, channels_last)
    channel_bias = cb if fuse_bias else None
    out = gn.group_norm(x, weight, bias, 32, 1e-5, silu=silu, channel_bias=channel_bias)
    expected = gn.group_norm_reference(x, weight, bias, 32, 1e-5, silu=silu, channel_bias=channel_bias)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert out.is_contiguous() != channels_last


@pytest.mark.parametrize("C, H, W, tile, max_chunks", [(96, 11, 13, 64, 4), (640, 5, 7, 128, 2), (64, 9, 9, 16, 3)])
def test_group_norm_many_tiles(monkeypatch, C, H, W, tile, max_chunks):
    """Small tiles force the in-program merge (several tiles a chunk) and the merge of chunks."""
    monkeypatch.setattr(gn, "STATS_TILE_ELEMENTS", tile)
    monkeypatch.setattr(gn, "MAX_STATS_CHUNKS", max_chunks)
    x, weight, bias, cb = _inputs(1, C, H, W, torch.float16, channels_last=True, seed=C)
    out = gn.group_norm(x, weight, bias, 32, 1e-5, silu=True, channel_bias=cb)
    expected = gn.group_norm_reference(x, weight, bias, 32, 1e-5, silu=True, channel_bias=cb)
    torch.testing.assert_close(out, expected, rtol=2**-10, atol=1e-5)


@pytest.mark.parametrize("small_tiles", [False, True])
def test_group_norm_large_mean(monkeypatch, small_tiles):
    """Values 1e3 ± 1, where E[x²] - E[x]² in float32 gets the variance ~20% wrong: E[x²] ≈ 1e6 agrees
    with E[x]² in 6 digits and float32 keeps about 7. Float32 holds numbers near 1e3 only to 2^-14 ≈ 6e-5
    (one ulp), so the mean, and x - mean, are good to a few such units: allow 4 ulp after division by
    std = 1, against float64."""
    if small_tiles:
        monkeypatch.setattr(gn, "STATS_TILE_ELEMENTS", 64)
        monkeypatch.setattr(gn, "MAX_STATS_CHUNKS", 3)
    x, _, _, cb = _inputs(2, 64, 12, 12, torch.float32, channels_last=True)
    x, weight, bias = 1e3 + x, torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    exact = gn.group_norm_reference(x.double(), weight, bias, 32, 1e-5, channel_bias=cb)
    for out in (gn.group_norm(x, weight, bias, 32, 1e-5, channel_bias=cb),
                gn.group_norm_reference(x, weight, bias, 32, 1e-5, channel_bias=cb)):  # fmt: skip
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=4 * 2**-14)


def test_group_norm_strided_view():
    """A view whose H and W do not merge into one stride (a crop along W) is copied, and still right."""
    x, weight, bias, _ = _inputs(2, 64, 8, 10, torch.float16, channels_last=False)
    x = x[:, :, :, 1:-2]  # (2, 64, 8, 7)
    out = gn.group_norm(x, weight, bias, 32, 1e-6, silu=True)
    expected = gn.group_norm_reference(x, weight, bias, 32, 1e-6, silu=True)
    torch.testing.assert_close(out, expected, rtol=2**-10, atol=1e-5)


# GEGLU tolerances. The reference, in half precision, rounds twice (gelu(gate), then the product); the kernel
# rounds once, in the interpreter by truncation for bf16. The two may differ by up to 2 eps relative.
# float32: 1 + erf(x/√2) cancels for x < -3, leaving absolute errors ~|x|·2^-24 on outputs near 0.
GEGLU_TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (2 * 2**-10, 1e-5), torch.bfloat16: (2 * 2**-7, 1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 2 * 13), (3, 2 * 300), (2, 3, 5, 2 * 40)])
def test_geglu_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    h = (2 * torch.randn(shape, generator=g)).to(DEVICE, dtype)  # (…, 2F); gates to ±8 reach gelu's tails
    out = geglu(h)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    rtol, atol = GEGLU_TOLERANCE[dtype]
    torch.testing.assert_close(out, geglu_reference(h), rtol=rtol, atol=atol)


def test_geglu_non_contiguous():
    h = torch.randn(2 * 24, 5, device=DEVICE, dtype=torch.float16).transpose(0, 1)  # (5, 48), last stride 5
    torch.testing.assert_close(geglu(h), geglu_reference(h), rtol=2 * 2**-10, atol=1e-5)


# add + LayerNorm. The sum is rounded once to the input dtype, as the reference add rounds it: equal in
# float32 and float16 (both round to nearest), within one ulp in bf16 (the interpreter truncates). The
# normalised output is checked against the reference LayerNorm of the kernel's own sum, so that a one-ulp
# difference in the sum is not amplified into the check: one rounding of a float32 result, 1 ulp.


def _add_norm_inputs(shape, dtype, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = (offset + torch.randn(shape, generator=g)).to(DEVICE, dtype)  # (…, D), the residual stream
    delta = torch.randn(shape, generator=g).to(DEVICE, dtype)  # a sublayer's output
    weight = (1 + 0.5 * torch.randn(D, generator=g)).to(DEVICE, dtype)
    bias = (0.5 * torch.randn(D, generator=g)).to(DEVICE, dtype)
    return x, delta, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 320), (3, 640), (1, 5, 1280), (2, 3, 96)])  # SD1.5's widths, and one not a power of two
def test_add_layer_norm_matches_reference(dtype, shape):
    x, delta, weight, bias = _add_norm_inputs(shape, dtype, seed=shape[-1])
    total, normed = add_layer_norm(x, delta, weight, bias, 1e-5)
    expected_total, _ = add_layer_norm_reference(x, delta, weight, bias, 1e-5)
    assert total.shape == normed.shape == x.shape and total.dtype == normed.dtype == dtype
    if dtype == torch.bfloat16:
        torch.testing.assert_close(total, expected_total, rtol=2**-7, atol=0)
    else:
        assert torch.equal(total, expected_total)
    _, expected_normed = add_layer_norm_reference(total, torch.zeros_like(total), weight, bias, 1e-5)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(normed, expected_normed, rtol=rtol, atol=atol)


def test_add_layer_norm_large_mean():
    """Rows at 1e3 ± 1 (see test_group_norm_large_mean): the variance comes from centred values."""
    x, delta, weight, bias = _add_norm_inputs((4, 320), torch.float32, offset=1e3)
    total, normed = add_layer_norm(x, delta, weight, bias, 1e-5)
    _, exact = add_layer_norm_reference(total.double(), torch.zeros_like(total).double(), weight.double(), bias.double(), 1e-5)
    torch.testing.assert_close(normed.double(), exact, rtol=0, atol=4 * 2**-14 * weight.abs().max().item())


def test_add_layer_norm_non_contiguous():
    """A transposed residual (the SpatialTransformer's tokens of a contiguous map) and a delta in another dtype."""
    x, delta, weight, bias = _add_norm_inputs((2, 6, 320), torch.float16)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (2, 6, 320) with last stride 6
    delta = delta.float()
    total, normed = add_layer_norm(x, delta, weight, bias, 1e-6)
    expected_total, expected_normed = add_layer_norm_reference(x, delta.half(), weight, bias, 1e-6)
    assert torch.equal(total, expected_total)
    torch.testing.assert_close(normed, expected_normed, rtol=2**-10, atol=1e-5)
