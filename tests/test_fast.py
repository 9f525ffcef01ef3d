"""The fast path (sd15.fast) against the reference path on the same weights and latents.

On the CPU the fast modules run with PyTorch's ops (and, in the kernel test, with the Triton kernels under
the interpreter), so what is checked here is the restructuring: fused projections, the cached
cross-attention k/v, fused GroupNorm/SiLU/bias and GEGLU, channels-last, class swapping and its undoing.
The CUDA-only parts (CUDA graphs, real kernels, speed) are checked by tests/gpu on a GPU.

Tolerance in fp32: the fast path computes the same sums in a different grouping (one product over the
stacked q/k/v weight instead of three, the embedding add folded into the GroupNorm input), which moves
results by a few fp32 ulps per layer; 1e-5 relative on the outputs leaves room for that and would still
catch any real error, which moves them by 1e-2 or more.
"""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sd15
from sd15 import fast
from sd15.fast import FastCrossAttention
from lora_files import random_attention_lora

RUN = dict(steps=3, seed=7, width=64, height=64, output_type="np")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return sd15.load(tiny_checkpoint, fast=False)


@pytest.fixture
def fast_model(tiny_checkpoint):
    m = sd15.load(tiny_checkpoint, fast=True)
    assert m.fast is not None and m.fast.ops == "torch" and not m.fast.cuda_graphs
    return m


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())


def unet_inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([500.0, 20.0][:batch]), torch.randn(batch, 77, 48, generator=g)


def test_automatic_choice_is_reference_on_cpu_and_fast_on_cuda_half():
    assert not fast.wanted(torch.device("cpu"), torch.float32, None)
    assert not fast.wanted(torch.device("cpu"), torch.float16, None)
    assert not fast.wanted(torch.device("cuda"), torch.float32, None)
    assert fast.wanted(torch.device("cuda"), torch.float16, None)
    assert fast.wanted(torch.device("cuda"), torch.bfloat16, None)
    assert not fast.wanted(torch.device("cuda"), torch.float16, False)  # forcing the reference path


def test_default_cpu_load_uses_the_reference_modules(tiny_checkpoint):
    m = sd15.load(tiny_checkpoint)
    assert m.fast is None
    assert not any(type(x) in fast.REFERENCE_CLASSES for x in m.unet.modules())


def test_fast_unet_text_encoder_and_vae_match_the_reference(fast_model, reference):
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        assert rel(fast_model.unet(x, t, ctx), reference.unet(x, t, ctx)) < 1e-5
        ids = reference.tokenizer(["a photo of a cat", "a red car"])
        assert rel(fast_model.text_encoder(ids), reference.text_encoder(ids)) < 1e-5
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        assert rel(fast_model.vae.decode(z), reference.vae.decode(z)) < 1e-5
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
        assert rel(fast_model.vae.encode(image).mean, reference.vae.encode(image).mean) < 1e-5


