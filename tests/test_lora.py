"""LoRA (sd15.lora): kohya-style names onto sd15's modules (checked against the key lists of real files and
against diffusers' own module names), the merged and on-the-fly arithmetic, exact unmerging, reporting what
does not match, `<lora:name:scale>` in prompts, the PNG record, the CLI, and parity with diffusers'
`load_lora_weights` on the same random kohya file."""

import hashlib
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import sd15
from sd15 import lora as L
from sd15.checkpoint import CheckpointError
from sd15.clip import CLIPTextConfig, CLIPTextModel
from sd15.pnginfo import format_parameters, parse_parameters, read_parameters
from sd15.unet import UNet, UNetConfig

KEYS = Path(__file__).parent / "data" / "checkpoint-keys"  # read off real checkpoints (see its README)


def reference_keys(name: str) -> dict[str, list[int]]:
    """{key: shape} of a LoRA key list; -1 (the rank) becomes 4."""
    keys = {}
    for line in (KEYS / f"{name}.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        keys[key] = [4 if d == -1 else d for d in eval(shape)]  # noqa: S307 (a literal list of ints)
    return keys


def layout(name: str) -> set[str]:
    """The kinds of layer a reference file adapts: its entry names with the numbers written as N."""
    return {re.sub(r"\d+", "N", k.split(".")[0]) for k in reference_keys(name)}


V1_LAYOUT = layout("LoRA-v1-UNET") | layout("LoRA-v1-CLIP")


@pytest.fixture(scope="module")
def m(tiny_checkpoint):
    return sd15.load(tiny_checkpoint)


def kohya_lora(m, rank=4, seed=0, kinds=V1_LAYOUT, alpha=2.0, zero_up=False) -> dict[str, torch.Tensor]:
    """A random kohya-style LoRA for the model `m`, adapting the kinds of layer a reference file adapts
    (`kinds=None`: every Linear and Conv2d, as a LoCon would)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (_, _, module) in L.lora_targets(m.unet, m.text_encoder).items():
        if kinds is not None and re.sub(r"\d+", "N", name) not in kinds:
            continue
        out_f, in_f, *kernel = module.weight.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, *kernel, generator=g) / math.sqrt(in_f * math.prod(kernel))
        up = torch.randn(out_f, rank, *([1, 1] if kernel else []), generator=g) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.zeros_like(up) if zero_up else up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def write(tensors, path) -> Path:
    save_file(tensors, str(path))
    return Path(path)


def unet_out(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g)
    with torch.no_grad():
        return m.unet(x, torch.tensor([500, 20]), ctx)


def text_out(m):
    with torch.no_grad():
        return m.text_encoder(m.tokenizer(["a photo of a cat", "a red car"]))


def weights(m) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(m, c).state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Names


def test_kohya_names_map_to_the_original_modules():
    with torch.device("meta"):
        unet, clip = UNet(UNetConfig()), CLIPTextModel(CLIPTextConfig())
    targets = {name: (component, path) for name, (component, path, _) in L.lora_targets(unet, clip).items()}
    assert targets["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == (
        "unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    assert targets["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == ("text_encoder", "encoder.layers.0.self_attn.q_proj")
    assert targets["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"] == (
        "unet", "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj")
    assert targets["lora_unet_mid_block_attentions_0_proj_in"] == ("unet", "middle_block.1.proj_in")
    assert targets["lora_unet_down_blocks_2_resnets_1_conv2"] == ("unet", "input_blocks.8.0.out_layers.3")
    assert targets["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == ("unet", "input_blocks.4.0.skip_connection")
    assert targets["lora_unet_mid_block_resnets_1_time_emb_proj"] == ("unet", "middle_block.2.emb_layers.1")
    assert targets["lora_unet_down_blocks_2_downsamplers_0_conv"] == ("unet", "input_blocks.9.0.op")
    assert targets["lora_unet_up_blocks_0_upsamplers_0_conv"] == ("unet", "output_blocks.2.1.conv")  # no attention
    assert targets["lora_unet_up_blocks_1_upsamplers_0_conv"] == ("unet", "output_blocks.5.2.conv")
    assert len(set(targets.values())) == len(targets)


@pytest.mark.parametrize("name", ["LoRA-v1-UNET", "LoRA-v1-CLIP", "LoRA-v1A-UNET", "LoRA-v1A-CLIP"])
def test_every_entry_of_real_lora_files_fits_a_full_size_layer(name):
    """The reference key lists of real SD1.x LoRAs: every entry names a module of the full-size model, with
    shapes that fit it (the rank taken as 4)."""
    with torch.device("meta"):
        unet, clip = UNet(UNetConfig()), CLIPTextModel(CLIPTextConfig())
    targets = L.lora_targets(unet, clip)
    keys = reference_keys(name)
    entries = {k.split(".")[0] for k in keys}
    assert entries and entries <= targets.keys()
    for entry in entries:
        alpha = keys.get(f"{entry}.alpha")
        layer = L.LoRALayer(torch.empty(keys[f"{entry}.lora_down.weight"], device="meta"),
                            torch.empty(keys[f"{entry}.lora_up.weight"], device="meta"), None if alpha is None else 4.0)  # fmt: skip
        assert L._shape_problem(targets[entry][2], layer) is None, entry
    assert ("alpha" in " ".join(keys)) == ("v1A" in name)  # what the "A" variant adds: an alpha per layer


def test_names_agree_with_diffusers_module_names(m):
    """Independent of sd15.keymap: diffusers' own UNet for the tiny config, its Linear/Conv2d module paths
    with dots as underscores, are exactly the kohya names sd15 gives its modules."""
    from diffusers import UNet2DConditionModel
    from reference_models import diffusers_unet_config

    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_unet_config(m.unet.config))
    theirs = {"lora_unet_" + p.replace(".", "_") for p, mod in reference.named_modules()
              if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}  # fmt: skip
    ours = {n for n, (c, _, _) in L.lora_targets(m.unet, m.text_encoder).items() if c == "unet"}
    assert ours == theirs


# --------------------------------------------------------------------------------------------------
# Arithmetic


def test_zero_up_weights_change_nothing(m, tmp_path):
    path = write(kohya_lora(m, kinds=None, zero_up=True), tmp_path / "zero.safetensors")
    before_unet, before_text = unet_out(m), text_out(m)
    for merge in (True, False):
        with L.apply_lora(m, path, scale=0.8, merge=merge):
            assert torch.equal(unet_out(m), before_unet)
            assert torch.equal(text_out(m), before_text)


def test_merge_then_unmerge_restores_the_weights_bit_exactly(m, tmp_path):
    before = weights(m)
    first = L.apply_lora(m, write(kohya_lora(m, kinds=None, seed=1), tmp_path / "a.safetensors"), 0.7)
    second = L.apply_lora(m, write(kohya_lora(m, seed=2, alpha=None), tmp_path / "b.safetensors"), 1.3, text_encoder_scale=0.5)
    changed = weights(m)
    assert sum(not torch.equal(before[k], changed[k]) for k in before) > 50
    first.remove()  # out of order: the second stays, recomputed from the original weights
    only_second = weights(m)
    second.remove()
    assert all(torch.equal(before[k], v) for k, v in weights(m).items())
    again = L.apply_lora(m, tmp_path / "b.safetensors", 1.3, text_encoder_scale=0.5)
    assert all(torch.equal(only_second[k], v) for k, v in weights(m).items())
    again.remove()
    assert all(torch.equal(before[k], v) for k, v in weights(m).items())


@pytest.mark.parametrize("merge, fault", [(True, "delta"), (True, "add"), (False, "add")],
                         ids=["out-of-memory-in-a-merge", "ctrl-c-between-layers", "ctrl-c-on-the-fly"])  # fmt: skip
def test_an_interrupted_apply_leaves_the_model_as_it_was(m, tmp_path, monkeypatch, merge, fault):
    """An error part-way through applying a LoRA (out of memory while a large LoCon is merged, Ctrl-C in a
    notebook) takes off the layers done so far and keeps no entry of it on any layer: the model is as it
    was, and the LoRA already on those layers comes off exactly."""
    before = weights(m)
    other = L.apply_lora(m, write(kohya_lora(m, seed=14), tmp_path / "other.safetensors"), 0.5)  # on some of the same layers
    with_other, out_with_other = weights(m), unet_out(m)
    calls = []

    def fails_the_20th_time(real):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 20:
                raise torch.cuda.OutOfMemoryError("injected") if fault == "delta" else KeyboardInterrupt
            return real(*args, **kwargs)

        return call

    owner = L.LoRALayer if fault == "delta" else L._LayerPatch
    monkeypatch.setattr(owner, fault, fails_the_20th_time(getattr(owner, fault)))
    with pytest.raises((torch.cuda.OutOfMemoryError, KeyboardInterrupt)):
        m.load_lora(write(kohya_lora(m, kinds=None, seed=13), tmp_path / "big.safetensors"), 0.8, merge=merge)
    monkeypatch.undo()
    assert not m.loras
    assert all(torch.equal(with_other[k], v) for k, v in weights(m).items())
    assert torch.equal(unet_out(m), out_with_other)  # no forward hook left behind either
    other.remove()
    assert all(torch.equal(before[k], v) for k, v in weights(m).items())


def test_merged_weight_is_w_plus_scale_alpha_over_rank_up_down(m, tmp_path):
    tensors = kohya_lora(m, kinds=None, rank=4, alpha=2.0, seed=3)
    path = write(tensors, tmp_path / "c.safetensors")
    checks = {  # a linear layer, a 1×1 conv, a 3×3 conv, a text-encoder layer
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": m.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k,
        "lora_unet_mid_block_attentions_0_proj_out": m.unet.middle_block[1].proj_out,
        "lora_unet_up_blocks_1_resnets_2_conv1": m.unet.output_blocks[5][0].in_layers[2],
        "lora_te_text_model_encoder_layers_1_mlp_fc2": m.text_encoder.encoder.layers[1].mlp.fc2,
    }  # fmt: skip
    originals = {name: module.weight.clone() for name, module in checks.items()}
    with L.apply_lora(m, path, scale=0.6, text_encoder_scale=0.9):
        for name, module in checks.items():
            up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
            scale = 0.9 if name.startswith("lora_te") else 0.6
            expected = originals[name] + scale * (2.0 / 4) * (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            assert torch.allclose(module.weight, expected, rtol=1e-6, atol=1e-7), name
            assert not torch.allclose(module.weight, originals[name], atol=1e-4)


def test_on_the_fly_and_merged_agree_and_stack(m, tmp_path):
    a = write(kohya_lora(m, kinds=None, seed=4), tmp_path / "a.safetensors")
    b = write(kohya_lora(m, seed=5, alpha=None), tmp_path / "b.safetensors")
    before = weights(m)
    base = unet_out(m)
    results = {}
    for merge in (True, False):
        with L.apply_lora(m, a, 0.8, merge=merge), L.apply_lora(m, b, -0.4, text_encoder_scale=0.3, merge=merge):
            results[merge] = unet_out(m), text_out(m)
            if not merge:
                assert all(torch.equal(before[k], v) for k, v in weights(m).items())  # hooks leave weights alone
    (merged_u, merged_t), (live_u, live_t) = results[True], results[False]
    scale = base.abs().max()
    assert (merged_u - base).abs().max() > 0.05 * scale
    assert (merged_u - live_u).abs().max() < 1e-5 * scale
    assert (merged_t - live_t).abs().max() < 1e-5 * merged_t.abs().max()
    assert torch.equal(unet_out(m), base)  # all removed
    # the same LoRA merged and another on the fly, at once
    with L.apply_lora(m, a, 0.8, merge=True), L.apply_lora(m, b, -0.4, text_encoder_scale=0.3, merge=False):
        assert (unet_out(m) - merged_u).abs().max() < 1e-5 * scale


def test_unmatched_entries_are_reported_and_misfits_refused(m, tmp_path):
    tensors = kohya_lora(m, seed=6)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32, 1, 1)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4, 1, 1)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a"] = torch.zeros(4, 4)
    with pytest.warns(UserWarning, match="2 entries match no layer"):
        applied = L.apply_lora(m, write(tensors, tmp_path / "extra.safetensors"))
    applied.remove()
    assert applied.unmatched == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a",
                                 "lora_unet_down_blocks_9_attentions_0_proj_in"]  # fmt: skip

    wide = kohya_lora(m, seed=7)  # cross-attention keys 1024 wide, as in an SD2 LoRA
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    wide[f"{name}.lora_down.weight"] = torch.zeros(4, 1024)
    before = weights(m)
    with pytest.raises(CheckpointError, match=f"{name}: down \\[4, 1024\\]"):
        L.apply_lora(m, write(wide, tmp_path / "sd2.safetensors"))
    assert all(torch.equal(before[k], v) for k, v in weights(m).items())  # nothing half-applied
    with pytest.raises(CheckpointError, match="no entry"):  # an SDXL UNet LoRA names the original layout's blocks
        L.apply_lora(m, write({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
                               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4)}, tmp_path / "xl.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match="no complete adapter layer .* a LoHa's hada_w1_a"):  # one factor of four
        L.read_lora(write({"lora_unet_a.hada_w1_a": torch.zeros(4, 4)}, tmp_path / "loha.safetensors"))


def test_a_locon_on_an_inpainting_model_adapts_the_latent_channels_of_conv_in(m, tmp_path):
    """A LoCon made for SD1.5 adapts conv_in's 4 latent channels; an inpainting model's conv_in takes 9
    (latent, mask, masked image). As in the web UI, the LoRA is applied there to the latent channels, and
    the other 5 are left as they are (not refused as "made for another model family")."""
    from sd15.random_weights import random_checkpoint, save_checkpoint

    inpaint = sd15.load(save_checkpoint(random_checkpoint("tiny", seed=0, inpainting=True), tmp_path / "inpaint.safetensors"))
    tensors = kohya_lora(m, kinds=None, seed=18, alpha=2.0)  # every layer of the 4-channel model, conv_in too
    path = write(tensors, tmp_path / "locon.safetensors")
    conv_in = inpaint.unet.input_blocks[0][0]
    before = conv_in.weight.clone()  # (32, 9, 3, 3)
    up, down = tensors["lora_unet_conv_in.lora_up.weight"], tensors["lora_unet_conv_in.lora_down.weight"]
    delta = 0.7 * (2.0 / 4) * (up.flatten(1) @ down.flatten(1)).reshape(32, 4, 3, 3)
    x = torch.randn(1, 9, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = conv_in(x) + F.conv2d(x[:, :4], delta, padding=conv_in.padding)  # the latent channels only
        for merge in (True, False):
            with L.apply_lora(inpaint, path, 0.7, merge=merge) as applied:
                assert not applied.unmatched
                assert (conv_in(x) - expected).abs().max() < 1e-5 * expected.abs().max(), merge
                if merge:
                    assert torch.equal(conv_in.weight[:, 4:], before[:, 4:])
    assert torch.equal(conv_in.weight, before)


def test_pickled_lora_files_are_read_safely(m, tmp_path):
    torch.save(kohya_lora(m, seed=8), tmp_path / "old.pt")
    lora = L.read_lora(tmp_path / "old.pt")
    assert lora.name == "old" and len(lora.layers) > 20

    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"lora_unet_a.lora_down.weight": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="Refused"):
        L.read_lora(tmp_path / "evil.pt")


# --------------------------------------------------------------------------------------------------
# Parity


@pytest.fixture(scope="module")
def reference(m, tiny_state_dict, tmp_path_factory):
    from reference_models import diffusers_pipeline

    return diffusers_pipeline(tiny_state_dict, m, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize(
    "kinds, alpha, scale",
    [(V1_LAYOUT, None, 1.0), (None, 2.0, 0.7)],
    ids=["v1-layout-no-alpha", "every-layer-with-alpha-scale-0.7"],
)
def test_same_outputs_as_diffusers_load_lora_weights(m, reference, tmp_path, kinds, alpha, scale):
    """A random kohya file through diffusers' converter and PEFT, and through sd15: the same UNet output and
    the same text-encoder output. Files: the reference "v1" layout (attention layers, no alpha), and every
    Linear and Conv2d (LoCon: ResBlock, sampler, 3×3 convs) with alpha, at scale 0.7."""
    path = write(kohya_lora(m, kinds=kinds, seed=9, alpha=alpha), tmp_path / "parity.safetensors")
    reference.load_lora_weights(str(path), adapter_name="parity")
    reference.set_adapters(["parity"], adapter_weights=[scale])
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g), torch.tensor([500, 20])
    ids = m.tokenizer(["a photo of a cat", "a red car"])
    try:
        with torch.no_grad():
            base = m.unet(x, t, ctx)
            theirs_u = reference.unet(x, t, ctx).sample
            theirs_t = reference.text_encoder(ids).last_hidden_state
            for merge in (True, False):
                with L.apply_lora(m, path, scale, merge=merge):
                    ours_u, ours_t = m.unet(x, t, ctx), m.text_encoder(ids)
                assert (ours_u - theirs_u).abs().max() < 1e-5 * theirs_u.abs().max()
                assert (ours_t - theirs_t).abs().max() < 1e-5 * theirs_t.abs().max()
    finally:
        reference.unload_lora_weights()
    assert (theirs_u - base).abs().max() > 0.05 * base.abs().max()  # the LoRA does something


def test_lcm_lora_four_steps_equal_diffusers(m, reference, tmp_path):
    """The LCM-LoRA recipe end to end: a UNet-only LoRA on every Linear and Conv2d (as lcm-lora-sdv1-5 is), the
    lcm sampler, 4 steps, guidance 1 (no unconditional pass), against diffusers' pipeline with LCMScheduler and
    load_lora_weights on the same random file and seed. Float32; tolerance as in test_pipeline.py."""
    from reference_models import diffusers_scheduler

    tensors = {k: v for k, v in kohya_lora(m, kinds=None, seed=12, alpha=4.0).items() if k.startswith("lora_unet_")}
    path = write(tensors, tmp_path / "lcm.safetensors")
    kwargs = dict(width=64, height=64, output_type="np")
    with m.load_lora(path, 1.0):
        ours = m.generate("a cat", sampler="lcm", steps=4, guidance_scale=1.0, seed=21, **kwargs)
    plain = m.generate("a cat", sampler="lcm", steps=4, guidance_scale=1.0, seed=21, **kwargs)
    reference.scheduler = diffusers_scheduler("lcm")
    reference.load_lora_weights(str(path), adapter_name="lcm")
    try:
        theirs = reference("a cat", num_inference_steps=4, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(21), **kwargs).images  # fmt: skip
    finally:
        reference.unload_lora_weights()
        reference.scheduler = diffusers_scheduler("pndm")
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(ours - plain).max() > 1e-2  # the LoRA changed the image


# --------------------------------------------------------------------------------------------------
# Prompts, PNG, CLI


def test_prompt_tag_applies_the_lora_for_the_call_and_is_recorded(m, tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    path = write(kohya_lora(m, seed=10), folder / "film.safetensors")
    m.lora_dirs = [folder]
    kwargs = dict(steps=2, seed=5, width=64, height=64)
    before = weights(m)
    tagged = m.generate("a cat <lora:film:0.7>", **kwargs)[0]
    assert all(torch.equal(before[k], v) for k, v in weights(m).items())  # taken off after the call
    plain = m.generate("a cat ", **kwargs)[0]
    assert tagged.tobytes() != plain.tobytes()
    with m.load_lora(path, 0.7):
        loaded = m.generate("a cat ", **kwargs)[0]
        assert m.loras and m.loras[0].tag == "<lora:film:0.7>"
        both = m.generate("a cat <lora:film:0.7>", **kwargs)[0]  # not applied twice
        with pytest.raises(ValueError, match="different scale"):
            m.generate("a cat <lora:film:0.5>", **kwargs)
    assert not m.loras
    assert np.array_equal(np.asarray(tagged), np.asarray(loaded)) and np.array_equal(np.asarray(tagged), np.asarray(both))

    addnet = L.lora_file_hash(path)
    assert len(addnet) == 12
    for image in (tagged, loaded):
        s = image.info["sd15"]
        assert s.prompt.rstrip() == "a cat <lora:film:0.7>" and s.lora_hashes == {"film": addnet}
        text = format_parameters(s)
        assert text.startswith("a cat <lora:film:0.7>\n") and f'Lora hashes: "film: {addnet}"' in text
        assert parse_parameters(text)["lora_hashes"] == {"film": addnet}
    with pytest.raises(ValueError, match="'missing' named in the prompt is not in"):
        m.generate("a cat <lora:missing:1>", **kwargs)
    with pytest.raises(ValueError, match="different LoRAs"):
        m.generate(["a <lora:film:1>", "b"], **kwargs)
    m.lora_dirs = [L.DEFAULT_LORA_DIR]


def test_one_file_is_applied_once_whatever_the_case_of_its_name(m, tmp_path):
    """find_lora finds Ink.safetensors for <lora:ink:…> too, so `--lora Ink.safetensors` with `<lora:ink:…>`,
    or <lora:Ink:…> with <lora:ink:…>, is one LoRA: applied once, recorded once, refused at two scales."""
    folder = tmp_path / "lora"
    folder.mkdir()
    path = write(kohya_lora(m, seed=15), folder / "Ink.safetensors")
    m.lora_dirs = [folder]
    try:
        with L.apply_lora(m, path, 0.5):
            once = weights(m)
        with L.prompt_loras(m, ["a cat <lora:Ink:0.5> <lora:ink:0.5>"]) as applied:
            assert len(applied) == 1 and all(torch.equal(once[k], v) for k, v in weights(m).items())
        with pytest.raises(ValueError, match="'ink' is named twice with different scales"), L.prompt_loras(m, ["<lora:Ink:0.5> <lora:ink:0.7>"]):
            pass
        with m.load_lora(path, 0.5):  # named Ink
            with L.prompt_loras(m, ["a cat <lora:ink:0.5>"]) as applied:
                assert applied == [] and all(torch.equal(once[k], v) for k, v in weights(m).items())
            assert L.recorded_prompt(m, "a cat <lora:ink:0.5>") == "a cat <lora:ink:0.5>"  # not <lora:Ink:0.5> as well
            assert L.lora_hashes(m, "a cat <lora:ink:0.5>") == {"ink": L.lora_file_hash(path)}
            with pytest.raises(ValueError, match="different scale"), L.prompt_loras(m, ["a cat <lora:INK:0.7>"]):
                pass
            with pytest.raises(ValueError, match="already loaded, as the LoRA 'Ink'"):
                m.load_lora(path, 0.5, name="another name")
        elsewhere = write(kohya_lora(m, seed=16), tmp_path / "Paper.safetensors")  # loaded, and no paper.* in the folder
        with m.load_lora(elsewhere, 0.5):
            with L.prompt_loras(m, ["a cat <lora:paper:0.5>"]) as applied:
                assert applied == []
            assert L.recorded_prompt(m, "a cat <lora:paper:0.5>") == "a cat <lora:paper:0.5>"
    finally:
        m.lora_dirs = [L.DEFAULT_LORA_DIR]
    assert not m.loras


def test_a_lora_name_that_no_prompt_tag_can_hold_is_refused(m, tmp_path):
    """<lora:v2:final:0.5> is the LoRA "v2" at scale "final" to the web UI and to --from-png: a LoRA whose
    name has a ':' would be recorded in a PNG that cannot be rerun, so load_lora refuses it and asks for
    another name. apply_lora records nothing, and takes the file as it is."""
    path = write(kohya_lora(m, seed=16), tmp_path / "v2:final.safetensors")
    for name in (None, "v2 <final>", " v2"):
        with pytest.raises(ValueError, match=r"the LoRA name .* has ':', '<', '>' or spaces at its ends.*rename the file"):
            m.load_lora(path, 0.5, name=name)
    with pytest.raises(ValueError, match="rename the file, say to v2_final.safetensors"):
        m.load_lora(path, 0.5)
    assert not m.loras
    with m.load_lora(path, 0.5, name="v2 final") as applied:
        assert applied.tag == "<lora:v2 final:0.5>"
    L.apply_lora(m, path, 0.5).remove()


def test_lora_hash_of_a_safetensors_file_whatever_the_case_of_its_suffix(m, tmp_path):
    """The web UI hashes Style.SAFETENSORS as a safetensors file (its suffix lower-cased): the tensor data
    after the header, the "addnet" hash."""
    path = write(kohya_lora(m, seed=17), tmp_path / "Style.safetensors")
    upper = tmp_path / "upper" / "Style.SAFETENSORS"
    upper.parent.mkdir()
    upper.write_bytes(path.read_bytes())
    data = path.read_bytes()
    addnet = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0] :]).hexdigest()[:12]
    assert L.lora_file_hash(path) == L.lora_file_hash(upper) == addnet


def test_cli_lora_and_embedding_flags_and_rerun_from_png(tiny_checkpoint, m, tmp_path, monkeypatch, capsys):
    from sd15.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "weights" / "lora").mkdir(parents=True)
    write(kohya_lora(m, seed=11), tmp_path / "weights" / "lora" / "ink.safetensors")
    elsewhere = write(kohya_lora(m, seed=12, kinds=None), tmp_path / "paper style.safetensors")
    write({"emb_params": torch.randn(2, 48, generator=torch.Generator().manual_seed(0))}, tmp_path / "shiny.safetensors")
    common = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "9", "--model", str(tiny_checkpoint), "--no-progress"]
    assert main(["generate", "a (shiny:1.2) boat <lora:ink:0.6>", "--lora", f"{elsewhere}:0.5", "--clip-skip", "2",
                 "--embedding", "shiny.safetensors", *common, "-o", "first.png"]) == 0  # fmt: skip
    text = read_parameters(tmp_path / "first.png")
    prompt, settings = text.split("\n")
    assert prompt == "a (shiny:1.2) boat <lora:ink:0.6> <lora:paper style:0.5>"
    assert "Clip skip: 2" in settings and 'TI hashes: "shiny: ' in settings
    assert re.search(r'Lora hashes: "paper style: [0-9a-f]{12}, ink: [0-9a-f]{12}"', settings)

    # the PNG alone (with the LoRA files in a folder and the embedding given) reproduces the image
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "paper style.safetensors").write_bytes(elsewhere.read_bytes())
    (tmp_path / "loras" / "ink.safetensors").write_bytes((tmp_path / "weights" / "lora" / "ink.safetensors").read_bytes())
    assert main(["generate", "--from-png", "first.png", "--lora-dir", "loras", "--embedding", "shiny.safetensors",
                 "--model", str(tiny_checkpoint), "--no-progress", "-o", "again.png"]) == 0  # fmt: skip
    first, again = (np.asarray(Image.open(tmp_path / f)) for f in ("first.png", "again.png"))
    assert np.array_equal(first, again)
    assert main(["generate", "a boat", "--lora", "nothere.safetensors:0.5", *common]) == 2
    (tmp_path / "v2:final.safetensors").write_bytes(elsewhere.read_bytes())  # a name no <lora:…> tag can hold
    assert main(["generate", "a boat", "--lora", "v2:final.safetensors:0.5", *common, "-o", "colon.png"]) == 2
    assert "rename the file" in capsys.readouterr().err and not (tmp_path / "colon.png").exists()


# --------------------------------------------------------------------------------------------------
# diffusers files: PEFT names (save_lora_weights), the training scripts' names, attention processors

ATTENTION = re.compile(r"(to_[qkv]|to_out\.0|[qkv]_proj|out_proj)$")


def peft_tensors(reference, seed, attention_only=False, rank_of=lambda path: 4):
    """Random LoRA matrices in PEFT's names ({module path}.lora_A/.lora_B.weight) for the Linear and Conv2d
    modules of diffusers' own UNet and transformers' own CLIP (so no sd15 name rule is involved):
    ({UNet key: tensor}, {text-encoder key: tensor})."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for model in (reference.unet, reference.text_encoder):
        tensors = {}
        for path, module in model.named_modules():
            if type(module) not in (torch.nn.Linear, torch.nn.Conv2d) or (attention_only and not ATTENTION.search(path)):
                continue
            rank, (out_f, in_f, *kernel) = rank_of(path), module.weight.shape
            tensors[f"{path}.lora_A.weight"] = torch.randn(rank, in_f, *kernel, generator=g) / math.sqrt(in_f * math.prod(kernel))
            tensors[f"{path}.lora_B.weight"] = torch.randn(out_f, rank, *([1, 1] if kernel else []), generator=g) * 0.3
        out.append(tensors)
    return out


def as_attention_processors(tensors, component):
    """PEFT names -> the attention processors' (`attn1.processor.to_q_lora.down.weight`; CLIP's
    `self_attn.to_q_lora.down.weight` under `text_model.`), as diffusers' DIFFUSERS_OLD key rules read them."""
    renamed = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.*)\.(to_[qkv]|to_out\.0|[qkv]_proj|out_proj)\.lora_([AB])\.weight", key)
        projection = {"to_out.0": "to_out", "out_proj": "to_out"}.get(m[2], "to_" + m[2][0] if m[2].endswith("proj") else m[2])
        processor = ".processor" if component == "unet" else ""
        path = m[1] if component == "unet" or m[1].startswith("text_model.") else "text_model." + m[1]
        renamed[f"{path}{processor}.{projection}_lora.{'down' if m[3] == 'A' else 'up'}.weight"] = value
    return renamed


