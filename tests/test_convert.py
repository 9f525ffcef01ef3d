"""Checkpoint conversions, merges, inspect and diff on tiny checkpoints: exactness, interoperability with
diffusers 0.42.1 / transformers 5.17.0, and every refusal. The full-size round trip and its memory use are
in test_convert_full.py."""

import hashlib
import json
import os
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_models import (
    SD15_SCHEDULER_CONFIG,
    diffusers_unet,
    diffusers_unet_config,
    diffusers_vae,
    diffusers_vae_config,
    transformers_clip,
)
from safetensors.torch import load_file, save_file

import sd15
from sd15 import convert as convert_module
from sd15 import streaming
from sd15 import keymap
from sd15.checkpoint import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    ema_key,
)
from sd15.cli import main
from sd15.random_weights import SIZES, random_checkpoint, save_checkpoint

REFERENCE_KEYS = Path(__file__).parent / "data" / "checkpoint-keys"  # read off real checkpoints (see its README)
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407] + [49407] * 65


def sd15_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def file_state(path: Path) -> tuple:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def assert_only(folder: Path, names: set[str]) -> None:
    """Nothing but `names` in the folder: no partial output left behind."""
    assert {p.name for p in folder.iterdir()} == names


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint (with EMA and schedule buffers) converted to a diffusers folder."""
    folder = tmp_path_factory.mktemp("export") / "tiny-diffusers"
    convert_module.convert(tiny_checkpoint, folder, progress=False)
    return folder


# --------------------------------------------------------------------------------------------------
# Key rules


def _marked(configs, inpainting=False) -> dict[str, torch.Tensor]:
    """An original-layout state dict whose every tensor holds its own index (expanded, so no memory)."""
    from sd15.unet import UNet, UNetConfig
    from sd15.vae import AutoencoderKL

    unet_config = UNetConfig(**{**configs["unet"].__dict__, "in_channels": 9 if inpainting else 4})
    with torch.device("meta"):
        modules = ((UNET_PREFIX, UNet(unet_config)), (VAE_PREFIX, AutoencoderKL(configs["vae"])))
    sd = {}
    for prefix, module in modules:
        for k, v in module.state_dict().items():
            sd[prefix + k] = torch.full((1,) * v.dim(), float(len(sd))).expand(v.shape)
    return sd, unet_config


@pytest.mark.parametrize("size, inpainting", [("full", False), ("tiny", False), ("tiny", True)])
def test_key_rules_agree_with_diffusers_converter(size, inpainting):
    """Our prefix/index rules send every tensor where diffusers' own converter does, and back."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sd, unet_config = _marked(SIZES[size], inpainting)
    parts = keymap.split_original(sd)
    for component, reference in (
        ("unet", convert_ldm_unet_checkpoint(sd, diffusers_unet_config(unet_config))),
        ("vae", convert_ldm_vae_checkpoint(sd, diffusers_vae_config(SIZES[size]["vae"]))),
    ):
        names = keymap.to_diffusers(component, parts[component])
        ours = {names[k]: sd[fk].flatten()[0].item() for k, fk in parts[component].items()}
        assert ours == {k: v.flatten()[0].item() for k, v in reference.items()}
        assert keymap.from_diffusers(component, names.values()) == {d: k for k, d in names.items()}
        if component == "vae":  # the only reshaped tensors: the mid-block attention's 1×1 convs
            reshaped = {k for k, v in reference.items() if v.dim() == 2}
            assert reshaped == {k for k in reference if keymap.is_vae_attention_weight(k)} and len(reshaped) == 8


def test_key_rules_cover_real_checkpoint_keys():
    """Every key of the real SD1.5 and inpainting files (toolkit key lists) fits a rule, one to one."""
    for name, component, count in (("UNET-v1-SD.txt", "unet", 686), ("UNET-v1-Inpainting.txt", "unet", 686),
                                   ("VAE-v1-SD.txt", "vae", 248)):  # fmt: skip
        keys = [line.rsplit(" ", 1)[0] for line in (REFERENCE_KEYS / name).read_text().splitlines()]
        names = keymap.to_diffusers(component, keys)
        assert len(names) == len(set(names.values())) == count
        assert keymap.from_diffusers(component, names.values()) == {d: k for k, d in names.items()}
    clip = [line.rsplit(" ", 1)[0] for line in (REFERENCE_KEYS / "CLIP-v1-SD.txt").read_text().splitlines()]
    assert set(keymap.to_diffusers("text_encoder", ["text_model." + k for k in clip]).values()) == {"text_model." + k for k in clip}
    with pytest.raises(CheckpointError, match="fit no SD1.x layout rule: input_blocks.1.0.in_layers.7.weight"):
        keymap.to_diffusers("unet", ["input_blocks.0.0.weight", "input_blocks.1.0.in_layers.7.weight"])


# --------------------------------------------------------------------------------------------------
# Original <-> diffusers


