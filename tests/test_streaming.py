"""sd15.streaming and sd15.keymap on their own: how outputs are put in place (never deleting what was not
named, nor what appeared meanwhile; symlinks replaced, not followed), which weights files of a diffusers
folder are read (sharded fp16 variants as diffusers and transformers write them), and inputs refused rather
than mis-read (a text encoder stored twice, safetensors data that overlap)."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from reference_models import diffusers_unet, diffusers_vae, transformers_clip
from safetensors.torch import save_file

from sd15 import keymap, streaming
from sd15.checkpoint import CheckpointError
from sd15.random_weights import TINY


def only(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def write_output(tmp: Path, folder: bool) -> None:
    """What a conversion writes at atomic_output's temporary path: a file, or a diffusers folder."""
    if folder:
        tmp.mkdir()
        (tmp / "model_index.json").write_text("new")
    else:
        with open(tmp, "xb") as f:
            f.write(b"new")


def read_output(path: Path) -> str:
    return (path / "model_index.json").read_text() if path.is_dir() else path.read_text()


# --------------------------------------------------------------------------------------------------
# Putting an output in place


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("folder", [False, True])
def test_output_that_appears_during_the_conversion_is_kept(tmp_path, force, folder):
    """Another program creates the output while a conversion runs: it is left as it is (with --force too: it
    was never checked, and a folder of someone's files must not be deleted), and the new output is discarded."""
    target = tmp_path / ("out" if folder else "out.safetensors")
    with pytest.raises(FileExistsError, match="while the conversion ran"):
        with streaming.atomic_output(target, force, []) as tmp:
            write_output(tmp, folder)
            target.mkdir() if folder else target.write_text("theirs")
            if folder:
                (target / "theirs.txt").write_text("theirs")
    assert (target / "theirs.txt" if folder else target).read_text() == "theirs"
    assert only(tmp_path) == {target.name}


def test_output_replaced_during_the_conversion_is_kept(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_text("old")
    with pytest.raises(FileExistsError, match="replaced or changed"):
        with streaming.atomic_output(target, True, []) as tmp:
            write_output(tmp, False)
            (tmp_path / "other").write_text("theirs")
            os.replace(tmp_path / "other", target)
    assert target.read_text() == "theirs" and only(tmp_path) == {target.name}


@pytest.mark.parametrize("points_to_folder", [False, True])
@pytest.mark.parametrize("folder", [False, True])
def test_a_symlink_output_is_replaced_not_followed(tmp_path, points_to_folder, folder):
    """--force on an output that is a symlink replaces the link; what it points to is left as it was."""
    if points_to_folder:
        pointed = tmp_path / "elsewhere"
        pointed.mkdir()
        (pointed / "model_index.json").write_text("old")
    else:
        pointed = tmp_path / "elsewhere.safetensors"
        pointed.write_text("old")
    target = tmp_path / ("out" if folder else "out.safetensors")
    target.symlink_to(pointed)
    with streaming.atomic_output(target, True, []) as tmp:
        write_output(tmp, folder)
    assert not target.is_symlink() and read_output(target) == "new"
    assert read_output(pointed) == "old"
    assert only(tmp_path) == {target.name, pointed.name}


def test_a_dangling_symlink_output_needs_force(tmp_path):
    target = tmp_path / "out.safetensors"
    target.symlink_to(tmp_path / "nothing")
    with pytest.raises(FileExistsError, match="--force"):
        with streaming.atomic_output(target, False, []) as tmp:
            write_output(tmp, False)
    assert target.is_symlink() and only(tmp_path) == {target.name}


@pytest.mark.parametrize("kind", ["partial", "old"])
def test_a_leftover_temporary_of_this_process_number_is_not_deleted(tmp_path, kind):
    """`.NAME.partial-PID` of the same PID: another conversion of this process writing it, or one killed (kill -9)
    that left it; `.NAME.old-PID` may be the only copy of an output that one was replacing. Refused, not deleted."""
    leftover = tmp_path / f".out.safetensors.{kind}-{os.getpid()}"
    leftover.write_text("someone's")
    with pytest.raises(FileExistsError, match="in the way"):
        with streaming.atomic_output(tmp_path / "out.safetensors", False, []) as tmp:
            write_output(tmp, False)
    assert leftover.read_text() == "someone's" and only(tmp_path) == {leftover.name}


# --------------------------------------------------------------------------------------------------
# Which weights a diffusers folder is read from


@pytest.fixture(scope="module")
def sharded_fp16_folder(tiny_state_dict, tmp_path_factory) -> Path:
    """A diffusers folder whose components diffusers and transformers saved as sharded fp16 variants
    (`save_pretrained(variant="fp16", max_shard_size=...)`), with the tiny checkpoint's weights."""
    folder = tmp_path_factory.mktemp("variant") / "sd"
    unet = diffusers_unet(tiny_state_dict, TINY["unet"])
    vae = diffusers_vae(tiny_state_dict, TINY["vae"])
    text_encoder = transformers_clip(tiny_state_dict, TINY["text_encoder"])
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        model.save_pretrained(folder / name, variant="fp16", max_shard_size="1MB")
    (folder / "model_index.json").write_text(json.dumps(keymap.model_index(False)))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(keymap.SCHEDULER_CONFIG))
    return folder


