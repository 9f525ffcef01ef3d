"""sd15.hooks: capturing and patching named values, and the pictures made from them."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sd15
import sd15.attention
from sd15.cli import main
from sd15.hooks import points

RUN = dict(steps=3, seed=4, width=64, height=64, output_type="np")
ATTN2 = "unet.input_blocks.1.1.transformer_blocks.0.attn2.probs"
ATTN1 = "unet.output_blocks.7.1.transformer_blocks.0.attn1.probs"


def test_points_follow_checkpoint_names(tiny_model):
    names = points(tiny_model)
    assert "unet.input_blocks.1.0" in names and "unet.middle_block.1" in names
    assert ATTN1 in names and ATTN2 in names
    assert "text_encoder.encoder.layers.1" in names and "text_encoder.encoder.layers.0.self_attn.probs" in names
    assert "step.eps_cond" in names and "step.denoised" in names
    unet_keys = {k.rsplit(".", 2)[0] for k in tiny_model.unet.state_dict()}
    assert all(n.removeprefix("unet.").removesuffix(".probs") in unet_keys or
               any(k.startswith(n.removeprefix("unet.").removesuffix(".probs") + ".") for k in unet_keys)
               for n in names if n.startswith("unet."))  # fmt: skip


def test_attention_probabilities_are_distributions(tiny_model):
    with sd15.trace(tiny_model, capture=["unet.*.probs", "text_encoder.*.probs"]) as tr:
        tiny_model.generate("a cat", **RUN)
    for name in tr.names():
        for p in tr[name]:
            assert p.ndim == 4 and p.shape[1] == 8 if name.startswith("unet") else p.shape[1] == 12
            assert (p >= 0).all()
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)
    clip = tr["text_encoder.encoder.layers.0.self_attn.probs"][0]
    assert torch.all(clip[0, :, 3, 4:] == 0)  # causal: token 3 never attends to later tokens
    assert tr[ATTN2][0].shape == (2, 8, 64, 77)  # guided batch [uncond; cond], 8 heads, 8×8 pixels, 77 tokens


def test_module_globs_do_not_select_attention_probabilities(tiny_model):
    with sd15.trace(tiny_model, capture=["unet.*"]) as tr:
        tiny_model.generate("a cat", **RUN)
    assert "unet.input_blocks.1.0" in tr.names() and not any(n.endswith(".probs") for n in tr.names())


def test_capture_does_not_change_the_output(tiny_model):
    plain = tiny_model.generate("a cat", **RUN)
    with sd15.trace(tiny_model, capture=["unet.input_blocks.*.0", "unet.middle_block.1", "step.*", "text_encoder.encoder.layers.?"]) as tr:
        outputs_only = tiny_model.generate("a cat", **RUN)
    assert np.array_equal(plain, outputs_only)  # module-output hooks observe without touching
    assert len(tr["step.denoised"]) == len(tr["unet.input_blocks.1.0"]) == 4  # PLMS: 3 steps, 4 evaluations, each reported
    with sd15.trace(tiny_model, capture=["unet.*.probs"]):
        with_probs = tiny_model.generate("a cat", **RUN)
    # probabilities need the explicit softmax path instead of SDPA: the same maths, rounded differently (fp32)
    assert np.abs(plain - with_probs).max() < 1e-5


def test_no_trace_means_fast_path_and_nothing_installed(tiny_model, monkeypatch):
    with sd15.trace(tiny_model, capture=["unet.*"]):
        pass
    assert all(not m._forward_hooks for m in tiny_model.unet.modules())
    assert all(getattr(m, "probs_hook", None) is None for m in tiny_model.unet.modules())
    assert getattr(tiny_model, "_trace", None) is None

    def forbidden(*args, **kwargs):
        raise AssertionError("the explicit attention path ran without a trace")

    monkeypatch.setattr(sd15.attention, "attention_probabilities", forbidden)
    tiny_model.generate("a cat", **RUN)  # would raise if any layer left the fused path
    with sd15.trace(tiny_model, capture=[ATTN2]):
        with pytest.raises(AssertionError, match="explicit attention path"):
            tiny_model.generate("a cat", **RUN)  # only now does a layer need the probabilities


def test_only_captured_layers_compute_probabilities(tiny_model, monkeypatch):
    calls = []
    original = sd15.attention.attention_probabilities
    monkeypatch.setattr(sd15.attention, "attention_probabilities", lambda q, k, c=False: calls.append(q.shape) or original(q, k, c))
    with sd15.trace(tiny_model, capture=[ATTN2]):
        tiny_model.generate("a cat", **RUN)
    assert len(calls) == 4  # one layer, four UNet calls; all other layers stayed on SDPA


def test_classifier_free_guidance_branches(tiny_model):
    with sd15.trace(tiny_model, capture=["step.eps*"]) as tr:
        tiny_model.generate("a cat", guidance_scale=6.0, **RUN)
    for u, c, e in zip(tr["step.eps_uncond"], tr["step.eps_cond"], tr["step.eps"]):
        torch.testing.assert_close(e, u + 6.0 * (c - u), atol=1e-6, rtol=0)
        assert not torch.allclose(u, c)


def test_clip_layer_capture_matches_hidden_states(tiny_model):
    with sd15.trace(tiny_model, capture=["text_encoder.encoder.layers.*"]) as tr:
        tiny_model.generate("a cat", **RUN)
    ids = tiny_model.tokenizer(["a cat"])
    states = tiny_model.text_encoder.hidden_states(ids)
    assert torch.equal(tr["text_encoder.encoder.layers.1"][0], states[2])  # first encode: the prompt


def test_reductions_and_step_selection(tiny_model):
    with sd15.trace(tiny_model, capture=[ATTN2, "step.denoised"], reduce={"*.probs": "cond+mean_heads"}, steps=[0, 2]) as tr:
        tiny_model.generate("a cat", **RUN)
    with sd15.trace(tiny_model, capture=[ATTN2]) as full:
        tiny_model.generate("a cat", **RUN)
    assert [r.step for r in tr.records[ATTN2]] == [0, 2]  # each of PLMS's evaluations is reported as a step
    assert tr[ATTN2][0].shape == (1, 64, 77)
    torch.testing.assert_close(tr[ATTN2][0], full[ATTN2][0][1:].mean(1))
    assert [r.step for r in tr.records["step.denoised"]] == [0, 2]


def test_zeroing_a_head_by_patch_equals_zeroing_its_weights(tiny_model, tiny_checkpoint):
    head, width = 3, 32 // 8  # first-level attention: 32 channels, 8 heads of 4

    def zero_head(probs, info):
        probs = probs.clone()
        probs[:, head] = 0
        return probs

    with sd15.trace(tiny_model, patch={ATTN1: zero_head}):
        patched = tiny_model.generate("a cat", **RUN)
    edited = sd15.load(tiny_checkpoint)
    attn1 = edited.unet.output_blocks[7][1].transformer_blocks[0].attn1
    attn1.to_out[0].weight[:, head * width : (head + 1) * width] = 0  # that head's slice of the output projection
    by_weights = edited.generate("a cat", **RUN)
    plain = tiny_model.generate("a cat", **RUN)
    assert np.abs(patched - by_weights).max() < 1e-5  # explicit vs fused path rounding only
    assert np.abs(patched - plain).max() > 1e-3  # and the head mattered


def test_prompt_to_prompt_injection_of_own_maps_reproduces_the_run(tiny_model):
    with sd15.trace(tiny_model, capture=["unet.*.attn2.probs"]) as source:
        original = tiny_model.generate("a cat riding a bike", **RUN)
    with sd15.trace(tiny_model, patch={"unet.*.attn2.probs": lambda p, info: source.get(info["name"], info["call"])}):
        injected = tiny_model.generate("a cat riding a bike", **RUN)
    assert np.array_equal(original, injected)
    with sd15.trace(tiny_model, patch={"unet.*.attn2.probs": lambda p, info: source.get(info["name"], info["call"])}):
        swapped = tiny_model.generate("a dog riding a bike", **RUN)
    other = tiny_model.generate("a dog riding a bike", **RUN)
    assert np.abs(swapped - other).max() > 1e-4  # the injected maps really steered the new prompt's run


def test_cli_writes_attention_maps_and_trajectory(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    code = main(["generate", "a red cat", "--steps", "3", "--width", "64", "--height", "64", "--seed", "1",
                 "--model", str(tiny_checkpoint), "-o", "cat.png", "--attention-maps", "maps", "--save-steps", "steps",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["01-a.png", "02-red.png", "03-cat.png"]
    assert Image.open(tmp_path / "maps" / "03-cat.png").size == (64, 64)
    sheet = Image.open(tmp_path / "steps" / "trajectory.png")
    assert sheet.size == (2 * 64, 2 * 64)  # PLMS: 3 steps, 4 evaluations, on a 2×2 grid
    assert Image.open(tmp_path / "steps" / "trajectory.gif").n_frames == 4


def test_heatmaps_average_layers_at_their_own_resolution(tiny_model):
    from sd15 import visualize

    with sd15.trace(tiny_model, capture=[visualize.CROSS_ATTENTION], reduce=visualize.HEATMAP_REDUCE) as tr:
        tiny_model.generate("a cat", **RUN)
    heat = visualize.token_heatmaps(tr, (8, 8), (64, 64))
    assert heat.shape == (77, 64, 64)
    torch.testing.assert_close(heat.sum(0), torch.ones(64, 64), atol=1e-4, rtol=0)  # still a distribution over tokens


def test_prompt_to_prompt_example(tiny_model, tiny_checkpoint, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "examples" / "prompt_to_prompt.py"
    spec = importlib.util.spec_from_file_location("prompt_to_prompt", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    source, swapped, plain = example.word_swap(tiny_model, "a cat riding a bicycle", "a dog riding a bicycle", 4, 0, 64, 1.0)
    alone = tiny_model.generate("a cat riding a bicycle", steps=4, width=64, height=64,
                                latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))[0]  # fmt: skip
    a, s, p = (np.asarray(im, dtype=int) for im in (source, swapped, plain))
    assert np.abs(a - np.asarray(alone, dtype=int)).max() <= 1  # the source run is untouched by the injection
    assert np.abs(s - a).mean() < np.abs(p - a).mean()  # injected maps keep the edit closer to the source
    result = subprocess.run([sys.executable, str(path), "a cat", "a dog", "--model", str(tiny_checkpoint), "--steps", "2",
                             "--size", "64", "-o", str(tmp_path / "p2p.png")], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "p2p.png").size == (192, 64)


def test_attention_map_labels_follow_what_the_model_saw(tiny_model):
    from sd15.visualize import prompt_token_labels

    labels = prompt_token_labels(tiny_model, "a (red:1.3) cat <lora:none:0.5>")
    assert labels == [(1, "a"), (2, "red"), (3, "cat")]
    long = prompt_token_labels(tiny_model, " ".join(["dog"] * 80))
    assert len(long) == 80 and long[75] == (77 + 1, "dog")  # the second 77-token chunk


def test_bad_patterns_and_reductions_are_refused_before_anything_is_installed(tiny_model):
    """A typo would capture nothing, silently, and an unknown reduction used to fail at the first capture,
    mid-run: both are refused when the trace is made or entered, and the model is left as it was."""
    with pytest.raises(ValueError, match="'unet.\\*.atn2.probs' names no point"):
        with sd15.trace(tiny_model, capture=["unet.*.attn2.probs", "unet.*.atn2.probs"]):
            pass
    with pytest.raises(ValueError, match="'mean_head' is not a reduction"):
        sd15.trace(tiny_model, capture=[ATTN2], reduce={"*.probs": "cond+mean_head"})
    assert getattr(tiny_model, "_trace", None) is None
    with sd15.trace(tiny_model, capture=[ATTN2, "vae.decoder.mid.block_1", "step.x"]) as tr:  # all real points
        tiny_model.generate("a cat", **RUN)
    assert len(tr[ATTN2]) > 0 and len(tr["vae.decoder.mid.block_1"]) == 1
    assert len(tr["step.x"]) == 4  # PLMS reports its 3 steps + 1 evaluations


def test_captured_values_do_not_change_when_the_run_edits_its_tensors(tiny_model):
    """Inpainting blends the known region into x in place after each step; a capture must keep what it saw (a
    detached tensor on the capture device shares the run's memory unless copied)."""
    x, denoised = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    with sd15.trace(tiny_model, capture=["step.x", "step.denoised"]) as tr:
        tr.end_step({"x": x, "denoised": denoised})
        x.add_(5.0)
        denoised.mul_(3.0)
    assert torch.equal(tr["step.x"][0], torch.zeros(1, 4, 8, 8)) and torch.equal(tr["step.denoised"][0], torch.ones(1, 4, 8, 8))


def test_heatmaps_and_labels_follow_prompt_editing(tiny_model):
    """The context is 77 tokens for "a cat" and 154 for 80 "dog"s: summing the two used to fail on the shapes,
    and the labels named the editing syntax's own characters (":", "0", ".", "5") instead of its words."""
    from sd15 import visualize

    long = " ".join(["dog"] * 80)
    with sd15.trace(tiny_model, capture=[visualize.CROSS_ATTENTION], reduce=visualize.HEATMAP_REDUCE) as tr:
        tiny_model.generate(f"[a cat:{long}:0.5]", **{**RUN, "steps": 4, "sampler": "euler"})
    heat = visualize.token_heatmaps(tr, (8, 8), (64, 64))
    assert heat.shape == (154, 64, 64) and torch.isfinite(heat).all() and heat[77:].sum() > 0
    assert visualize.prompt_token_labels(tiny_model, "a [cat:dog:0.5]") == [(1, "a"), (2, "cat/dog")]
    assert visualize.prompt_token_labels(tiny_model, "[cat|dog] x", steps=1) == [(1, "cat"), (2, "x")]  # dog: never
    assert visualize.prompt_token_labels(tiny_model, "[cat:dog:9] x", steps=4) == [(1, "cat"), (2, "x")]


def test_attention_maps_and_trajectory_of_a_hires_fix(tiny_model, tmp_path):
    """The first pass of a 1.5× hires fix has an 8×8 latent, the second 12×12: its maps matched no level of the
    second's (an error after the run), and its frames were pasted over each other in the grid."""
    from sd15 import visualize

    capture = [visualize.CROSS_ATTENTION, "step.denoised"]
    with sd15.trace(tiny_model, capture=capture, reduce=visualize.HEATMAP_REDUCE) as tr:
        image = tiny_model.hires_fix("a cat", scale=1.5, steps=2, seed=1, width=64, height=64)[0]
    assert image.size == (96, 96)
    heat = visualize.token_heatmaps(tr, (12, 12), (96, 96))
    torch.testing.assert_close(heat.sum(0), torch.ones(96, 96), atol=1e-4, rtol=0)
    frames = visualize.decode_trajectory(tiny_model, tr)
    assert [f.size for f in frames] == [(64, 64)] * 3 + [(96, 96)] * 3  # PLMS: 2 steps, 3 evaluations; twice
    sheet, anim = visualize.save_trajectory(frames, tmp_path)
    assert Image.open(sheet).size == (3 * 96, 2 * 96)
    assert np.array_equal(np.asarray(Image.open(sheet).crop((192, 96, 288, 192))), np.asarray(frames[-1]))  # whole
    with sd15.trace(tiny_model, capture=[visualize.CROSS_ATTENTION]) as tr:
        tiny_model.generate("a cat", **RUN)
    with pytest.raises(ValueError, match="capture 'step.denoised'"):  # not an IndexError from the empty grid
        visualize.decode_trajectory(tiny_model, tr)


def test_trajectory_frames_decode_as_the_pipeline_decodes(tiny_model, monkeypatch):
    """An untiled decode that runs out of memory is retried in tiles, as for the image itself."""
    from sd15 import visualize

    with sd15.trace(tiny_model, capture=["step.denoised"]) as tr:
        image = tiny_model.generate("a cat", **{**RUN, "steps": 2, "sampler": "euler", "output_type": "pil"})[0]

    def out_of_memory(_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setenv("SD15_TILED_VAE", "0")
    monkeypatch.setattr(tiny_model.vae, "decode", out_of_memory)
    frames = visualize.decode_trajectory(tiny_model, tr)
    assert len(frames) == 2
    assert np.abs(np.asarray(frames[-1], dtype=int) - np.asarray(image, dtype=int)).max() <= 1  # the image itself


def test_attention_map_files_sort_in_prompt_order_past_99_tokens(tmp_path):
    from sd15.visualize import save_attention_maps

    labels = [(i, f"w{i}") for i in range(1, 121)]
    written = save_attention_maps(tmp_path, Image.new("RGB", (8, 8)), torch.rand(154, 8, 8), labels)
    assert sorted(p.name for p in written) == [p.name for p in written]
    assert written[0].name == "001-w1.png" and written[-1].name == "120-w120.png"
