"""The CUDA fast path on a GPU: real Triton kernels at SD1.5's shapes, the fused attention backend actually
chosen, CUDA graphs against eager runs, fp16/bf16 against fp32, and the deterministic mode.

Collected only where CUDA is available (tests/conftest.py); `scripts/device_check.sh` runs them on the
lent GPU. Full-size random weights (sd15.random_weights), so shapes and magnitudes are SD1.5's.

Tolerances. fp16 keeps 11 significant bits (unit roundoff u = 2^-11 ≈ 4.9e-4), bf16 8 (u = 2^-8 ≈ 3.9e-3).
A UNet call is ~100 layers deep, and rounding errors add up roughly as sqrt(depth) · u relative to the
output's scale: ≈ 5e-3 for fp16, 4e-2 for bf16. The bounds below are those, with about 2× headroom.
"""

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sd15
from sd15 import cuda_graphs, determinism, pipeline
from sd15.kernels.add_layer_norm import add_layer_norm, add_layer_norm_reference
from sd15.kernels.geglu import geglu, geglu_reference
from sd15.kernels.group_norm import group_norm, group_norm_reference
from sd15.random_weights import random_checkpoint_file, save_checkpoint
from sd15.samplers import plan_sampling

CUDA = torch.device("cuda")
FP16_UNET_TOLERANCE = 1e-2
BF16_UNET_TOLERANCE = 8e-2


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", autouse=True)
def true_fp32():
    """cuDNN runs float32 convolutions in TF32 (a 10-bit mantissa, like fp16's) unless told not to, which
    would make the fp32 reference about as inexact as what it checks."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """`random_checkpoint("full", seed=0, dtype=torch.float16)`, cast from the float32 file that the scripts draw
    (into SD15_RANDOM_WEIGHTS_CACHE when set, as device_check.sh does: drawn once, here, for them all)."""
    folder = tmp_path_factory.mktemp("w")
    weights = load_file(random_checkpoint_file("full", 0, folder))
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}
    return save_checkpoint(half, folder / "full-fp16.safetensors")


@pytest.fixture(scope="module")
def fp32_reference(full_checkpoint):
    return sd15.load(full_checkpoint, device=CUDA, dtype=torch.float32, fast=False)


def unet_inputs(dtype, batch=2, side=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, side, side, generator=g)
    ctx = torch.randn(batch, 77, 768, generator=g)
    return x.to(CUDA, dtype), torch.full((batch,), 501.0, device=CUDA), ctx.to(CUDA, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 1280, 8, 8), (2, 2560, 16, 16), (1, 128, 512, 512)])
def test_group_norm_kernel_at_sd15_shapes(shape, dtype):
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = (torch.randn(shape, generator=g, device=CUDA) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w, b = torch.randn(C, device=CUDA, generator=g).to(dtype), torch.randn(C, device=CUDA, generator=g).to(dtype)
    bias = torch.randn(shape[0], C, device=CUDA, generator=g).to(dtype)
    out = group_norm(x, w, b, 32, 1e-5, silu=True, channel_bias=bias)
    ref = group_norm_reference(x, w, b, 32, 1e-5, silu=True, channel_bias=bias)
    assert out.is_contiguous(memory_format=torch.channels_last)
    eps = torch.finfo(dtype).eps  # one rounding of the output: 1 ulp, plus the order of the fp32 sums
    torch.testing.assert_close(out, ref, rtol=eps, atol=eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_geglu_kernel_at_sd15_shape(dtype):
    h = torch.randn(2, 4096, 2 * 1280, device=CUDA).to(dtype)
    eps = torch.finfo(dtype).eps  # the reference rounds twice (after gelu and after the product)
    torch.testing.assert_close(geglu(h), geglu_reference(h), rtol=2 * eps, atol=eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, width", [(4096, 320), (1024, 640), (256, 1280), (64, 1280)])
def test_add_layer_norm_kernel_at_sd15_shapes(tokens, width, dtype):
    g = torch.Generator(device=CUDA).manual_seed(0)
    x, delta = (torch.randn(2, tokens, width, device=CUDA, generator=g).to(dtype) for _ in range(2))
    w, b = torch.randn(width, device=CUDA, generator=g).to(dtype), torch.randn(width, device=CUDA, generator=g).to(dtype)
    total, normed = add_layer_norm(x, delta, w, b, 1e-5)
    ref_total, _ = add_layer_norm_reference(x, delta, w, b, 1e-5)
    assert torch.equal(total, ref_total)  # one float32 add rounded to nearest, on both sides
    _, ref_normed = add_layer_norm_reference(total, torch.zeros_like(total), w, b, 1e-5)
    eps = torch.finfo(dtype).eps  # one rounding of a float32 result
    torch.testing.assert_close(normed, ref_normed, rtol=eps, atol=eps)


def test_fast_path_is_the_default_on_cuda_fp16(full_checkpoint):
    m = sd15.load(full_checkpoint, device=CUDA)
    assert m.dtype == torch.float16 and m.fast is not None
    assert m.fast.ops == "triton" and m.fast.channels_last and m.fast.cuda_graphs


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, FP16_UNET_TOLERANCE), (torch.bfloat16, BF16_UNET_TOLERANCE)])
def test_fast_unet_step_matches_fp32_reference(full_checkpoint, fp32_reference, dtype, tolerance):
    m = sd15.load(full_checkpoint, device=CUDA, dtype=dtype)  # fast path with graphs
    reference_half = sd15.load(full_checkpoint, device=CUDA, dtype=dtype, fast=False)
    x, t, ctx = unet_inputs(dtype)
    with torch.no_grad(), warnings.catch_warnings():
        # a Triton kernel that fell back to PyTorch says so in a warning (sd15.fast._falling_back); other
        # warnings (a library's deprecation notice, say) are no failure of the fast path
        warnings.filterwarnings("error", message="the Triton kernel")
        ours = m.unet(x, t, ctx)
        ours_again = m.unet(x, t, ctx)  # replayed from the graph
        ref32 = fp32_reference.unet(x.float(), t, ctx.float())
        ref_half = reference_half.unet(x, t, ctx)
    assert m.unet.forward.captures == 1
    assert torch.equal(ours, ours_again)
    print(f"{dtype}: fast vs fp32 {rel(ours, ref32):.2e}, reference {dtype} vs fp32 {rel(ref_half, ref32):.2e}")
    assert rel(ours, ref32) < tolerance
    assert rel(ref_half, ref32) < tolerance


def test_graphs_follow_new_prompts_and_equal_eager(full_checkpoint):
    graphed = sd15.load(full_checkpoint, device=CUDA)
    eager = sd15.load(full_checkpoint, device=CUDA)
    eager.enable_fast_path(cuda_graphs=False)
    run = dict(steps=8, seed=3, output_type="np")
    for prompt in ("a cat", "a lighthouse at night"):  # the second must not reuse the first's k/v
        a, b = graphed.generate(prompt, **run), eager.generate(prompt, **run)
        print(f"{prompt!r}: graphs vs eager max |Δ| = {np.abs(a - b).max():.2e}")
        assert np.abs(a - b).max() < 1e-3  # pixels in [0, 1]; the same kernels, replayed
    assert graphed.unet.forward.captures == 1  # one shape, captured once, refreshed per prompt
    long = ", ".join(["a lighthouse on a rock at night"] * 12)  # two 77-token chunks; its negative prompt one
    a, b = graphed.generate(long, **run), eager.generate(long, **run)
    print(f"prompt longer than its negative: graphs vs eager max |Δ| = {np.abs(a - b).max():.2e}")
    assert np.abs(a - b).max() < 1e-3  # each guidance branch on its own graph and its own k/v buffers
    assert graphed.unet.forward.captures == 3  # and one graph per branch, (1, 77) and (1, 154) contexts


def test_end_to_end_fp16_fast_path_against_fp32(full_checkpoint, fp32_reference):
    m = sd15.load(full_checkpoint, device=CUDA)
    run = dict(steps=20, seed=1, output_type="np")
    ours, ref = m.generate("a red bicycle", **run), fp32_reference.generate("a red bicycle", **run)
    diff = np.abs(ours - ref)
    print(f"fp16 fast vs fp32 reference, 20 PNDM steps: mean |Δ| {diff.mean():.2e}, max {diff.max():.2e}")
    assert diff.mean() < 2e-2  # sampling compounds the per-step fp16 error: whole-image mean, not max


def test_attention_runs_on_a_fused_sdpa_kernel(full_checkpoint):
    m = sd15.load(full_checkpoint, device=CUDA)
    m.disable_fast_path()
    m.enable_fast_path(cuda_graphs=False)  # the profiler sees the kernels of an eager call
    x, t, ctx = unet_inputs(torch.float16)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        m.unet(x, t, ctx)
        torch.cuda.synchronize()
    names = [e.key.lower() for e in prof.key_averages()]
    fused = [n for n in names if any(k in n for k in ("flash", "fmha", "cudnn_sdpa", "attention", "sdpa"))]
    print("attention kernels:", fused)
    assert fused, f"no fused attention kernel ran; kernels: {names[:40]}"
    assert not any("softmax" in n for n in names), "the math (softmax) attention path ran"


def test_deterministic_mode_gives_identical_runs(full_checkpoint):
    determinism.enable()
    try:
        m = sd15.load(full_checkpoint, device=CUDA)
        run = dict(steps=5, seed=2, output_type="np", sampler="euler_a")
        assert np.array_equal(m.generate("a cat", **run), m.generate("a cat", **run))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.utils.deterministic.fill_uninitialized_memory = True


def test_trace_on_a_graphed_model_records_and_restores(full_checkpoint):
    m = sd15.load(full_checkpoint, device=CUDA)
    with sd15.trace(m, capture=["unet.middle_block.1.transformer_blocks.0.attn2.probs"]) as tr:
        m.generate("a cat", steps=2, seed=0, output_type="latent")
    assert len(tr["unet.middle_block.1.transformer_blocks.0.attn2.probs"]) == 3  # PLMS: steps + 1 calls
    assert m.fast is not None and m.fast.cuda_graphs
    assert isinstance(m.unet.__dict__.get("forward"), cuda_graphs.GraphedForward)


@pytest.fixture(scope="module")
def graphed_fp16(full_checkpoint):
    return sd15.load(full_checkpoint, device=CUDA)  # the default on CUDA: fp16, Triton, CUDA graphs


@pytest.mark.parametrize("sampler", ["pndm", "dpmpp_2m_sde"])  # graph replays only; and fresh noise each step
def test_the_sampler_loop_never_waits_for_the_gpu(graphed_fp16, sampler):
    """CUDA's sync debug mode raises at any synchronising call (a read back, a copy from pageable memory)
    inside the loop: the graph replays and the fresh noise must be queued without waiting for the GPU.
    (tests/test_no_host_sync.py checks the same on the CPU, on the meta device.)"""
    m = graphed_fp16
    with torch.no_grad():
        cond, uncond = pipeline.encode_text(m, ["a cat"]), pipeline.encode_text(m, [""])
    eps_model = pipeline.guided_eps_model(m, cond, uncond, guidance_scale=7.5)
    plan = plan_sampling(sampler, 6)
    x = plan.noise_latents(torch.randn(1, 4, 64, 64, device=CUDA, dtype=m.dtype))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        plan.sample(eps_model, x, generator=generator)  # warm-up: graph capture synchronises, once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = plan.sample(eps_model, x, generator=generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_controlnet_on_the_graphed_fp16_model_matches_the_reference_path(graphed_fp16, full_checkpoint):
    """A full-size random ControlNet (fp16) steering the default CUDA model (fp16, kernels, CUDA graphs, the
    residuals in graph buffers of their own) against the same on the plain fp16 modules: the same image within
    fp16's tolerance, and a graph captured for the ControlNet steps."""
    from PIL import Image

    from sd15.random_weights import random_controlnet

    path = save_checkpoint(random_controlnet("full", seed=1, dtype=torch.float16), full_checkpoint.parent / "control.safetensors")
    hint = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    run = dict(steps=4, seed=3, width=256, height=256, output_type="np", control_image=hint)
    plain = sd15.load(full_checkpoint, device=CUDA, fast=False)
    captures = graphed_fp16.unet.forward.captures
    fast = graphed_fp16.generate("a cat", controlnet=graphed_fp16.load_controlnet(path), **run)
    reference = plain.generate("a cat", controlnet=plain.load_controlnet(path), **run)
    diff = np.abs(fast - reference)
    print(f"ControlNet, fp16 fast + graphs vs fp16 reference modules: mean |Δ| {diff.mean():.2e}, max {diff.max():.2e}")
    assert diff.mean() < 2e-2  # as for the plain model above: sampling compounds fp16 rounding, so the mean
    assert graphed_fp16.unet.forward.captures > captures  # the ControlNet steps replay a graph of their own