def diffusers_file(case, reference, folder) -> tuple[Path, float]:
    """A random LoRA file written as diffusers writes it, and the scale to test it at."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    if case == "peft-metadata":  # every layer; ranks 4 and 2; lora_alpha, alpha_pattern; rsLoRA in CLIP
        unet, te = peft_tensors(reference, 20, rank_of=lambda p: 2 if p.endswith("attn2.to_k") else 4)
        unet_config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"attn2.to_k": 2}, target_modules=sorted({k.rsplit(".lora_", 1)[0] for k in unet}),
                                 alpha_pattern={"to_v": 3, "^down_blocks.0.resnets.0.conv1": 5})  # fmt: skip
        te_config = LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet, text_encoder_lora_layers=te,
                                                  unet_lora_adapter_metadata=unet_config.to_dict(),
                                                  text_encoder_lora_adapter_metadata=te_config.to_dict())  # fmt: skip
        return folder / "pytorch_lora_weights.safetensors", 0.7
    if case == "training-script-names":  # train_text_to_image_lora.py: convert_state_dict_to_diffusers, no metadata
        unet, te = peft_tensors(reference, 21, attention_only=True, rank_of=lambda p: 2 if "attn1" in p else 4)
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(unet),
                                                  text_encoder_lora_layers=convert_state_dict_to_diffusers(te))  # fmt: skip
        return folder / "pytorch_lora_weights.safetensors", 1.0
    unet, te = peft_tensors(reference, 22, attention_only=True)
    if case == "attention-processors":
        tensors = {**{f"unet.{k}": v for k, v in as_attention_processors(unet, "unet").items()},
                   **{f"text_encoder.{k}": v for k, v in as_attention_processors(te, "text_encoder").items()}}  # fmt: skip
        return write(tensors, folder / "processors.safetensors"), 0.5
    torch.save(as_attention_processors(unet, "unet"), folder / "pytorch_lora_weights.bin")  # the oldest: UNet alone, no prefix
    return folder / "pytorch_lora_weights.bin", 0.8


DIFFUSERS_CASES = ["peft-metadata", "training-script-names", "attention-processors", "unet-only-no-prefix"]


@pytest.mark.parametrize("case", DIFFUSERS_CASES)
def test_diffusers_files_give_the_same_outputs_as_diffusers(m, reference, tmp_path, case):
    """Random LoRAs in each form diffusers writes, through diffusers 0.42.1 (`load_lora_weights`; the UNet-only
    file without prefix through `unet.load_lora_adapter(prefix=None)`, as the pipeline no longer reads it) and
    through sd15: the same UNet and text-encoder outputs, to 1e-5 of the output's scale (float32 throughout;
    diffusers adds B(A(x)) on the fly, sd15 merges W + BA, so only rounding differs). For the file with
    metadata, sd15's on-the-fly mode too."""
    from safetensors.torch import load_file

    path, scale = diffusers_file(case, reference, tmp_path)
    lora = L.read_lora(path)
    assert lora.format == "diffusers" and not lora.unsupported
    g = torch.Generator().manual_seed(2)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 48, generator=g), torch.tensor([300])
    ids = m.tokenizer(["a photo of a cat"])
    try:
        if case == "unet-only-no-prefix":
            reference.unet.load_lora_adapter(torch.load(path, weights_only=True), prefix=None, adapter_name="d")
            reference.unet.set_adapters(["d"], weights=[scale])
        else:
            reference.load_lora_weights(load_file(str(path)) if path.suffix == ".bin" else str(path), adapter_name="d")
            reference.set_adapters(["d"], adapter_weights=[scale])
        with torch.no_grad():
            base_u = m.unet(x, t, ctx)
            theirs_u, theirs_t = reference.unet(x, t, ctx).sample, reference.text_encoder(ids).last_hidden_state
            for merge in (True, False) if case == "peft-metadata" else (True,):
                with L.apply_lora(m, lora, scale, merge=merge):
                    ours_u, ours_t = m.unet(x, t, ctx), m.text_encoder(ids)
                assert (ours_u - theirs_u).abs().max() < 1e-5 * theirs_u.abs().max(), merge
                assert (ours_t - theirs_t).abs().max() < 1e-5 * theirs_t.abs().max(), merge
            assert (ours_u - base_u).abs().max() > 0.05 * base_u.abs().max()  # the LoRA does something
            assert (ours_t - m.text_encoder(ids)).abs().max() > 0.05 * ours_t.abs().max() or case == "unet-only-no-prefix"
    finally:
        reference.unload_lora_weights()