def test_sharded_fp16_variant_folder_is_read(sharded_fp16_folder, tiny_state_dict):
    assert only(sharded_fp16_folder / "unet") >= {"config.json", "diffusion_pytorch_model.safetensors.index.fp16.json",
                                                  "diffusion_pytorch_model.fp16-00001-of-00009.safetensors"}  # fmt: skip
    assert only(sharded_fp16_folder / "text_encoder") >= {"model.safetensors.index.fp16.json", "model.fp16-00001-of-00002.safetensors"}
    view = streaming.DiffusersFolder(sharded_fp16_folder)
    expected = {k: v for k, v in tiny_state_dict.items() if not k.startswith("model_ema.")}
    assert view.keys() == expected.keys()
    assert all(torch.equal(view.get(k), v) for k, v in expected.items())


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_component_folder_is_read_by_its_config(sharded_fp16_folder, tmp_path, component):
    """A component folder is opened by the weights name its config.json implies (diffusers' _class_name:
    diffusion_pytorch_model, transformers' architectures: model), whichever of the weights' forms it holds."""
    folder = sharded_fp16_folder / component
    expected = streaming.open_weights(folder, keymap.WEIGHTS_NAME[component])
    assert streaming.open_source(folder).keys() == expected.keys()  # sharded fp16 only
    single = tmp_path / component
    single.mkdir()
    (single / "config.json").write_bytes((folder / "config.json").read_bytes())
    name = keymap.WEIGHTS_NAME[component]
    save_file({k: expected.get(k) for k in expected.keys()}, str(single / f"{name}.fp16.safetensors"))
    view = streaming.open_source(single)  # the fp16 variant alone
    assert view.keys() == expected.keys() and all(torch.equal(view.get(k), expected.get(k)) for k in expected.keys())
    (single / f"{name}.fp16.safetensors").unlink()
    bin_name = "pytorch_model" if component == "text_encoder" else name
    torch.save({k: expected.get(k).clone() for k in expected.keys()}, single / f"{bin_name}.fp16.bin")
    assert streaming.open_source(single).keys() == expected.keys()  # a pickle of the fp16 variant


def test_folder_without_weights_names_every_file_looked_for(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError) as e:
        streaming.open_source(tmp_path)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin", "nor a variant", "diffusion_pytorch_model.fp16.safetensors"):  # fmt: skip
        assert name in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(CheckpointError, match="names no model class"):
        streaming.open_source(tmp_path)


