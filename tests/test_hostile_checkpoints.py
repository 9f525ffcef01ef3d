"""Broken and hostile checkpoints that once slipped through: outputs inside an input folder, zip records
that torch's memory-mapped load misreads, malformed safetensors headers and diffusers folders, weights of
the wrong kind, terminal escapes in keys, and output suffixes in capitals. Each is refused with a clear
message (on the CLI: exit status 2, one line, no traceback) and nothing is created or changed."""

import json
import runpy
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sd15
from sd15.checkpoint import CheckpointError, SafetensorsFile, load_pickle, read_safetensors_header
from sd15.cli import main
from sd15.random_weights import save_checkpoint
from test_hostile_inputs import refused, snapshot

SCRIPTS = Path(__file__).parent.parent / "scripts"
ESCAPE = "\x1b]0;pwned\x07\x1b[2K\rOK: all good"


@pytest.fixture(scope="module")
def diffusers_folder(tiny_checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("diffusers") / "d"
    assert main(["convert", str(tiny_checkpoint), str(folder), "--no-progress"]) == 0
    return folder


@pytest.fixture
def folder(diffusers_folder, workdir) -> Path:
    """A copy of the tiny diffusers folder in the test's own working folder."""
    return Path(shutil.copytree(diffusers_folder, workdir / "d"))


# 1. An output inside an input folder would overwrite the input as it is read


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "d", "d/unet/diffusion_pytorch_model.safetensors", "--force"],
        ["convert", "d", "d/unet/new.safetensors"],
        ["merge", "t.safetensors", "d", "-o", "d/vae/diffusion_pytorch_model.safetensors", "--force"],
        ["convert", "t.safetensors", "d/vae/diffusion_pytorch_model.safetensors", "--vae", "d", "--force"],
    ],
)
def test_output_inside_an_input_folder_is_refused(folder, workdir, tiny_checkpoint, capsys, args):
    shutil.copyfile(tiny_checkpoint, workdir / "t.safetensors")
    before = snapshot(workdir)
    err = refused(args + ["--no-progress"], capsys)
    assert "inside the input folder" in err
    assert snapshot(workdir) == before


def test_output_beside_an_input_folder_is_written(folder, workdir):
    assert main(["convert", "d", "d2.safetensors", "--no-progress"]) == 0  # a name that starts like the input's
    assert (workdir / "d2.safetensors").is_file()


def test_conversion_script_refuses_an_output_inside_its_input(folder, workdir, capsys, monkeypatch):
    before = snapshot(workdir)
    monkeypatch.setattr(sys, "argv", ["convert_diffusers_to_original.py", "--model_path", "d",
                                      "--checkpoint_path", "d/unet/diffusion_pytorch_model.safetensors", "--force"])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(SCRIPTS / "convert_diffusers_to_original.py"), run_name="__main__")
    assert e.value.code == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert snapshot(workdir) == before


# 2. Zip records that the memory-mapped load of torch would read past or misread