def test_diffusers_alpha_rules(m, reference, tmp_path):
    """alpha of a diffusers file: metadata lora_alpha / alpha_pattern (PEFT's suffix match, `^` anchoring),
    rsLoRA's alpha / sqrt(rank), alpha = rank without metadata, and a kohya-style `.alpha` key over all."""
    path, _ = diffusers_file("peft-metadata", reference, tmp_path)
    lora = L.read_lora(path)
    multipliers = {name: layer.multiplier for name, layer in lora.layers.items()}
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    assert multipliers[f"{block}.attn1.to_q"] == 8 / 4
    assert multipliers[f"{block}.attn2.to_k"] == 8 / 2  # rank 2 by rank_pattern, lora_alpha 8
    assert multipliers[f"{block}.attn1.to_v"] == multipliers[f"{block}.attn2.to_v"] == 3 / 4
    assert multipliers["unet.down_blocks.0.resnets.0.conv1"] == 5 / 4 and multipliers["unet.up_blocks.1.resnets.0.conv1"] == 2
    assert multipliers["text_encoder.encoder.layers.0.mlp.fc1"] == pytest.approx(2 / math.sqrt(4))

    unet, te = peft_tensors(reference, 23, attention_only=True)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in te.items()}, f"unet.{name}.alpha": torch.tensor(1.0)}
    lora = L.read_lora(write(tensors, tmp_path / "alpha-keys.safetensors"))
    assert lora.layers[f"unet.{name}"].multiplier == 1 / 4
    assert all(layer.multiplier == 1 for entry, layer in lora.layers.items() if entry != f"unet.{name}")
    module = m.unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k
    before = module.weight.clone()
    with L.apply_lora(m, lora, 0.6):
        up, down = tensors[f"unet.{name}.lora_B.weight"], tensors[f"unet.{name}.lora_A.weight"]
        assert torch.allclose(module.weight, before + 0.6 * (1 / 4) * up @ down, rtol=1e-6, atol=1e-7)
    assert torch.equal(module.weight, before)