def test_fast_modules_with_the_triton_kernels_match_the_reference(tiny_checkpoint, reference):
    """The Triton GroupNorm(+SiLU, +embedding add), GEGLU and add+LayerNorm inside the fast modules, run by triton's CPU
    interpreter (one module of each kind: the interpreter takes seconds per kernel launch). Their
    statistics are summed in another order than PyTorch's, so fp32: 1e-5, as above."""
    m = sd15.load(tiny_checkpoint, fast=False)
    assert m.enable_fast_path(kernels=True).ops == "triton"
    g = torch.Generator().manual_seed(5)
    x, emb = torch.randn(1, 32, 4, 4, generator=g), torch.randn(1, 128, generator=g)
    tokens, h = torch.randn(1, 16, 64, generator=g), torch.randn(1, 64, 8, 8, generator=g)
    context = torch.randn(1, 77, 48, generator=g)  # (B, T, context_dim) of the tiny UNet
    pairs = [
        (lambda u: u.input_blocks[1][0](x, emb), fast.FastResBlock),  # GN+SiLU, GN+SiLU+embedding add
        (lambda u: u.input_blocks[4][1].transformer_blocks[0].ff(tokens), fast.FastGEGLU),
        (lambda u: u.input_blocks[4][1].norm(h), fast.FastGroupNorm),
        (lambda u: u.input_blocks[4][1].transformer_blocks[0](tokens, context), fast.FastBasicTransformerBlock),
    ]
    with torch.no_grad():
        for call, cls in pairs:
            assert rel(call(m.unet), call(reference.unet)) < 1e-5, cls.__name__
        assert type(m.unet.input_blocks[4][1].transformer_blocks[0].ff.net[0]) is fast.FastGEGLU
        assert type(m.unet.input_blocks[4][1].transformer_blocks[0]) is fast.FastBasicTransformerBlock
        block = lambda vae: vae.decoder.up[1].block[0](torch.randn(1, 64, 4, 4, generator=torch.Generator().manual_seed(6)))  # noqa: E731
        assert type(m.vae.decoder.up[1].block[0]) is fast.FastResnetBlock
        assert rel(block(m.vae), block(reference.vae)) < 1e-5


@pytest.mark.parametrize("sampler", ["pndm", "euler_a"])
def test_fast_generation_matches_the_reference(fast_model, reference, sampler):
    ours = fast_model.generate(["a cat", "a dog"], negative_prompt="blurry", sampler=sampler, **RUN)
    ref = reference.generate(["a cat", "a dog"], negative_prompt="blurry", sampler=sampler, **RUN)
    assert np.abs(ours - ref).max() < 1e-5  # pixels in [0, 1]