def _weights(folder: Path, **files: torch.dtype) -> Path:
    """A UNet component folder holding a one-tensor weights file of each given name (dots as `__`) and dtype."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    for name, dtype in files.items():
        name, tensors = name.replace("__", "."), {"w": torch.ones(2, dtype=dtype)}
        torch.save(tensors, folder / name) if name.endswith(".bin") else save_file(tensors, str(folder / name))
    return folder


def test_weights_without_a_variant_come_first_then_any_single_variant(tmp_path):
    """As diffusers chooses with no variant asked for: NAME.safetensors, its index, NAME.bin, and only then a
    variant's files: fp16, bf16 or any other, when the folder holds one. A note says which file was read."""
    name = "diffusion_pytorch_model"
    notes = []  # the fp32 .bin beside the fp16 variant, as SD1.5's repository had them
    folder = _weights(tmp_path / "a", diffusion_pytorch_model__bin=torch.float32, diffusion_pytorch_model__fp16__safetensors=torch.float16)
    assert streaming.open_weights(folder, name, notes).get("w").dtype == torch.float32
    assert notes == ["a/: read diffusion_pytorch_model.bin, as diffusers does when no variant is asked for; not the fp16 variant"]
    notes = []
    folder = _weights(tmp_path / "b", diffusion_pytorch_model__bf16__safetensors=torch.bfloat16)
    assert streaming.open_weights(folder, name, notes).get("w").dtype == torch.bfloat16
    assert notes == ["b/: read diffusion_pytorch_model.bf16.safetensors, the only weights it holds (the bf16 variant)"]
    notes = []
    folder = _weights(tmp_path / "c", diffusion_pytorch_model__safetensors=torch.float32)
    assert streaming.open_weights(folder, name, notes).get("w").dtype == torch.float32 and notes == []  # no choice, no note
    folder = _weights(tmp_path / "d", diffusion_pytorch_model__bf16__safetensors=torch.bfloat16,
                      diffusion_pytorch_model__fp16__bin=torch.float16)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"holds the weights of 2 variants \(bf16, fp16\) and none without a variant"):
        streaming.open_weights(folder, name)


# --------------------------------------------------------------------------------------------------
# Inputs refused rather than mis-read


def test_text_encoder_stored_twice_is_refused_by_the_key_rules(sharded_fp16_folder, tmp_path):
    """`text_model.X` and `X` are one name: refused in both directions, so no copy is dropped without a word."""
    with pytest.raises(CheckpointError, match="twice, as cond_stage_model.transformer.text_model.a and cond_stage_model.transformer.a"):
        keymap.to_diffusers("text_encoder", ["text_model.a", "a"])
    with pytest.raises(CheckpointError, match="twice, as a and text_model.a"):
        keymap.from_diffusers("text_encoder", ["a", "text_model.a"])
    folder = tmp_path / "sd"
    folder.mkdir()
    for p in sharded_fp16_folder.iterdir():
        (folder / p.name).symlink_to(p)
    (folder / "text_encoder").unlink()
    (folder / "text_encoder").mkdir()
    reader = streaming.open_weights(sharded_fp16_folder / "text_encoder", "model")
    tensors = {k: reader.get(k).clone() for k in reader.keys()}
    tensors.update({"text_model." + k: v + 1 for k, v in tensors.items()})
    save_file(tensors, str(folder / "text_encoder" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"text_encoder/model.safetensors: the text encoder holds .* twice"):
        streaming.DiffusersFolder(folder)


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "offsets, size",
    [([[0, 8], [0, 8]], 8), ([[0, 8], [16, 24]], 24), ([[0, 8], [8, 16]], 24)],
    ids=["overlap", "gap", "trailing bytes"],
)
def test_safetensors_whose_data_overlap_or_leave_gaps_is_refused(tmp_path, offsets, size):
    """The format stores tensors back to back; other offsets (two tensors reading the same bytes) are refused,
    as the safetensors library refuses them, not read."""
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": o} for name, o in zip("ab", offsets)}
    _raw_safetensors(tmp_path / "x.safetensors", header, bytes(size))
    with pytest.raises(CheckpointError, match="overlap or leave gaps"):
        streaming.MappedSafetensors(tmp_path / "x.safetensors")
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}  # a zero-size tensor takes no bytes
    _raw_safetensors(tmp_path / "ok.safetensors", {**header, "b": {**header["b"], "data_offsets": [8, 16]}, "c": empty}, bytes(16))
    ok = streaming.MappedSafetensors(tmp_path / "ok.safetensors")
    assert torch.equal(ok.get("b"), torch.zeros(2)) and ok.shape("c") == (0,)