def test_diffusers_and_kohya_files_stack_and_unmerge_bit_exactly(m, reference, tmp_path):
    before = weights(m)
    path, _ = diffusers_file("peft-metadata", reference, tmp_path)
    first = L.apply_lora(m, path, 0.7)
    second = L.apply_lora(m, write(kohya_lora(m, seed=24), tmp_path / "k.safetensors"), -0.5, merge=False)
    assert sum(not torch.equal(before[k], v) for k, v in weights(m).items()) > 50
    first.remove()
    second.remove()
    assert all(torch.equal(before[k], v) for k, v in weights(m).items())


def test_prompt_tag_and_png_hashes_with_a_diffusers_file(m, reference, tmp_path):
    """`<lora:name:0.5>` applies a diffusers file as `apply_lora(…, 0.5)` does, takes it off afterwards, and the
    PNG's "Lora hashes" gives its addnet hash."""
    folder = tmp_path / "lora"
    folder.mkdir()
    path, _ = diffusers_file("attention-processors", reference, folder)
    path = path.rename(folder / "hub style.safetensors")
    m.lora_dirs = [folder]
    before = weights(m)
    try:
        with L.apply_lora(m, path, 0.5):
            expected = weights(m)
        with L.prompt_loras(m, ["a cat <lora:hub style:0.5>"]) as applied:
            assert applied[0].lora.format == "diffusers"
            assert all(torch.equal(expected[k], v) for k, v in weights(m).items())
        assert all(torch.equal(before[k], v) for k, v in weights(m).items())
        image = m.generate("a cat <lora:hub style:0.5>", steps=1, seed=3, width=64, height=64)[0]
        assert all(torch.equal(before[k], v) for k, v in weights(m).items())
    finally:
        m.lora_dirs = [L.DEFAULT_LORA_DIR]
    s = image.info["sd15"]
    assert s.lora_hashes == {"hub style": L.lora_file_hash(path)}
    assert f'Lora hashes: "hub style: {L.lora_file_hash(path)}"' in format_parameters(s)