def test_round_trip_through_diffusers_is_exact(tiny_checkpoint, tiny_state_dict, exported, tmp_path):
    before = file_state(tiny_checkpoint)
    back = tmp_path / "back.safetensors"
    convert_module.convert(exported, back, progress=False)
    assert file_state(tiny_checkpoint) == before  # the input is never written
    expected = {k: v for k, v in tiny_state_dict.items() if not k.startswith("model_ema.")}  # no EMA in diffusers
    assert same_tensors(load_file(back), expected)
    assert sorted(p.name for p in exported.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    vae = load_file(exported / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip_is_exact(tmp_path, dtype, monkeypatch):
    """A checkpoint cast whole to fp16 or bf16 (schedule buffers too) comes back from its diffusers folder
    bit for bit: the folder has no schedule buffers, and the rebuilt ones take the UNet's dtype.
    diffusers loads the folder in float32 throughout and runs it: the text encoder's config says "float32",
    as SD1.5's own fp16 repositories do (with the weights' dtype, transformers would load the text encoder
    in fp16 beside diffusers' fp32 UNet and VAE, and the pipeline would fail at its first step)."""
    from diffusers import StableDiffusionPipeline

    sd = random_checkpoint("tiny", seed=2, dtype=dtype)
    save_checkpoint(sd, tmp_path / "half.safetensors")
    convert_module.convert(tmp_path / "half.safetensors", tmp_path / "folder", progress=False)
    config = json.loads((tmp_path / "folder" / "text_encoder" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    image = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    convert_module.convert(tmp_path / "folder", tmp_path / "back.safetensors", progress=False)
    assert same_tensors(load_file(tmp_path / "back.safetensors"), sd)
    convert_module.convert(tmp_path / "folder", tmp_path / "fp32.safetensors", dtype=torch.float32, progress=False)
    assert load_file(tmp_path / "fp32.safetensors")["betas"].dtype == torch.float32  # an explicit dtype still rules


def test_linear_vae_attention_in_an_original_file(tiny_state_dict, tmp_path):
    """An original-layout file whose VAE attention weights are already linear [C, C] (as some converters
    leave them) exports to the same diffusers folder as the 1×1 conv form, and comes back as 1×1 convs."""
    linear = {k: v.flatten(1) if ".mid.attn_1." in k and v.dim() == 4 else v for k, v in tiny_state_dict.items()}
    assert sum(v.dim() == 2 and ".mid.attn_1." in k for k, v in linear.items()) == 8
    save_checkpoint(linear, tmp_path / "linear.safetensors")
    convert_module.convert(tmp_path / "linear.safetensors", tmp_path / "folder", progress=False)
    convert_module.convert(tmp_path / "folder", tmp_path / "back.safetensors", progress=False)
    expected = {k: v for k, v in tiny_state_dict.items() if not k.startswith("model_ema.")}
    assert same_tensors(load_file(tmp_path / "back.safetensors"), expected)


def test_linear_vae_attention_in_vae_replacement_and_merge(tiny_state_dict, tmp_path, capsys):
    """A VAE whose attention weights are linear [C, C] replaces, or merges with, one in the 1×1 conv form
    [C, C, 1, 1], both ways: the bytes are the same, and the result takes the model's (merge: A's) form."""
    from sd15.streaming import vae_items

    def linear(sd):
        return {k: v.flatten(1) if ".mid.attn_1." in k and v.dim() == 4 else v for k, v in sd.items()}

    other = random_checkpoint("tiny", seed=1)
    other_vae = {k[len(VAE_PREFIX):]: v for k, v in other.items() if k.startswith(VAE_PREFIX)}
    save_file(linear(other_vae), str(tmp_path / "vae-linear.safetensors"))
    save_file(other_vae, str(tmp_path / "vae-conv.safetensors"))
    items = vae_items(tmp_path / "vae-linear.safetensors", [])
    assert all(items[k].shape == v.shape for k, v in other_vae.items())  # read as 1×1 convs, [C, C, 1, 1]
    model_linear = save_checkpoint(linear(random_checkpoint("tiny", seed=0)), tmp_path / "model-linear.safetensors")
    model_conv = save_checkpoint(random_checkpoint("tiny", seed=0), tmp_path / "model-conv.safetensors")
    for model, vae, form in ((model_conv, "vae-linear", lambda v: v), (model_linear, "vae-conv", lambda v: v.flatten(1))):
        out = tmp_path / f"{model.stem}+{vae}.safetensors"
        code, _, err = sd15_cli(capsys, "convert", model, out, "--vae", tmp_path / f"{vae}.safetensors", "--no-progress")
        assert code == 0, err
        sd = load_file(out)
        for k, v in other_vae.items():
            want = form(v) if ".mid.attn_1." in k and v.dim() == 4 else v  # the model's own form
            assert sd[VAE_PREFIX + k].shape == want.shape and torch.equal(sd[VAE_PREFIX + k], want), k
    b = save_checkpoint(other, tmp_path / "b-conv.safetensors")
    convert_module.merge([model_linear, b], tmp_path / "merged.safetensors", alpha=0.25, progress=False)
    merged, a = load_file(tmp_path / "merged.safetensors"), load_file(model_linear)
    for k, v in other_vae.items():
        assert torch.equal(merged[VAE_PREFIX + k], torch.lerp(a[VAE_PREFIX + k], v.reshape(a[VAE_PREFIX + k].shape), 0.25)), k
    from sd15.inspect_checkpoint import diff

    same = diff(model_linear, model_conv)  # the same numbers in the two forms: no shape mismatch
    assert same["identical"] and same["parts"]["vae"]["compared"] == len(other_vae)
    assert not diff(model_linear, b)["identical"]


def test_inpainting_and_old_clip_keys_round_trip(tmp_path):
    sd = random_checkpoint("tiny", seed=4, inpainting=True, old_clip_keys=True)
    save_checkpoint(sd, tmp_path / "in.ckpt")
    convert_module.convert(tmp_path / "in.ckpt", tmp_path / "folder", progress=False)
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert json.loads((tmp_path / "folder" / "unet" / "config.json").read_text())["in_channels"] == 9
    convert_module.convert(tmp_path / "folder", tmp_path / "back.safetensors", progress=False)
    back = load_file(tmp_path / "back.safetensors")
    old = "cond_stage_model.transformer."
    renamed = {(CLIP_PREFIX + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
    assert same_tensors(back, renamed)  # the older CLIP key form comes back as the `text_model.` form


def test_sd15_loads_diffusers_folder(exported, tiny_model):
    m = sd15.load(exported)
    assert m.info.kind == "sd1"
    for name in ("unet", "vae", "text_encoder"):
        assert same_tensors(getattr(m, name).state_dict(), getattr(tiny_model, name).state_dict())


def test_tokenizer_folder_loads_offline_in_transformers(exported, monkeypatch):
    from transformers import CLIPTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = CLIPTokenizer.from_pretrained(exported / "tokenizer", local_files_only=True)
    ids = tokenizer("a photo of an astronaut riding a horse on mars", padding="max_length", max_length=77).input_ids
    assert ids == ASTRONAUT_IDS
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token_id == 49407


def test_diffusers_pipeline_loads_export_and_draws_the_same_image(exported, tiny_model, monkeypatch):
    """diffusers' StableDiffusionPipeline, loaded offline from our folder, gives sd15's image from the same
    latents. TOL 1e-4 on pixels in [0, 1], fp32: the two implementations share weights, timesteps and the
    PLMS update, and differ only in summation order (SDPA vs. explicit attention, fused ops), which the
    parity tests measure at 1e-6..1e-5 relative per network call; over 4 steps with CFG the images differ
    by about 1e-6. 1e-4 is 1/40 of an 8-bit level, while a misplaced tensor changes pixels by 1e-2 or more
    (the control below: other latents differ by far more than TOL)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.safety_checker is None
    assert {k: pipe.scheduler.config[k] for k in SD15_SCHEDULER_CONFIG if k != "_class_name"} == {
        k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "_class_name"}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    settings = dict(width=64, height=64, guidance_scale=7.5, output_type="np")
    ours = tiny_model.generate("a red cube on a table", steps=4, latents=latents, **settings)
    theirs = pipe("a red cube on a table", num_inference_steps=4, latents=latents.clone(), **settings).images
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() < 1e-4
    other = pipe("a red cube on a table", num_inference_steps=4, latents=torch.randn(1, 4, 8, 8, generator=g), **settings).images
    assert np.abs(other - theirs).max() > 1e-2 and theirs.std() > 1e-2


@pytest.mark.parametrize("text_model_prefix", [True, False])
def test_sd15_loads_folder_saved_by_diffusers(tiny_state_dict, tiny_model, tmp_path, text_model_prefix):
    """A folder written by diffusers' save_pretrained from models built by diffusers' and transformers' own
    converters (independent of sd15's rules) loads in sd15 with exactly the original weights."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    data = Path(sd15.__file__).parent / "data"
    text_encoder = transformers_clip(tiny_state_dict, tiny_model.text_encoder.config)
    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(tiny_state_dict, tiny_model.vae.config),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(str(data / "clip_vocab.json"), str(data / "clip_merges.txt")),
        unet=diffusers_unet(tiny_state_dict, tiny_model.unet.config),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "saved")
    weights = tmp_path / "saved" / "text_encoder" / "model.safetensors"
    te = load_file(weights)
    assert not any(k.endswith("position_ids") for k in te)  # transformers does not save it; sd15 rebuilds it
    # Both key forms: `text_model.…` (the Hub's SD1.5) and bare (what transformers 5 writes for a fresh model).
    te = {("text_model." if text_model_prefix else "") + k.removeprefix("text_model."): v for k, v in te.items()}
    save_file(te, str(weights), metadata={"format": "pt"})
    m = sd15.load(tmp_path / "saved")
    for name in ("unet", "vae", "text_encoder"):
        assert same_tensors(getattr(m, name).state_dict(), getattr(tiny_model, name).state_dict())


# --------------------------------------------------------------------------------------------------
# Single-file conversions (through the command line)


def test_ckpt_to_safetensors_and_dtypes(tiny_state_dict, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_state_dict, tmp_path / "tiny.ckpt")
    code, out, _ = sd15_cli(capsys, "convert", ckpt, tmp_path / "same.safetensors", "--no-progress")
    assert code == 0 and "verified" in out
    assert same_tensors(load_file(tmp_path / "same.safetensors"), tiny_state_dict)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out_path = tmp_path / f"{name}.safetensors"
        assert sd15_cli(capsys, "convert", ckpt, out_path, "--dtype", name, "--no-progress")[0] == 0
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_state_dict.items()}
        assert same_tensors(load_file(out_path), cast)  # integer tensors (position_ids, num_updates) keep theirs
    assert out_path.stat().st_size < 0.6 * (tmp_path / "same.safetensors").stat().st_size


def test_ema_extraction_and_pruning(tiny_checkpoint, tiny_state_dict, tmp_path, capsys):
    out = tmp_path / "ema.safetensors"
    code, _, err = sd15_cli(capsys, "convert", tiny_checkpoint, out, "--ema", "--prune", "--no-progress")
    assert code == 0 and "EMA" in err and "schedule buffers" in err
    sd = load_file(out)
    assert not any(k.startswith("model_ema.") for k in sd) and "betas" not in sd
    unet_keys = [k for k in tiny_state_dict if k.startswith(UNET_PREFIX)]
    assert all(torch.equal(sd[k], tiny_state_dict[ema_key(k[len(UNET_PREFIX):])]) for k in unet_keys)
    assert all(torch.equal(sd[k], tiny_state_dict[k]) for k in sd if not k.startswith(UNET_PREFIX))
    assert same_tensors(sd15.load(out).unet.state_dict(), sd15.load(tiny_checkpoint, ema=True).unet.state_dict())
    pruned = tmp_path / "pruned.safetensors"
    assert sd15_cli(capsys, "convert", tiny_checkpoint, pruned, "--prune", "--no-progress")[0] == 0
    assert same_tensors(load_file(pruned), {k: v for k, v in tiny_state_dict.items() if k.startswith(("model.", "first_stage", "cond_stage"))})
    code, _, err = sd15_cli(capsys, "convert", pruned, tmp_path / "x.safetensors", "--ema")
    assert code == 2 and "no EMA weights" in err and not (tmp_path / "x.safetensors").exists()


def test_component_extraction(tiny_checkpoint, tiny_state_dict, tmp_path, capsys):
    from sd15.inspect_checkpoint import inspect

    for component, prefix, kind in (("vae", VAE_PREFIX, "vae"), ("unet", UNET_PREFIX, "unet-only"),
                                    ("text_encoder", "cond_stage_model.transformer.", "text_encoder-only")):  # fmt: skip
        out = tmp_path / f"{component}.safetensors"
        assert sd15_cli(capsys, "convert", tiny_checkpoint, out, "--component", component, "--no-progress")[0] == 0
        assert same_tensors(load_file(out), {k[len(prefix):]: v for k, v in tiny_state_dict.items() if k.startswith(prefix)})
        assert inspect(out, with_hash=False)["kind"] == kind
    for component, prefix in (("vae", VAE_PREFIX), ("unet", UNET_PREFIX), ("text_encoder", "cond_stage_model.transformer.")):
        folder = tmp_path / f"{component}-folder"
        assert sd15_cli(capsys, "convert", tiny_checkpoint, folder, "--component", component, "--no-progress")[0] == 0
        # and back: a component folder becomes a file in the original layout, as --component writes it
        back = tmp_path / f"{component}-back.safetensors"
        assert sd15_cli(capsys, "convert", folder, back, "--no-progress")[0] == 0
        assert same_tensors(load_file(back), {k[len(prefix):]: v for k, v in tiny_state_dict.items() if k.startswith(prefix)})
    assert json.loads((tmp_path / "vae-folder" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    (tmp_path / "vae-folder" / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    code, _, err = sd15_cli(capsys, "convert", tmp_path / "vae-folder", tmp_path / "cn.safetensors")
    assert code == 2 and "ControlNetModel" in err and not (tmp_path / "cn.safetensors").exists()


def test_vae_replacement(tiny_checkpoint, tiny_state_dict, tmp_path, capsys):
    other = random_checkpoint("tiny", seed=1)
    other_vae = {k[len(VAE_PREFIX):]: v for k, v in other.items() if k.startswith(VAE_PREFIX)}
    save_file(other_vae, str(tmp_path / "vae.safetensors"))  # bare keys, as VAE files ship
    torch.save({"state_dict": {**{VAE_PREFIX + k: v for k, v in other_vae.items()},  # prefixed, with training extras
                               "loss.discriminator.main.0.weight": torch.zeros(3)}}, tmp_path / "vae.ckpt")  # fmt: skip
    save_checkpoint(other, tmp_path / "other.safetensors")
    convert_module.convert(tmp_path / "other.safetensors", tmp_path / "vae-diffusers", component="vae", progress=False)
    for i, source in enumerate(("vae.safetensors", "vae.ckpt", "vae-diffusers", "other.safetensors")):
        out = tmp_path / f"replaced{i}.safetensors"
        code, _, err = sd15_cli(capsys, "convert", tiny_checkpoint, out, "--vae", tmp_path / source, "--no-progress")
        assert code == 0, err
        sd = load_file(out)
        assert all(torch.equal(sd[VAE_PREFIX + k], v) for k, v in other_vae.items())
        assert all(torch.equal(sd[k], v) for k, v in tiny_state_dict.items() if not k.startswith(VAE_PREFIX))
        assert ("training-only" in err) == (source == "vae.ckpt")
    bad = dict(other_vae)
    bad["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    del bad["encoder.conv_in.bias"]
    save_file(bad, str(tmp_path / "bad-vae.safetensors"))
    code, _, err = sd15_cli(capsys, "convert", tiny_checkpoint, tmp_path / "y.safetensors", "--vae", tmp_path / "bad-vae.safetensors")
    assert code == 2 and "encoder.conv_in.bias" in err and "decoder.conv_out.weight: file [3, 16, 3, 3]" in err
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(tmp_path / "lora.safetensors"))
    code, _, err = sd15_cli(capsys, "convert", tiny_checkpoint, tmp_path / "y.safetensors", "--vae", tmp_path / "lora.safetensors")
    assert code == 2 and "LoRA" in err and "not a VAE" in err
    assert not (tmp_path / "y.safetensors").exists()


def test_incomplete_model_is_refused_before_anything_is_written(tiny_state_dict, exported, tmp_path, capsys):
    """Every component a conversion writes is checked against its architecture (built on the meta device from
    its shapes): a file or folder missing a tensor, or holding an extra or mis-shaped one, is refused by name.
    (Before, such a file became a diffusers folder that diffusers loads with the tensor left uninitialised.)"""
    sd = {k: v for k, v in tiny_state_dict.items() if k not in (UNET_PREFIX + "out.2.bias", VAE_PREFIX + "decoder.conv_in.bias")}
    sd[CLIP_PREFIX + "final_layer_norm.weight"] = torch.zeros(7)
    save_file(sd, str(tmp_path / "cut.safetensors"))
    for out, args in (("folder", []), ("pruned.safetensors", ["--prune"]), ("ema.safetensors", ["--ema"]),
                      ("unet", ["--component", "unet"])):  # fmt: skip
        code, _, err = sd15_cli(capsys, "convert", tmp_path / "cut.safetensors", tmp_path / out, *args)
        assert code == 2 and "The UNet (" in err and "1 missing:\n    out.2.bias" in err and "Nothing was written" in err, err
        if not args:  # every component's problems in one message
            assert "decoder.conv_in.bias" in err and "final_layer_norm.weight: file [7], model [48]" in err
    code, _, err = sd15_cli(capsys, "convert", tmp_path / "cut.safetensors", tmp_path / "vae.safetensors", "--component", "vae")
    assert code == 2 and "decoder.conv_in.bias" in err and "out.2.bias" not in err  # only the component written is checked
    # a diffusers folder missing a tensor (or with one too many) -> a single file
    folder = Path(shutil.copytree(exported, tmp_path / "cut-folder"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(weights)
    del unet["conv_out.bias"]
    unet["conv_out.extra"] = torch.zeros(1)
    save_file(unet, str(weights))
    code, _, err = sd15_cli(capsys, "convert", folder, tmp_path / "back.safetensors")
    assert code == 2 and "out.2.bias" in err and "1 unexpected:\n    out.2.extra" in err
    code, _, err = sd15_cli(capsys, "merge", tmp_path / "cut.safetensors", tmp_path / "cut.safetensors", "-o", tmp_path / "m.safetensors")
    assert code == 2 and "out.2.bias" in err
    save_file({k: v for k, v in tiny_state_dict.items() if not k.startswith(VAE_PREFIX)}, str(tmp_path / "novae.safetensors"))
    code, _, err = sd15_cli(capsys, "merge", tmp_path / "novae.safetensors", tmp_path / "novae.safetensors", "-o", tmp_path / "m")
    assert code == 2 and "has no vae weights" in err
    (tmp_path / "novae.safetensors").unlink()
    assert_only(tmp_path, {"cut.safetensors", "cut-folder"})
    # a plain container or dtype change still copies any file as it is
    assert sd15_cli(capsys, "convert", tmp_path / "cut.safetensors", tmp_path / "h.safetensors", "--dtype", "fp16", "--no-progress")[0] == 0


def test_fp32_bin_is_read_before_an_fp16_variant(exported, tmp_path, capsys):
    """unet/ with the fp32 diffusion_pytorch_model.bin and the fp16 variant beside it, as SD1.5's own repository
    had: the .bin is read, as diffusers reads it when no variant is asked for, and a note says so."""
    folder = Path(shutil.copytree(exported, tmp_path / "mixed"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(weights)
    weights.unlink()
    torch.save(unet, folder / "unet" / "diffusion_pytorch_model.bin")
    save_file({k: v.half() for k, v in unet.items()}, str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    code, _, err = sd15_cli(capsys, "convert", folder, tmp_path / "out.safetensors", "--no-progress")
    assert code == 0 and "note: unet/: read diffusion_pytorch_model.bin" in err and "not the fp16 variant" in err
    assert {v.dtype for k, v in load_file(tmp_path / "out.safetensors").items() if k.startswith(UNET_PREFIX)} == {torch.float32}


def test_a_component_alone_converts_to_a_component_folder(tiny_checkpoint, tmp_path, capsys):
    """A file of one component (a VAE file, a `--component` output) or a component folder converts, with
    `--component` naming it, to a diffusers component folder or file; without it, the refusal says what to add."""
    for component in ("vae", "unet"):
        assert sd15_cli(capsys, "convert", tiny_checkpoint, tmp_path / f"{component}.safetensors", "--component", component, "--no-progress")[0] == 0
        assert sd15_cli(capsys, "convert", tiny_checkpoint, tmp_path / f"{component}-ref", "--component", component, "--no-progress")[0] == 0
        code, _, err = sd15_cli(capsys, "convert", tmp_path / f"{component}.safetensors", tmp_path / f"{component}-folder")
        assert code == 2 and f"alone; to write it as a diffusers component folder (config.json and weights), add --component {component}" in err
        code, _, err = sd15_cli(capsys, "convert", tmp_path / f"{component}.safetensors", tmp_path / f"{component}-folder",
                                "--component", component, "--no-progress")  # fmt: skip
        assert code == 0, err
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            assert (tmp_path / f"{component}-folder" / name).read_bytes() == (tmp_path / f"{component}-ref" / name).read_bytes()
    code, _, err = sd15_cli(capsys, "convert", tmp_path / "unet-folder", tmp_path / "unet-fp16", "--dtype", "fp16")
    assert code == 2 and "add --component unet" in err
    code, _, err = sd15_cli(capsys, "convert", tmp_path / "unet-folder", tmp_path / "unet-fp16", "--component", "unet", "--dtype", "fp16", "--no-progress")
    assert code == 0, err
    assert {v.dtype for v in load_file(tmp_path / "unet-fp16" / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    code, _, err = sd15_cli(capsys, "convert", tmp_path / "unet-folder", tmp_path / "x.safetensors", "--component", "vae")
    assert code == 2 and "holds a UNet alone, not a VAE; pass --component unet" in err
    code, _, err = sd15_cli(capsys, "convert", tmp_path / "vae.safetensors", tmp_path / "x.safetensors", "--prune")
    assert code == 2 and "holds a VAE alone; --prune needs a whole SD1.x model" in err
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# The diffusers-style scripts


def run_script(monkeypatch, capsys, name: str, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(Path(__file__).parents[1] / "scripts" / name), run_name="__main__")
    return e.value.code, capsys.readouterr().err


def test_conversion_scripts(tiny_checkpoint, tiny_state_dict, tmp_path, monkeypatch, capsys):
    """Each script writes only the layout it is named for: an output name that `sd15 convert` would read as
    the other layout (or an input that would make it a plain copy) is refused, and --debug shows the traceback."""
    to_diffusers, to_original = "convert_original_to_diffusers.py", "convert_diffusers_to_original.py"
    folder, back = tmp_path / "folder", tmp_path / "back.safetensors"
    code, err = run_script(monkeypatch, capsys, to_diffusers, "--checkpoint_path", tiny_checkpoint, "--dump_path", back)
    assert code == 2 and "the diffusers folder to write" in err
    code, err = run_script(monkeypatch, capsys, to_original, "--model_path", tiny_checkpoint, "--checkpoint_path", back)
    assert code == 2 and "must be a diffusers folder" in err
    code, _ = run_script(monkeypatch, capsys, to_diffusers, "--checkpoint_path", tiny_checkpoint, "--dump_path", folder, "--half")
    assert code == 0
    code, err = run_script(monkeypatch, capsys, to_original, "--model_path", folder, "--checkpoint_path", tmp_path / "back")
    assert code == 2 and "must end in .safetensors" in err
    assert run_script(monkeypatch, capsys, to_original, "--model_path", folder, "--checkpoint_path", back)[0] == 0
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_state_dict.items() if not k.startswith("model_ema.")}
    assert same_tensors(load_file(back), half)
    code, err = run_script(monkeypatch, capsys, to_original, "--model_path", folder, "--checkpoint_path", back)
    assert code == 2 and "already exists" in err and "Traceback" not in err
    with pytest.raises(FileExistsError):  # --debug: the traceback instead of the one line
        run_script(monkeypatch, capsys, to_original, "--model_path", folder, "--checkpoint_path", back, "--debug")
    assert_only(tmp_path, {"folder", "back.safetensors"})


# --------------------------------------------------------------------------------------------------
# Merges


@pytest.fixture(scope="module")
def three_models(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("merge")
    return [save_checkpoint(random_checkpoint("tiny", seed=s), folder / f"m{s}.safetensors") for s in (0, 1, 2)]


def test_weighted_and_add_difference_merges(three_models, tmp_path, capsys):
    a, b, c = (load_file(p) for p in three_models)
    out = tmp_path / "ab.safetensors"
    assert sd15_cli(capsys, "merge", *three_models[:2], "-o", out, "--alpha", "0.25", "--no-progress")[0] == 0
    merged = load_file(out)
    model_keys = [k for k in a if k.startswith(("model.", "first_stage", "cond_stage"))]
    assert sorted(merged) == sorted(model_keys)  # extras (schedule buffers) are not merged
    for k in model_keys:
        want = torch.lerp(a[k], b[k], 0.25) if a[k].is_floating_point() else a[k]
        assert torch.equal(merged[k], want), k
    assert not torch.equal(merged[UNET_PREFIX + "out.2.weight"], a[UNET_PREFIX + "out.2.weight"])
    out0 = tmp_path / "a0.safetensors"
    assert sd15_cli(capsys, "merge", *three_models[:2], "-o", out0, "--alpha", "0", "--no-progress")[0] == 0
    assert same_tensors(load_file(out0), {k: a[k] for k in model_keys})  # alpha 0 gives A exactly
    out3 = tmp_path / "abc.safetensors"
    assert sd15_cli(capsys, "merge", *three_models, "-o", out3, "--alpha", "0.7", "--dtype", "fp16", "--no-progress")[0] == 0
    merged = load_file(out3)
    for k in model_keys:
        if a[k].is_floating_point():
            assert torch.equal(merged[k], (a[k] + 0.7 * (b[k] - c[k])).half()), k


def test_add_difference_into_an_inpainting_model(three_models, tmp_path):
    inpaint = save_checkpoint(random_checkpoint("tiny", seed=5, inpainting=True), tmp_path / "inpaint.safetensors")
    convert_module.merge([inpaint, three_models[1], three_models[2]], tmp_path / "out.safetensors", alpha=1.0, progress=False)
    a, b, c, out = (load_file(p) for p in (inpaint, three_models[1], three_models[2], tmp_path / "out.safetensors"))
    k = UNET_PREFIX + "input_blocks.0.0.weight"
    assert out[k].shape[1] == 9
    assert torch.equal(out[k][:, :4], a[k][:, :4] + (b[k] - c[k])) and torch.equal(out[k][:, 4:], a[k][:, 4:])
    assert sd15.load(tmp_path / "out.safetensors").info.kind == "sd1-inpainting"


def test_merge_of_mismatched_architectures_is_refused(three_models, tmp_path, capsys):
    inpaint = save_checkpoint(random_checkpoint("tiny", seed=5, inpainting=True), tmp_path / "inpaint.safetensors")
    out = tmp_path / "out.safetensors"
    code, _, err = sd15_cli(capsys, "merge", three_models[0], inpaint, "-o", out)
    assert code == 2 and "architectures differ" in err and "input_blocks.0.0.weight: [32, 4, 3, 3] vs [32, 9, 3, 3]" in err
    sd2 = dict(load_file(three_models[1]))
    sd2["cond_stage_model.model.ln_final.weight"] = torch.zeros(4)
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    code, _, err = sd15_cli(capsys, "merge", three_models[0], tmp_path / "sd2.safetensors", "-o", out)
    assert code == 2 and "Stable Diffusion 2" in err
    full_vae = random_checkpoint("tiny", seed=1)
    full_vae = {k: v for k, v in full_vae.items() if not k.startswith(VAE_PREFIX)}
    save_file(full_vae, str(tmp_path / "novae.safetensors"))
    code, _, err = sd15_cli(capsys, "merge", three_models[0], tmp_path / "novae.safetensors", "-o", out)
    assert code == 2 and "only in the first" in err and "first_stage_model." in err
    assert_only(tmp_path, {"inpaint.safetensors", "sd2.safetensors", "novae.safetensors"})


# --------------------------------------------------------------------------------------------------
# Refusals and failures


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_its_code_never_runs(tiny_state_dict, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": dict(tiny_state_dict), "payload": RunsCode(marker)}, tmp_path / "evil.ckpt")
    for out in ("out.safetensors", "out-folder"):
        code, _, err = sd15_cli(capsys, "convert", tmp_path / "evil.ckpt", tmp_path / out)
        assert code == 2 and "Refused" in err and f"the pickle contains {os.system.__module__}.system, which could run code" in err
    code, _, err = sd15_cli(capsys, "inspect", tmp_path / "evil.ckpt")
    assert code == 2 and "Refused" in err
    assert not marker.exists()
    assert_only(tmp_path, {"evil.ckpt"})


def test_existing_output_needs_force(tiny_checkpoint, exported, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    code, _, err = sd15_cli(capsys, "convert", tiny_checkpoint, out)
    assert code == 2 and "already exists" in err and "--force" in err and out.read_bytes() == b"precious"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert sd15_cli(capsys, "convert", tiny_checkpoint, folder)[0] == 2 and (folder / "keep.txt").exists()
    assert sd15_cli(capsys, "convert", tiny_checkpoint, out, "--force", "--no-progress")[0] == 0
    assert sd15.load(out).info.kind == "sd1"
    # --force replaces an earlier output, never a folder of other files (a typo would delete them all)
    for target in (folder, tmp_path / "dir.safetensors"):
        target.mkdir(exist_ok=True)
        (target / "keep.txt").write_text("mine")
        code, _, err = sd15_cli(capsys, "convert", tiny_checkpoint, target, "--force", "--no-progress")
        assert code == 2 and "not replaced, even with --force" in err and (target / "keep.txt").read_text() == "mine"
    (folder / "model_index.json").write_text("{}")  # an earlier diffusers output
    assert sd15_cli(capsys, "convert", tiny_checkpoint, folder, "--force", "--no-progress")[0] == 0
    assert not (folder / "keep.txt").exists() and sd15.load(folder).info.kind == "sd1"
    assert_only(tmp_path, {"out.safetensors", "folder", "dir.safetensors"})


KILLED_CONVERSION = """
import sys, time
from sd15 import streaming
from sd15.cli import main
get = streaming.MappedSafetensors.get
streaming.MappedSafetensors.get = lambda self, key: (time.sleep(0.02), get(self, key))[1]  # a slow disk
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("output", ["out.safetensors", "out-folder"])
def test_kill_midway_removes_the_partial_output_and_keeps_the_old(tiny_checkpoint, tmp_path, output):
    """`kill` (SIGTERM) while the output is being written: the temporary file or folder is removed and the
    output it was to replace is left as it was (by default SIGTERM ends Python with no cleanup)."""
    target = tmp_path / output
    if output.endswith(".safetensors"):
        target.write_bytes(b"precious")
    else:
        target.mkdir()
        (target / "model_index.json").write_text("precious")
    child = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION, "convert", str(tiny_checkpoint), str(target),
                              "--force", "--no-progress"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not any(p.name.startswith(f".{output}.partial-") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 130, child.stderr.read()
    assert_only(tmp_path, {output})
    assert (target.read_bytes() if target.is_file() else (target / "model_index.json").read_bytes()) == b"precious"


def test_output_may_not_replace_an_input(tiny_checkpoint, tiny_state_dict, tmp_path, capsys):
    src = save_checkpoint(tiny_state_dict, tmp_path / "model.safetensors")
    before = file_state(src)
    for out in (src, tmp_path):
        code, _, err = sd15_cli(capsys, "convert", src, out, "--force")
        assert code == 2 and "would replace the input" in err
    code, _, err = sd15_cli(capsys, "convert", src, tmp_path / "model.ckpt")
    assert code == 2 and ".safetensors files only" in err
    assert file_state(src) == before
    assert_only(tmp_path, {"model.safetensors"})


@pytest.mark.parametrize("kind, message", [("sd2", "Stable Diffusion 2"), ("8 channels", "8 input channels")])
def test_diffusers_folder_of_another_architecture_is_refused(exported, tmp_path, capsys, kind, message):
    """Reading a diffusers folder applies the SD1.x key rules, so it must hold an SD1.x model even when only
    the container changes: an SD2 folder (1024-wide context) would come out as a file of neither family."""
    folder = Path(shutil.copytree(exported, tmp_path / "other"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(weights)
    if kind == "sd2":
        unet = {k: torch.zeros(v.shape[0], 1024) if ".attn2.to_k." in k or ".attn2.to_v." in k else v for k, v in unet.items()}
    else:  # instruct-pix2pix's UNet
        unet["conv_in.weight"] = torch.zeros(32, 8, 3, 3)
    save_file(unet, str(weights))
    code, _, err = sd15_cli(capsys, "convert", folder, tmp_path / "out.safetensors")
    assert code == 2 and message in err and "Stable Diffusion 1.x" in err
    assert_only(tmp_path, {"other"})


def test_text_encoder_under_both_key_forms_is_refused(tiny_state_dict, tmp_path, capsys):
    """Both `transformer.text_model.X` and the older `transformer.X`: one name in diffusers, so one copy would
    be dropped without a word (and not the one sd15.load uses)."""
    sd = dict(tiny_state_dict)
    clip = {k[len(CLIP_PREFIX):]: v for k, v in tiny_state_dict.items() if k.startswith(CLIP_PREFIX)}
    sd.update({"cond_stage_model.transformer." + k: v + 1 for k, v in clip.items()})
    save_file(sd, str(tmp_path / "both.safetensors"))
    code, _, err = sd15_cli(capsys, "convert", tmp_path / "both.safetensors", tmp_path / "out")
    assert code == 2 and "twice" in err and "cond_stage_model.transformer.embeddings." in err
    assert_only(tmp_path, {"both.safetensors"})


def test_bin_pickle_in_a_diffusers_folder_is_read_safely(exported, tmp_path, capsys):
    """diffusers folders may hold pytorch_model.bin: read with weights_only=True, a payload refused, never run."""
    folder = Path(shutil.copytree(exported, tmp_path / "bin"))
    weights = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    weights.unlink()
    torch.save(tensors, folder / "text_encoder" / "pytorch_model.bin")
    assert sd15_cli(capsys, "convert", folder, tmp_path / "a.safetensors", "--no-progress")[0] == 0
    convert_module.convert(exported, tmp_path / "b.safetensors", progress=False)
    assert same_tensors(load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors"))
    marker = tmp_path / "pwned"
    torch.save({**tensors, "payload": RunsCode(marker)}, folder / "text_encoder" / "pytorch_model.bin")
    code, _, err = sd15_cli(capsys, "convert", folder, tmp_path / "c.safetensors")
    assert code == 2 and "Refused" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "c.safetensors").exists()


def test_truncated_input_is_refused(tiny_checkpoint, tiny_state_dict, tmp_path, capsys):
    data = tiny_checkpoint.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = sd15_cli(capsys, "convert", tmp_path / "cut.safetensors", tmp_path / "out.safetensors")
    assert code == 2 and "truncated" in err
    ckpt = save_checkpoint(tiny_state_dict, tmp_path / "full.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    ckpt.unlink()
    code, _, err = sd15_cli(capsys, "convert", tmp_path / "cut.ckpt", tmp_path / "out-folder")
    assert code == 2 and "not a readable checkpoint" in err
    assert_only(tmp_path, {"cut.safetensors", "cut.ckpt"})


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"something.weight": torch.zeros(3)}, "not a Stable Diffusion checkpoint"),
        ({"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.alpha": torch.tensor(4.0)}, "LoRA"),
        ({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
          UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(8, 8)}, "XL"),
        ({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(32, 5, 3, 3)}, "5 input channels"),
    ],
)  # fmt: skip
def test_unknown_architecture_is_refused(tmp_path, capsys, tensors, message):
    save_file(tensors, str(tmp_path / "other.safetensors"))
    for args in (["out-folder"], ["out.safetensors", "--prune"], ["out.safetensors", "--component", "unet"]):
        code, _, err = sd15_cli(capsys, "convert", tmp_path / "other.safetensors", tmp_path / args[0], *args[1:])
        assert code == 2 and message in err and "Stable Diffusion 1.x" in err
    assert_only(tmp_path, {"other.safetensors"})
    # A plain container/dtype conversion takes any dictionary of tensors.
    assert sd15_cli(capsys, "convert", tmp_path / "other.safetensors", tmp_path / "h.safetensors", "--dtype", "fp16", "--no-progress")[0] == 0
    assert load_file(tmp_path / "h.safetensors").keys() == tensors.keys()


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("output", ["out.safetensors", "out-folder"])
def test_failure_midway_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, failure, output):
    original, calls = streaming.MappedSafetensors.get, []

    def failing_get(self, key):
        calls.append(key)
        if len(calls) == 300:
            raise failure
        return original(self, key)

    monkeypatch.setattr(streaming.MappedSafetensors, "get", failing_get)
    with pytest.raises(type(failure)):
        convert_module.convert(tiny_checkpoint, tmp_path / output, progress=False)
    assert len(calls) == 300
    assert_only(tmp_path, set())


def test_verification_catches_a_corrupted_write(tiny_checkpoint, tmp_path, monkeypatch):
    write = streaming.write_safetensors

    def write_then_corrupt(path, items, metadata, progress):
        digests = write(path, items, metadata, progress)
        with open(path, "r+b") as f:  # flip one byte of the last tensor
            f.seek(-3, os.SEEK_END)
            byte = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
        return digests

    monkeypatch.setattr(streaming, "write_safetensors", write_then_corrupt)
    with pytest.raises(CheckpointError, match="reads back different bytes"):
        convert_module.convert(tiny_checkpoint, tmp_path / "out.safetensors", progress=False)
    with pytest.raises(CheckpointError, match="reads back different bytes"):
        convert_module.convert(tiny_checkpoint, tmp_path / "out-folder", progress=False)
    assert_only(tmp_path, set())


def test_written_header_is_the_safetensors_format(tiny_checkpoint, tmp_path):
    """8-byte little-endian header length, JSON header padded to 8, data in planned order, no gaps."""
    out = tmp_path / "out.safetensors"
    convert_module.convert(tiny_checkpoint, out, progress=False)
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and header.pop("__metadata__")["format"] == "pt"
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == len(raw) - 8 - n


# --------------------------------------------------------------------------------------------------
# inspect and diff


def test_inspect(tiny_checkpoint, tiny_state_dict, exported, tmp_path, capsys):
    from sd15.pnginfo import short_hash

    code, out, _ = sd15_cli(capsys, "inspect", tiny_checkpoint, "--json")
    r = json.loads(out)
    assert code == 0 and r["kind"] == "sd1" and r["components"] == ["unet", "vae", "text_encoder"]
    assert r["tensors"] == len(tiny_state_dict)
    assert r["parameters"] == sum(v.numel() for v in tiny_state_dict.values())
    unet = [v for k, v in tiny_state_dict.items() if k.startswith(UNET_PREFIX)]
    assert r["groups"]["unet"] == {"tensors": len(unet), "parameters": sum(v.numel() for v in unet),
                                   "bytes": sum(v.numel() * 4 for v in unet), "dtypes": {"float32": len(unet)}}  # fmt: skip
    assert r["groups"]["ema"]["dtypes"] == {"float32": len(unet) + 1, "int32": 1}
    assert r["has_ema"] and len(r["extra_tensors"]) == 12 and "alphas_cumprod" in r["extra_tensors"]
    assert r["short_hash"] == short_hash(tiny_checkpoint) and len(r["short_hash"]) == 10
    assert r["size_bytes"] == tiny_checkpoint.stat().st_size
    code, out, _ = sd15_cli(capsys, "inspect", tiny_checkpoint)
    assert code == 0 and "Stable Diffusion 1.x" in out and "EMA:         yes" in out and r["short_hash"] in out
    r = json.loads(sd15_cli(capsys, "inspect", exported, "--json")[1])
    assert r["format"] == "diffusers folder" and r["kind"] == "sd1" and not r["has_ema"] and r["short_hash"] is None
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(8, 32), "lora_unet_a.lora_up.weight": torch.zeros(32, 8),
               "lora_unet_a.alpha": torch.tensor(8.0)}, str(tmp_path / "lora.safetensors"))  # fmt: skip
    r = json.loads(sd15_cli(capsys, "inspect", tmp_path / "lora.safetensors", "--json", "--no-hash")[1])
    assert r["kind"] == "lora" and r["lora"] == {"modules": 1, "ranks": {"8": 1}}


def test_diff(tiny_checkpoint, exported, three_models, tmp_path, capsys):
    code, out, _ = sd15_cli(capsys, "diff", tiny_checkpoint, exported, "--json", "--no-progress")
    r = json.loads(out)
    for part in ("unet", "vae", "text_encoder"):
        p = r["parts"][part]
        assert p["compared"] == p["identical"] > 0 and p["max_abs"] == 0 and p["relative"] == 0
    assert "schedule" not in r["parts"] and len(r["not_compared"]) == 12  # the folder rebuilds them; not compared
    assert r["parts"]["ema"]["only_in_a"] == 496 and not r["identical"] and r["worst"] == []
    convert_module.convert(exported, tmp_path / "back.safetensors", progress=False)
    code, out, _ = sd15_cli(capsys, "diff", exported, tmp_path / "back.safetensors", "--no-progress")
    assert code == 0 and "the checkpoints are identical" in out
    a, b = load_file(three_models[0]), load_file(three_models[1])
    r = json.loads(sd15_cli(capsys, "diff", three_models[0], three_models[1], "--json", "--top", "3", "--no-progress")[1])
    vae = [k for k in a if k.startswith(VAE_PREFIX)]
    assert r["parts"]["vae"]["max_abs"] == max((a[k].double() - b[k].double()).abs().max().item() for k in vae)
    worst = max(a, key=lambda k: (a[k].double() - b[k].double()).abs().max().item())
    assert len(r["worst"]) == 3 and r["worst"][0]["key"] == worst
    assert r["parts"]["schedule"]["identical"] == 12  # the same schedule in every SD1 file


def test_diff_and_inspect_leave_out_what_a_folder_rebuilds(tmp_path, capsys):
    """A diffusers folder holds no schedule buffers: it rebuilds them (in float32) when read. `diff` of an fp16
    file, or of a file without them, with the folder converted from it finds them identical, and `inspect`
    counts only what the folder holds."""
    sd = random_checkpoint("tiny", seed=3, dtype=torch.float16)
    half = save_checkpoint(sd, tmp_path / "half.safetensors")
    pruned = save_checkpoint({k: v for k, v in sd.items() if k.startswith(("model.", "first_stage", "cond_stage"))},
                             tmp_path / "pruned.safetensors")  # fmt: skip
    convert_module.convert(half, tmp_path / "folder", progress=False)
    for file in (half, pruned):
        code, out, _ = sd15_cli(capsys, "diff", file, tmp_path / "folder", "--no-progress")
        assert code == 0 and "the checkpoints are identical" in out and "not compared: 12 tensors" in out, out
    r = json.loads(sd15_cli(capsys, "inspect", tmp_path / "folder", "--json")[1])
    assert "schedule" not in r["groups"] and r["tensors"] == len(sd) - 12 == sum(g["tensors"] for g in r["groups"].values())
    assert all(set(g["dtypes"]) <= {"float16", "int64"} for g in r["groups"].values())


def test_output_into_a_closed_pipe_ends_quietly(tiny_checkpoint):
    """`sd15 inspect … | head`: a reader that stops early is not an error (no "Broken pipe" message)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before sd15 writes a line
    try:
        child = subprocess.run([sys.executable, "-m", "sd15", "inspect", str(tiny_checkpoint), "--no-hash"],
                               stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write)
    assert child.returncode == 0 and child.stderr == ""
