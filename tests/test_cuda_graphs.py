"""The bookkeeping of sd15.cuda_graphs, on the CPU, with a stand-in for CUDA's graph API.

A real CUDA graph replays the kernels it recorded, on the addresses it recorded: it reads its static
inputs and the cross-attention k/v buffers as they are at replay time, and runs no Python. The stand-in
below keeps exactly that contract: "replay" reruns the captured call with every attention layer's k/v
pinned to the buffer the capture read (so a k/v buffer that was not refreshed stays stale, as it would on
a GPU) and with the forward hooks the modules had at capture (so a hook added since does not run, and one
removed since still does), and copies the result into the captured output tensor. What is checked: one
capture per input signature, inputs copied in and outputs cloned out, k/v refreshed for a new prompt and
only then, a new capture when the weights move or LoRA hooks change (also between calls with one context),
eager calls while a hook watches, and the eager fallbacks. tests/gpu runs the real thing.
"""

from collections import OrderedDict

import numpy as np
import pytest
import torch

import sd15
from sd15 import cuda_graphs
from sd15 import lora as L
from sd15.fast import FastCrossAttention, fused_weight
from lora_files import random_attention_lora

RUN = dict(steps=4, seed=3, width=64, height=64, output_type="np")


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: `replay` reruns what was captured, with k/v buffers pinned and
    the hooks of the capture."""

    def replay(self):
        for module, kv in self.pinned:  # make each layer's k/v cache hit with the captured buffer, as it is now
            weight, _ = fused_weight(module, ("to_k", "to_v"))
            key = (weight.data_ptr(), weight._version, self.static_context._version)
            module.__dict__["_context_kv"] = [(self.static_context, key, kv)]
        now = [(module, module._forward_hooks, module._forward_pre_hooks) for module, _, _ in self.hooks]
        try:
            for module, forward, pre in self.hooks:
                module._forward_hooks, module._forward_pre_hooks = OrderedDict(forward), OrderedDict(pre)
            self.output.copy_(self.call())
        finally:
            for module, forward, pre in now:
                module._forward_hooks, module._forward_pre_hooks = forward, pre


class FakeCapture:
    """Stands in for `torch.cuda.graph(g, pool)`: notes the call made inside the block."""

    capturing = False

    def __init__(self, graph, pool=None):
        self.graph = graph

    def __enter__(self):
        FakeCapture.capturing = True
        FakeCapture.calls = []

    def __exit__(self, *exc):
        FakeCapture.capturing = False
        (runner, named), = FakeCapture.calls
        self.graph.output = FakeCapture.output
        self.graph.call = lambda: runner.module_forward(**named)
        self.graph.static_context = named.get("context")
        self.graph.hooks = [(mod, dict(mod._forward_hooks), dict(mod._forward_pre_hooks)) for mod in runner.module.modules()]
        self.graph.pinned = [
            (mod, kv) for mod in runner.module.modules() if isinstance(mod, FastCrossAttention)
            for ctx, _, kv in mod.__dict__.get("_context_kv", ()) if ctx is self.graph.static_context
        ]


class FakeStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA graph API replaced by the stand-ins; CPU tensors count as CUDA tensors for the runner."""
    monkeypatch.setattr(cuda_graphs, "_all_on_cuda", lambda tensors: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: torch.no_grad())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: FakeCapture.capturing)
    real_eager = cuda_graphs.GraphedForward.eager

    def eager(self, **named):
        output = real_eager(self, **named)
        if FakeCapture.capturing:
            FakeCapture.calls.append((self, named))
            FakeCapture.output = output
        return output

    monkeypatch.setattr(cuda_graphs.GraphedForward, "eager", eager)
    monkeypatch.setattr(cuda_graphs.GraphedForward, "module_forward", real_eager, raising=False)


@pytest.fixture
def models(tiny_checkpoint, fake_cuda):
    graphed = sd15.load(tiny_checkpoint, fast=True)
    cuda_graphs.install(graphed)
    eager = sd15.load(tiny_checkpoint, fast=True)
    return graphed, eager


def test_generations_replay_one_graph_and_match_eager(models):
    graphed, eager = models
    for prompt in ("a cat", "a lighthouse at night", "a cat"):  # each prompt must refresh the k/v buffers
        a, b = graphed.generate(prompt, **RUN), eager.generate(prompt, **RUN)
        assert np.abs(a - b).max() < 1e-6, prompt
    runner = graphed.unet.forward
    assert isinstance(runner, cuda_graphs.GraphedForward)
    assert runner.captures == 1  # one shape ([uncond; cond] at 8×8) for all three generations
    assert graphed.text_encoder.forward.captures == 1