def test_the_fast_modules_keep_the_checkpoint_names_and_values(fast_model, reference):
    ours, ref = fast_model.unet.state_dict(), reference.unet.state_dict()
    assert list(ours) == list(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    attn = fast_model.unet.input_blocks[1][1].transformer_blocks[0].attn1
    assert type(attn) is FastCrossAttention
    stacked = attn.__dict__["_fused"][("to_q", "to_k", "to_v")][0]
    assert attn.to_k.weight.data_ptr() == stacked[attn.to_q.weight.shape[0]:].data_ptr()  # a view: no copy


def test_disable_restores_reference_classes_and_separate_weights(fast_model, reference):
    fast_model.disable_fast_path()
    assert fast_model.fast is None
    assert not any(type(x) in fast.REFERENCE_CLASSES for x in fast_model.unet.modules())
    attn = fast_model.unet.input_blocks[1][1].transformer_blocks[0].attn1
    assert attn.to_k.weight._base is None and "_fused" not in attn.__dict__
    save_file(fast_model.unet.state_dict(), os.devnull)  # safetensors refuses shared storage: none is left
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        assert torch.equal(fast_model.unet(x, t, ctx), reference.unet(x, t, ctx))


@pytest.fixture
def kv_computations(monkeypatch) -> list:
    """The cross-attention layers, one entry each time one computes the k/v of a context."""
    computed = []
    real = FastCrossAttention.context_kv

    def counting(self, context):
        before = (self.__dict__.get("_context_kv") or [None])[0]
        out = real(self, context)
        if self.__dict__["_context_kv"][0] is not before:  # a new entry, newest first
            computed.append(self)
        return out

    monkeypatch.setattr(FastCrossAttention, "context_kv", counting)
    return computed


def test_cross_attention_kv_is_computed_once_per_generation(fast_model, kv_computations):
    computed = kv_computations
    layers = [x for n, x in fast_model.unet.named_modules() if n.endswith("attn2")]
    fast_model.generate("a cat", **{**RUN, "steps": 5})  # PNDM: 6 UNet calls
    assert len(computed) == len(layers) and set(computed) == set(layers)
    computed.clear()
    fast_model.generate("a dog", **{**RUN, "steps": 5})  # a new prompt: once more, not stale
    assert len(computed) == len(layers)


def test_prompt_and_negative_of_different_lengths_keep_both_kv_cached(fast_model, reference, kv_computations):
    """Two UNet calls per step (one per guidance branch, as their lengths differ): each branch's k/v once."""
    long = ", ".join(["a red cat on a blue sofa"] * 12)  # two 77-token chunks; the negative prompt one
    layers = [x for n, x in fast_model.unet.named_modules() if n.endswith("attn2")]
    ours = fast_model.generate(long, **{**RUN, "steps": 5})  # PNDM: 6 evaluations, 12 UNet calls
    assert len(kv_computations) == 2 * len(layers)
    assert np.abs(ours - reference.generate(long, **{**RUN, "steps": 5})).max() < 1e-5


def test_kv_cache_follows_in_place_changes_of_context_and_weights(fast_model, reference):
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        fast_model.unet(x, t, ctx)
        ctx.mul_(2.0)  # same tensor, new values
        assert rel(fast_model.unet(x, t, ctx), reference.unet(x, t, ctx)) < 1e-5
        layer = fast_model.unet.middle_block[1].transformer_blocks[0].attn2
        layer.to_v.weight.mul_(0.5)  # in place, as a merged LoRA writes
        out = fast_model.unet(x, t, ctx)
        ref_layer = reference.unet.middle_block[1].transformer_blocks[0].attn2
        ref_layer.to_v.weight.mul_(0.5)
        try:
            assert rel(out, reference.unet(x, t, ctx)) < 1e-5
        finally:
            ref_layer.to_v.weight.mul_(2.0)


@pytest.mark.parametrize("merge", [True, False])
def test_loras_merged_or_on_the_fly_reach_the_fused_layers(fast_model, reference, tmp_path, merge):
    path = random_attention_lora(reference, tmp_path / "l.safetensors")
    plain = fast_model.generate("a cat", **RUN)
    for m in (fast_model, reference):
        m.load_lora(path, scale=0.8, merge=merge)
    try:
        ours, ref = fast_model.generate("a cat", **RUN), reference.generate("a cat", **RUN)
    finally:
        for m in (fast_model, reference):
            m.unload_loras()
    assert np.abs(ours - plain).max() > 1e-3  # the LoRA changes the image …
    assert np.abs(ours - ref).max() < 1e-5  # … in the fast path exactly as in the reference path
    assert np.abs(fast_model.generate("a cat", **RUN) - plain).max() < 1e-6  # and unloading undoes it


def test_a_hook_on_a_fused_norm_or_silu_sees_its_output(fast_model, reference):
    """Fused blocks do not call their norms' and SiLUs' own forward; with a hook on one, a block runs the
    reference forward, so the hook sees what it would on the reference path."""
    names = ["unet.input_blocks.1.0.in_layers.0", "unet.input_blocks.1.0.out_layers.1",
             "unet.input_blocks.4.1.transformer_blocks.0.norm2", "vae.decoder.up.1.block.0.norm1"]  # fmt: skip
    seen = {id(m): [] for m in (fast_model, reference)}
    handles = []
    for m in (fast_model, reference):
        for name in names:
            model, path = name.split(".", 1)
            module = getattr(m, model).get_submodule(path)
            handles.append(module.register_forward_hook(lambda mod, args, out, log=seen[id(m)]: log.append(out)))
    try:
        for m in (fast_model, reference):
            m.generate("a cat", **RUN)
    finally:
        for handle in handles:
            handle.remove()
    ours, theirs = seen[id(fast_model)], seen[id(reference)]
    assert len(ours) == len(theirs) > len(names)
    assert all(rel(a, b) < 1e-5 for a, b in zip(ours, theirs))


def test_trace_records_on_the_reference_path_and_restores_the_fast_path(fast_model, reference):
    capture = ["unet.input_blocks.1.0.in_layers.0", "unet.*.attn1.probs", "text_encoder.encoder.layers.0.self_attn.probs"]
    traces = []
    for m in (fast_model, reference):
        with sd15.trace(m, capture=capture) as tr:
            m.generate("a cat", **RUN)
        traces.append(tr)
    assert traces[0].names() == traces[1].names() and traces[0].names()
    for name in traces[1].names():
        assert len(traces[0][name]) == len(traces[1][name]) > 0
        assert all(torch.equal(a, b) for a, b in zip(traces[0][name], traces[1][name]))
    assert fast_model.fast is not None  # back on after the trace
    assert type(fast_model.unet.input_blocks[1][0]) is fast.FastResBlock


def test_fast_path_on_cuda_only_options_are_refused_on_cpu(fast_model):
    with pytest.raises(RuntimeError, match="CUDA graphs need"):
        fast_model.enable_fast_path(cuda_graphs=True)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.03), (torch.bfloat16, 0.25)])