def test_seamless_on_the_graphed_fp16_model_is_shift_equivariant(graphed_fp16):
    """sd15.seamless on the default CUDA model (channels-last fp16 convolutions, Triton GroupNorm, a graph
    captured again for the circular padding): a start shifted by 8 latent positions (the full UNet's
    downsampling) gives the image shifted by 64 pixels, to fp16's rounding; zero padding does not."""
    run = dict(steps=6, sampler="euler", width=256, height=256, output_type="np")
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    for seamless, bound in ((True, 2e-2), (False, None)):
        start = graphed_fp16.generate("a brick wall", latents=noise, seamless=seamless, **run)[0]
        moved = graphed_fp16.generate("a brick wall", latents=torch.roll(noise, (8, 8), dims=(2, 3)), seamless=seamless, **run)[0]
        diff = np.abs(np.roll(start, (64, 64), axis=(0, 1)) - moved)
        print(f"seamless={seamless}: shifted start vs shifted image, mean |Δ| {diff.mean():.2e}, max {diff.max():.2e}")
        if bound is not None:
            assert diff.mean() < bound
        else:
            assert diff.max() > 0.1


def test_the_philox_generator_draws_what_cuda_draws():
    """sd15.philox against torch.randn on this GPU: a 512×512 image's latent noise and the three draws after it
    (an ancestral sampler's), from a seed above 2^32, bit for bit."""
    from sd15.philox import PhiloxGenerator

    seed = 2**32 + 1234
    cuda = torch.Generator(device="cuda").manual_seed(seed)
    ours = PhiloxGenerator(seed)
    for draw in range(4):
        theirs = torch.randn((4, 64, 64), generator=cuda, device="cuda").cpu()
        mine = ours.randn((4, 64, 64))
        print(f"draw {draw}: max |Δ| {(theirs - mine).abs().max():.2e}")
        assert torch.equal(theirs, mine), draw