def test_prompt_and_negative_of_different_lengths_replay_a_graph_each(models, monkeypatch):
    """The two guidance branches, called apart (their texts differ in length), alternate every step: each
    replays its own graph on its own k/v buffers, and the runner takes its stamp once per context, not per call."""
    graphed, eager = models
    long = ", ".join(["a red cat on a blue sofa"] * 12)  # two chunks; the negative prompt one
    stamps = []
    real_stamp = cuda_graphs._state_stamp
    monkeypatch.setattr(cuda_graphs, "_state_stamp", lambda module: (stamps.append(module), real_stamp(module))[1])
    for prompt in (long, long.replace("cat", "dog")):
        a, b = graphed.generate(prompt, **RUN), eager.generate(prompt, **RUN)
        assert np.abs(a - b).max() < 1e-6, prompt
    assert graphed.unet.forward.captures == 2  # (B, 77) and (B, 154) contexts
    assert sum(m is graphed.unet for m in stamps) == 4  # two generations × two contexts


def test_a_stale_kv_buffer_would_be_caught(models, monkeypatch):
    """Without the refresh, the second prompt would be drawn with the first prompt's k/v: the stand-in
    reproduces that failure, so the test above does check the refresh."""
    graphed, eager = models
    graphed.generate("a cat", **RUN)
    monkeypatch.setattr(cuda_graphs.GraphedForward, "_refresh_context", lambda self, entry: None)
    a, b = graphed.generate("a lighthouse at night", **RUN), eager.generate("a lighthouse at night", **RUN)
    assert np.abs(a - b).max() > 1e-3


def test_new_shapes_get_their_own_graph_and_outputs_are_copies(models):
    graphed, _ = models
    unet = graphed.unet
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0]), torch.randn(2, 77, 48)
    with torch.no_grad():
        first = unet(x, t, ctx)
        second = unet(x * 0, t, ctx)
        assert not torch.equal(first, second)  # the first result was not overwritten by the replay
        unet(torch.randn(2, 4, 6, 6), t, ctx)
        assert torch.equal(unet(x, t=t, context=ctx), first)  # by name: the same graph and k/v buffers
    assert unet.forward.captures == 2
    runner, eager_calls = unet.forward, []
    real_eager = runner.eager
    runner.eager = lambda **named: (eager_calls.append(sorted(named)), real_eager(**named))[1]
    with torch.enable_grad():
        unet(x, t, ctx)  # grad mode, but nothing requires grad (sd15.load freezes the weights): replayed
        assert eager_calls == []
        out = unet(x.clone().requires_grad_(), t, ctx)  # guidance by gradient, say: autograd must see it
        assert eager_calls == [["context", "t", "x"]] and out.grad_fn is not None
        unet.requires_grad_(True)  # fine-tuning, say: the same addresses and hooks, and autograd wants them
        out = unet(x, t, ctx)
        unet.requires_grad_(False)
    assert len(eager_calls) == 2 and out.grad_fn is not None
    assert unet.forward.captures == 2


def test_moved_weights_or_new_loras_mean_a_new_capture(models, tmp_path):
    graphed, eager = models
    graphed.generate("a cat", **RUN)
    path = random_attention_lora(eager, tmp_path / "lora.safetensors")
    try:
        for scale in (0.8, 0.4):  # on the fly: a forward hook whose tensors and scale a graph holds
            for m in (graphed, eager):
                m.unload_loras()
                m.load_lora(path, scale=scale, merge=False)
            a, b = graphed.generate("a cat", **RUN), eager.generate("a cat", **RUN)
            assert np.abs(a - b).max() < 1e-6, scale
        assert graphed.unet.forward.captures == 3  # no LoRA, 0.8, 0.4: a graph would replay the old one
        assert not graphed.unet.forward.observed  # a LoRA's hook computes inside the graph: still graphed
    finally:
        for m in (graphed, eager):
            m.unload_loras()
    graphed.unet.to(torch.float64).to(torch.float32)  # new parameter tensors at new addresses
    a, b = graphed.generate("a dog", **RUN), eager.generate("a dog", **RUN)
    assert graphed.unet.forward.captures == 4
    assert np.abs(a - b).max() < 1e-6


def test_seamless_padding_means_a_new_capture(models):
    """sd15.seamless switches the convolutions to circular padding, which a captured graph would keep as it was."""
    graphed, eager = models
    graphed.generate("a cat", **RUN)
    a, b = graphed.generate("a cat", seamless=True, **RUN), eager.generate("a cat", seamless=True, **RUN)
    assert np.abs(a - b).max() < 1e-6 and graphed.unet.forward.captures == 2
    assert np.abs(graphed.generate("a cat", **RUN) - eager.generate("a cat", **RUN)).max() < 1e-6
    assert graphed.unet.forward.captures == 3  # back to zero padding: not the seamless graph