def test_half_precision_fast_path_is_close_to_fp32_and_equal_to_the_half_reference(tiny_checkpoint, reference, dtype, tolerance):
    """The error of a half-precision run against fp32 scales with the dtype's unit roundoff: fp16 keeps 11
    significant bits (2^-11), bf16 8 (2^-8, 8× coarser). Over 3 steps of the tiny random UNet and the VAE,
    fp16 moves pixels ([0, 1]) by about 0.011 here, bf16 by about 0.1; the tolerances leave 2.5× headroom
    over those, and a wrong kernel or a dropped term moves pixels by far more. Against the reference path
    in the same dtype the fast path must agree to fp32's tolerance: on the CPU the same ops run."""
    ours = sd15.load(tiny_checkpoint, dtype=dtype, fast=True).generate("a cat", **RUN)
    same_dtype = sd15.load(tiny_checkpoint, dtype=dtype, fast=False).generate("a cat", **RUN)
    fp32 = reference.generate("a cat", **RUN)
    assert np.isfinite(ours).all()
    assert np.abs(ours - fp32).max() < tolerance
    assert np.abs(ours - same_dtype).max() < 1e-5


def test_a_failing_kernel_falls_back_to_pytorch_once_with_a_warning(tiny_checkpoint, reference, monkeypatch):
    import sd15.kernels.geglu as geglu_kernel

    calls = []

    def broken(h):
        calls.append(h.shape)
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(geglu_kernel, "geglu", broken)
    m = sd15.load(tiny_checkpoint, fast=False)
    m.enable_fast_path(kernels=True)
    tokens = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    ff = lambda model: model.unet.input_blocks[4][1].transformer_blocks[0].ff(tokens)  # noqa: E731
    with torch.no_grad(), pytest.warns(UserWarning, match="Triton kernel broken failed .*no compiler"):
        out = ff(m)
    with torch.no_grad():
        assert rel(ff(m), ff(reference)) < 1e-6 and rel(out, ff(reference)) < 1e-6
    assert len(calls) == 1  # not tried again


def test_compile_mode_wraps_the_reference_unet_and_is_undone(tiny_checkpoint):
    """torch.compile itself takes over a minute on this CPU, so only the switching is checked here; the
    compiled UNet's speed and output are measured by scripts/benchmark.py on the GPU."""
    m = sd15.load(tiny_checkpoint, fast=False)
    state = m.enable_fast_path(compile=True)
    assert state.compiled and state.ops == "inductor" and not state.cuda_graphs
    assert "forward" in m.unet.__dict__  # the compiled callable stands in for the forward
    assert not any(type(x) in fast.REFERENCE_CLASSES for x in m.unet.modules())  # inductor sees the reference modules
    with pytest.raises(RuntimeError, match="makes its own kernels"):
        m.enable_fast_path(compile=True, kernels=True)
    m.disable_fast_path()
    assert "forward" not in m.unet.__dict__ and m.fast is None