CONV_IN = {"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(32, 4, 1, 1)}
NOT_SD1_LORAS = {  # name: (the file's tensors, what the refusal says it holds)
    "full-checkpoint": ("checkpoint", "full model checkpoint"),
    "diffusers-unet": ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 3)}, "diffusers model's weights"),
    "lokr": ({"unet.down_blocks.0.resnets.0.conv1.lokr_w1": torch.zeros(4, 4)}, "LyCORIS LoHa/LoKr"),
    "sdxl-diffusers": ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048),
                        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(640, 4),
                        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 1280)}, "SDXL LoRA"),
    "sdxl-kohya": ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768)}, "SDXL LoRA"),
    "dora": ({**CONV_IN, "unet.conv_in.lora_magnitude_vector": torch.ones(32)}, "DoRA"),
    "kohya-dora": ({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1),
                    "lora_unet_conv_in.alpha": torch.tensor(4.0), "lora_unet_conv_in.dora_scale": torch.ones(1, 4, 1, 1)}, "a DoRA \\(dora_scale\\)"),
    "bias": ({**CONV_IN, "unet.conv_in.lora_B.bias": torch.ones(32)}, "bias terms"),
    "mixed": ({**CONV_IN, "lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}, "mixes kohya"),
    "twice": ({**CONV_IN, "unet.conv_in.lora.down.weight": torch.zeros(4, 4, 3, 3)}, "same matrix of one layer"),
    "half": ({"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3)}, "no complete adapter layer"),
    "unknown": ({"something.else": torch.zeros(2)}, "keys such as something.else"),
}  # fmt: skip


@pytest.mark.parametrize("tensors, message", NOT_SD1_LORAS.values(), ids=NOT_SD1_LORAS.keys())
def test_files_that_are_no_sd1_lora_are_refused_by_what_they_hold(m, tiny_checkpoint, tmp_path, tensors, message):
    path = tiny_checkpoint if tensors == "checkpoint" else write(tensors, tmp_path / "x.safetensors")
    before = weights(m)
    with pytest.raises(CheckpointError, match=message):
        m.load_lora(path)
    assert not m.loras and all(torch.equal(before[k], v) for k, v in weights(m).items())


@pytest.mark.parametrize("pattern", ["(a|a)+$", "conv_in|.*", "to_q["])
def test_alpha_patterns_other_than_module_paths_are_refused_unrun(m, tmp_path, pattern):
    """A file's alpha_pattern keys are module paths as diffusers writes them; a crafted regular expression (this
    first one takes exponential time on a long name) is refused before it is matched against anything."""
    import json

    config = {"unet.lora_alpha": 8, "unet.alpha_pattern": {pattern: 1}}
    path = tmp_path / "crafted.safetensors"
    save_file(CONV_IN, str(path), metadata={L.PEFT_METADATA_KEY: json.dumps(config)})
    with pytest.raises(CheckpointError, match="is not a module path"):
        m.load_lora(path)
    assert not m.loras