def test_a_lora_applied_between_calls_with_one_context_tensor_is_used(models, tmp_path):
    """The UNet called directly with the same context tensor before and after a LoRA is applied (generate()
    encodes a new context each call; a caller of the UNet need not): merged, the cross-attention k/v buffers
    must be recomputed from the changed k/v weights; on the fly, the graph captured again with the hook."""
    graphed, eager = models
    path = random_attention_lora(eager, tmp_path / "lora.safetensors")  # attn2's to_k and to_v among them
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0]), torch.randn(2, 77, 48)
    with torch.no_grad():
        base = graphed.unet(x, t, ctx)
        for merge in (True, False):
            with L.apply_lora(graphed, path, merge=merge), L.apply_lora(eager, path, merge=merge):
                ours, theirs = graphed.unet(x, t, ctx), eager.unet(x, t, ctx)
            assert (theirs - base).abs().max() > 1e-2  # the LoRA does something
            assert (ours - theirs).abs().max() < 1e-6, merge
            assert (graphed.unet(x, t, ctx) - base).abs().max() < 1e-6, merge  # and is gone again
    assert graphed.unet.forward.captures == 3  # no LoRA (also merged: same addresses, no hook), on the fly, none


def test_a_hook_that_watches_sees_every_call(models):
    """A replay runs no Python: a hook that records outputs would see the capture and then nothing. While
    one is on a submodule the runner stays eager, and it captures again once the hook is gone."""
    graphed, eager = models
    graphed.generate("a cat", **RUN)
    seen = []
    handle = graphed.unet.input_blocks[1][0].in_layers[2].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    try:
        a = graphed.generate("a cat", **RUN)
    finally:
        handle.remove()
    assert len(seen) == RUN["steps"] + 1  # every UNet call of PNDM's steps + 1, and no warm-up or capture
    assert graphed.unet.forward.observed and graphed.unet.forward.captures == 1
    assert np.abs(a - eager.generate("a cat", **RUN)).max() < 1e-6
    graphed.generate("a cat", **RUN)
    assert not graphed.unet.forward.observed and graphed.unet.forward.captures == 2


def test_textual_inversion_calls_stay_eager(models):
    graphed, _ = models
    ids = graphed.tokenizer(["a cat"])
    extra = torch.randn(1, 48)
    ids[0, 2] = graphed.text_encoder.embeddings.token_embedding.num_embeddings  # an extra token
    with torch.no_grad():
        graphed.text_encoder(ids, extra_tokens=extra)
    assert graphed.text_encoder.forward.captures == 0


def test_a_timestep_given_as_a_number_runs_eagerly(models):
    """`unet(x, 500, ctx)` is allowed (UNet.forward makes t a tensor); in a graph that would be a host copy
    during capture, which CUDA forbids, and a capture per timestep value."""
    graphed, eager = models
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 48)
    with torch.no_grad():
        ours = graphed.unet(x, 500, ctx)
        assert torch.equal(ours, eager.unet(x, torch.tensor([500, 500]), ctx))
        graphed.unet(x, t=250.0, context=ctx)
        assert graphed.unet.forward.captures == 0
        graphed.unet(x, torch.tensor([500, 500]), ctx)
    assert graphed.unet.forward.captures == 1


def test_controlnet_steps_replay_graphs_of_their_own(models, tmp_path):
    """A ControlNet's residuals (a list of 12 tensors and one more) get static buffers like any tensor argument:
    the steps with residuals replay one graph, the steps without (after control_guidance_end) another, and the
    images equal the eager ones."""
    from PIL import Image

    from sd15.random_weights import random_controlnet, save_checkpoint

    graphed, eager = models
    path = save_checkpoint(random_controlnet("tiny", seed=4), tmp_path / "control.safetensors")
    hint = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    run = dict(RUN, control_image=hint, control_guidance_end=0.5)
    for image_seed in (3, 4):
        a = graphed.generate("a cat", controlnet=graphed.load_controlnet(path), **{**run, "seed": image_seed})
        b = eager.generate("a cat", controlnet=eager.load_controlnet(path), **{**run, "seed": image_seed})
        assert np.abs(a - b).max() < 1e-6
    plain = eager.generate("a cat", **{**RUN, "seed": 4})
    assert np.abs(b - plain).max() > 1e-2  # the residuals reached the image
    assert graphed.unet.forward.captures == 2  # with residuals, and without them