def rezip(source: Path, target: Path, shorten: str | None = None, compress: bool = False) -> Path:
    """A copy of a torch zip checkpoint with one record cut to half its size, or all records deflated."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for record in zin.infolist():
            data = zin.read(record)
            if shorten and record.filename.endswith(shorten):
                data = data[: len(data) // 2]
            zout.writestr(record.filename, data, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
    return target


@pytest.fixture
def tiny_ckpt(tiny_state_dict, workdir) -> Path:
    torch.save({"state_dict": tiny_state_dict}, workdir / "t.ckpt")
    return workdir / "t.ckpt"


def test_shortened_zip_record_is_refused(tiny_ckpt, workdir, capsys):
    short = rezip(tiny_ckpt, workdir / "short.ckpt", shorten="/data/5")
    tiny_ckpt.unlink()
    before = snapshot(workdir)
    with pytest.raises(CheckpointError, match="does not match expected size"):
        load_pickle(short)
    for args in (["convert", "short.ckpt", "out.safetensors", "--no-progress"], ["inspect", "short.ckpt", "--no-hash"],
                 ["generate", "a", "--model", "short.ckpt", "--steps", "1", "-o", "x.png"]):  # fmt: skip
        assert "truncated or corrupt" in refused(args, capsys)
    assert snapshot(workdir) == before


def test_deflated_zip_records_load_their_own_bytes(tiny_ckpt, tiny_state_dict, workdir):
    deflated = rezip(tiny_ckpt, workdir / "deflated.ckpt", compress=True)
    loaded = load_pickle(deflated)
    assert loaded.keys() == tiny_state_dict.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_state_dict.items())


# 3. Malformed safetensors headers


def write_header(path: Path, header: dict, data: bytes = b"\0" * 16) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "data_offsets": [0, 4]}, "lacks a dtype name or a shape"),
        ({"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}, "lacks a dtype name or a shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": ["a", "b"]}, "not [begin, end]"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 2, 4]}, "not [begin, end]"),
        ({"shape": [1], "data_offsets": [0, 4]}, "lacks a dtype name"),
        ("F32", "lacks a dtype name or a shape"),
    ],
)
def test_malformed_safetensors_header_entry(workdir, capsys, entry, message):
    bad = write_header(workdir / "bad.safetensors", {"model.diffusion_model.w": entry})
    before = snapshot(workdir)
    for read in (read_safetensors_header, SafetensorsFile):
        with pytest.raises(CheckpointError, match="bad.safetensors") as e:
            read(bad)
        assert message in str(e.value) and "'model.diffusion_model.w'" in str(e.value)
    for args in (["inspect", "bad.safetensors", "--no-hash"], ["convert", "bad.safetensors", "o.safetensors"]):
        err = refused(args, capsys)
        assert message in err and "model.diffusion_model.w" in err
    assert snapshot(workdir) == before


def test_safetensors_metadata_must_be_strings(workdir):
    bad = write_header(workdir / "bad.safetensors", {"__metadata__": ["x"], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    with pytest.raises(CheckpointError, match="__metadata__ is not a map of strings"):
        read_safetensors_header(bad)


# 4. Malformed diffusers folders


def shard_unet(folder: Path, weight_map: dict | None = None, index=None) -> Path:
    """The UNet of `folder` as one shard named by an index (`index` replaces the whole index JSON)."""
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "shard-1.safetensors")
    keys = read_safetensors_header(unet / "shard-1.safetensors").keys() - {"__metadata__"}
    index = index if index is not None else {"weight_map": {k: (weight_map or {}).get(k, "shard-1.safetensors") for k in keys}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_unet_loads(folder, tiny_model):
    model = sd15.load(shard_unet(folder))
    assert all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), tiny_model.unet.state_dict().values()))
    from sd15.inspect_checkpoint import inspect

    assert inspect(folder / "unet", with_hash=False)["format"] == "safetensors in 1 shard"  # not "pickle"


def _first_unet_key(folder):
    return min(read_safetensors_header(folder / "unet" / "diffusion_pytorch_model.safetensors").keys() - {"__metadata__"})


def _index_without_a_key(folder):
    """A shard index that leaves out one tensor its shard holds."""
    shard_unet(folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(path.read_text())
    del index["weight_map"]["conv_out.bias"]
    path.write_text(json.dumps(index))


def _drop_position_embedding(folder):
    path = folder / "text_encoder" / "model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "position_embedding" not in k}, str(path))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: shard_unet(d, {_first_unet_key(d): "missing.safetensors"}), "names a shard 'missing.safetensors' that is not in"),
        (lambda d: shard_unet(d, {_first_unet_key(d): "../../../../etc/passwd"}), "outside its folder"),
        (lambda d: shard_unet(d, index={"metadata": {}}), "no weight_map"),
        (lambda d: shard_unet(d, index=[1, 2]), "no weight_map"),
        (_index_without_a_key, "leaves out 1 tensor that its shards hold, e.g. conv_out.bias in 'shard-1.safetensors'"),
        (lambda d: (d / "model_index.json").write_text("[]"), "model_index.json is not a JSON object"),
        (_drop_position_embedding, "lacks the text encoder's position embedding"),
        (lambda d: (d / "scheduler" / "scheduler_config.json").write_text("[]"), None),  # no schedule buffers, no error
    ],
    ids=["missing shard", "shard outside", "no weight_map", "index is a list", "index leaves out a key", "model_index is a list",
         "no position embedding", "scheduler config is a list"],
)
def test_malformed_diffusers_folder(folder, workdir, capsys, breakage, message):
    breakage(folder)
    before = snapshot(workdir)
    if message is None:
        assert main(["inspect", "d", "--no-hash"]) == 0
        return
    with pytest.raises(CheckpointError, match=message):
        sd15.load(folder)
    for args in (["inspect", "d", "--no-hash"], ["convert", "d", "o.safetensors", "--no-progress"],
                 ["generate", "a", "--model", "d", "--steps", "1", "-o", "x.png"]):  # fmt: skip
        assert message in refused(args, capsys)
    assert snapshot(workdir) == before


# 5. Valid shapes, wrong contents


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_weight_is_refused_by_name(tiny_state_dict, workdir, capsys, dtype):
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    save_checkpoint({**tiny_state_dict, key: tiny_state_dict[key].to(dtype)}, workdir / "int.safetensors")
    before = snapshot(workdir)
    with pytest.raises(CheckpointError, match=rf"{key} is stored as {dtype}"):
        sd15.load(workdir / "int.safetensors")
    assert key in refused(["generate", "a", "--model", "int.safetensors", "--steps", "1", "-o", "x.png"], capsys)
    assert snapshot(workdir) == before


def test_text_encoder_needs_77_positions(tiny_state_dict, workdir, capsys):
    embeddings = "cond_stage_model.transformer.text_model.embeddings."
    short = {**tiny_state_dict, embeddings + "position_embedding.weight": tiny_state_dict[embeddings + "position_embedding.weight"][:10],
             embeddings + "position_ids": torch.arange(10)[None]}  # fmt: skip
    save_checkpoint(short, workdir / "short.safetensors")
    before = snapshot(workdir)
    with pytest.raises(ValueError, match="has 10 positions, SD1.x's CLIP has 77"):
        sd15.load(workdir / "short.safetensors")
    assert "77" in refused(["generate", "a", "--model", "short.safetensors", "--steps", "1", "-o", "x.png"], capsys)
    assert "77" in refused(["convert", "short.safetensors", "out", "--no-progress"], capsys)
    assert snapshot(workdir) == before


# 6. Terminal escape sequences in keys and metadata are printed escaped


def test_escape_sequences_in_keys_and_metadata_are_printed_escaped(tiny_state_dict, workdir, capsys):
    key = "model.diffusion_model." + ESCAPE
    save_checkpoint({**tiny_state_dict, key: torch.zeros(1)}, workdir / "esc.safetensors")
    save_file(dict(tiny_state_dict), str(workdir / "meta.safetensors"), metadata={"note": "\x1b[31mred", "\x1b[2Kkey": "x"})
    before = snapshot(workdir)
    err = refused(["generate", "a", "--model", "esc.safetensors", "--steps", "1", "-o", "x.png"], capsys)
    assert "\x1b" not in err and "\r" not in err and "\\x1b]0;pwned\\x07" in err
    with pytest.raises(CheckpointError) as e:
        sd15.load(workdir / "esc.safetensors")
    assert "\x1b" not in str(e.value)
    assert main(["inspect", "meta.safetensors", "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "note=\\x1b[31mred" in out
    assert snapshot(workdir) == before


# 7. Output suffixes in any case


@pytest.mark.parametrize("name", ["out.CKPT", "out.Pt", "out.BIN"])
def test_pickle_output_suffix_in_capitals_is_refused(tiny_checkpoint, workdir, capsys, name):
    before = snapshot(workdir)
    for args in (["convert", str(tiny_checkpoint), name], ["merge", str(tiny_checkpoint), str(tiny_checkpoint), "-o", name]):
        assert "writes .safetensors files only" in refused(args + ["--no-progress"], capsys)
    assert snapshot(workdir) == before


def test_safetensors_suffix_in_capitals_writes_a_file(tiny_checkpoint, tiny_state_dict, workdir):
    assert main(["convert", str(tiny_checkpoint), "T.SAFETENSORS", "--no-progress"]) == 0
    assert (workdir / "T.SAFETENSORS").is_file()
    written = load_file(workdir / "T.SAFETENSORS")
    assert all(torch.equal(written[k], v) for k, v in tiny_state_dict.items())
    assert sorted(p.name for p in workdir.iterdir() if p.name != "home") == ["T.SAFETENSORS"]
