"""A prompt and a negative prompt of different lengths (in 77-token chunks), as the web UI runs them.

By default the web UI keeps each at its own length and calls the UNet once per guidance branch
(`CFGDenoiser.forward`, its option "Pad prompt/negative prompt" off); with that option on ("Pad conds: True"
in its PNGs) the shorter is padded with the encoding of "" and one call serves both. sd15 does the same,
`pad_conds` being the option. Checked here against the UNet called by hand on each branch's own context.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import sd15
from sd15 import pipeline
from sd15 import prompts as P
from sd15.cli import main
from sd15.pnginfo import parse_parameters, read_parameters

LONG = ", ".join(["a red cat on a blue sofa"] * 12)  # > 75 tokens: two chunks
RUN = dict(steps=2, width=64, height=64, seed=3, output_type="np", sampler="euler")


def unet_contexts(m, monkeypatch) -> list[torch.Tensor]:
    """Record the context of every UNet call."""
    seen = []
    real = type(m.unet).forward
    monkeypatch.setattr(m.unet, "forward", lambda x, t, ctx, **kw: (seen.append(ctx), real(m.unet, x, t, ctx, **kw))[1])
    return seen


def test_unequal_lengths_call_the_unet_once_per_branch_with_its_own_context(tiny_model):
    with torch.no_grad():
        cond, uncond = P.encode_prompts(tiny_model, [LONG]), P.encode_prompts(tiny_model, ["blurry"])
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
        eps = pipeline.guided_eps_model(tiny_model, cond, uncond, 7.5)(x, t)
        eps_u, eps_c = tiny_model.unet(x, t, uncond), tiny_model.unet(x, t, cond)
    assert cond.shape[1] == 154 and uncond.shape[1] == 77
    # fp32: the same two calls in the same order, so equal to the last bit
    assert torch.equal(eps, eps_u + 7.5 * (eps_c - eps_u))


def test_generate_runs_the_branches_apart_by_default_and_padded_with_pad_conds(tiny_model, monkeypatch):
    seen = unet_contexts(tiny_model, monkeypatch)
    apart = tiny_model.generate(LONG, negative_prompt="blurry", **RUN)
    assert [tuple(c.shape[:2]) for c in seen] == [(1, 77), (1, 154)] * 2  # euler: per step uncond, then cond
    with torch.no_grad():
        blurry, empty = P.encode_prompts(tiny_model, ["blurry"]), P.encode_prompts(tiny_model, [""])
    assert torch.equal(seen[0], blurry)  # the negative prompt at its own length, nothing appended
    seen.clear()
    padded = tiny_model.generate(LONG, negative_prompt="blurry", pad_conds=True, **RUN)
    assert [tuple(c.shape[:2]) for c in seen] == [(2, 154)] * 2  # one call on [uncond; cond]
    assert torch.equal(seen[0][0, :77], blurry[0]) and torch.equal(seen[0][0, 77:], empty[0])
    assert np.abs(apart - padded).max() > 1e-3  # the two ways differ (the web UI's "changes seeds")
    seen.clear()
    short = tiny_model.generate("a cat", negative_prompt="blurry", **RUN)
    assert [tuple(c.shape[:2]) for c in seen] == [(2, 77)] * 2  # equal lengths: one call, whatever pad_conds
    assert np.array_equal(short, tiny_model.generate("a cat", negative_prompt="blurry", pad_conds=True, **RUN))


def test_pad_conds_pads_with_the_empty_prompt_of_no_prompt_lora(tiny_checkpoint, tmp_path, monkeypatch):
    """The web UI makes its padding, the encoding of "", when the model loads: a LoRA a prompt names does not
    reach it (it does reach the prompt and the negative prompt)."""
    from lora_files import random_attention_lora

    m = sd15.load(tiny_checkpoint)
    random_attention_lora(m, tmp_path / "film.safetensors")  # the text encoder's attention too
    m.lora_dirs = [tmp_path]
    seen = unet_contexts(m, monkeypatch)
    m.generate(f"{LONG} <lora:film:1>", negative_prompt="blurry", pad_conds=True, **RUN)
    with torch.no_grad():
        empty = P.encode_prompts(m, [""])
    assert torch.equal(seen[0][0, 77:], empty[0])  # the negative prompt's padding
    assert not torch.equal(seen[0][0, :77], P.encode_prompts(m, ["blurry"])[0])  # the LoRA did act on the text


def test_a_batch_of_prompts_of_different_lengths_repeats_the_shorter_ones_last_vector(tiny_model, monkeypatch):
    seen = unet_contexts(tiny_model, monkeypatch)
    tiny_model.generate([LONG, "a dog"], batch_size=2, **RUN)
    with torch.no_grad():
        dog = P.encode_prompts(tiny_model, ["a dog"])[0]
    uncond, cond = seen[:2]
    assert uncond.shape[:2] == (2, 77) and cond.shape[:2] == (2, 154)
    assert torch.equal(cond[1, :77], dog) and torch.equal(cond[1, 77:], dog[-1:].expand(77, -1))


def test_prompt_editing_pads_a_prompts_stretches_to_one_length(tiny_model, monkeypatch):
    """`[LONG:a dog:1]`: the web UI encodes both texts of the prompt together, so "a dog" has two chunks too."""
    seen = unet_contexts(tiny_model, monkeypatch)
    tiny_model.generate(f"[{LONG}:a dog:1]", **RUN)
    with torch.no_grad():
        dog, empty = P.encode_prompts(tiny_model, ["a dog"]), P.encode_prompts(tiny_model, [""])
    conds = [c for c in seen if c.shape[1] == 154]
    assert len(conds) == 2 and not torch.equal(conds[0], conds[1])  # step 1 the long text, step 2 "a dog"
    assert torch.equal(conds[1][:, :77], dog) and torch.equal(conds[1][:, 77:], empty)


def test_hooks_cond_reduction_keeps_the_conditional_call_alone(tiny_model):
    name = "unet.middle_block.1.transformer_blocks.0.attn2.probs"
    with sd15.trace(tiny_model, capture=[name], reduce={name: "cond+mean_heads"}) as tr:
        tiny_model.generate(LONG, negative_prompt="blurry", **RUN)
    maps = tr[name]
    assert len(maps) == 2 and all(p.shape[-1] == 154 and p.shape[0] == 1 for p in maps)  # one per step, the cond call's
    branches, calls = [], []
    with sd15.trace(tiny_model, capture=[name], reduce={name: "cond"},
                    patch={name: lambda v, info: branches.append(info["branch"]) or calls.append(info["call"])}) as tr:
        tiny_model.generate(LONG, negative_prompt="blurry", **RUN)
    assert branches == ["uncond", "cond"] * 2
    assert calls == [0, 1, 2, 3]  # the uncond calls are counted, though "cond" keeps nothing of them
    assert [tr.get(name, call) is None for call in calls] == [True, False] * 2


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_runs_on_each_branch_with_its_own_text(tiny_model, controlnet, monkeypatch, guess_mode):
    calls = []
    real = type(controlnet).forward

    def spy(self, x, hint, t, context, scale, guess_mode=False):
        calls.append(context.shape[1])
        return real(self, x, hint, t, context, scale, guess_mode=guess_mode)

    monkeypatch.setattr(type(controlnet), "forward", spy)
    hint = np.zeros((64, 64, 3), np.uint8)
    tiny_model.generate(LONG, negative_prompt="blurry", controlnet=controlnet, control_image=hint, guess_mode=guess_mode, **RUN)
    assert calls == ([154] if guess_mode else [77, 154]) * 2  # guess mode: the conditional branch alone


def test_pad_conds_is_recorded_and_reproduced_from_the_png(workdir, tiny_checkpoint, capsys):
    args = ["--steps", "2", "--width", "64", "--height", "64", "--model", str(tiny_checkpoint), "--no-progress",
            "--seed", "1", "--sampler", "euler", "--negative", "blurry"]  # fmt: skip
    assert main(["generate", LONG, "--pad-conds", "-o", "padded.png", *args]) == 0
    assert parse_parameters(read_parameters(workdir / "padded.png"))["pad_conds"] is True
    assert "Pad conds: True" in read_parameters(workdir / "padded.png")
    assert main(["generate", LONG, "-o", "apart.png", *args]) == 0
    assert "Pad conds" not in read_parameters(workdir / "apart.png")
    assert main(["generate", "--from-png", "padded.png", "-o", "again.png", "--model", str(tiny_checkpoint),
                 "--no-progress"]) == 0  # fmt: skip
    pixels = {n: np.asarray(Image.open(workdir / f"{n}.png")) for n in ("padded", "apart", "again")}
    assert np.array_equal(pixels["again"], pixels["padded"]) and not np.array_equal(pixels["apart"], pixels["padded"])
