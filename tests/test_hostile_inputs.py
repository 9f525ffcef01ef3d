"""Hostile and broken input at every entry point (library, CLI, conversion): each is refused with a clear
message (on the CLI: exit status 2, one line, no traceback) and nothing is written or replaced; inputs that
are merely unusual (odd prompts, image modes) work."""

import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd15.cli import main
from test_checkpoint import RunsCode  # a pickle whose loading would run a shell command
from sd15.random_weights import save_checkpoint




def snapshot(folder):
    """Every file below `folder` with its content, to prove nothing was created or changed."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and "home" not in p.parts}


def refused(args, capsys) -> str:
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1  # one line says what was wrong
    return err


def hostile_files(folder, tiny_state_dict):
    """name -> (path, expected message)."""
    files = {}
    evil = folder / "evil.ckpt"
    torch.save({"state_dict": dict(tiny_state_dict), "x": RunsCode(folder / "pwned")}, evil)
    files["pickle that runs code"] = (evil, "Refused to load")
    good = save_checkpoint(tiny_state_dict, folder / "good.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 3])
    files["truncated safetensors"] = (folder / "truncated.safetensors", "truncated")
    (folder / "garbage.safetensors").write_bytes(os.urandom(4096))
    files["random bytes"] = (folder / "garbage.safetensors", "not a valid .safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4 * 10**12]}}).encode()
    (folder / "huge.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    files["header claiming 4 TB"] = (folder / "huge.safetensors", "truncated or corrupt")
    (folder / "bighead.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    files["header length of 2^62"] = (folder / "bighead.safetensors", "claims")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "cond_stage_model.model.ln_final.weight": torch.zeros(1024)}, str(folder / "sd2.safetensors"))  # fmt: skip
    files["SD2 checkpoint"] = (folder / "sd2.safetensors", "Stable Diffusion 2")
    (folder / "empty.ckpt").write_bytes(b"")
    files["empty file"] = (folder / "empty.ckpt", "")
    return files


def test_hostile_checkpoints_everywhere(workdir, tiny_state_dict, capsys):
    inputs = workdir / "inputs"
    inputs.mkdir()
    files = hostile_files(inputs, tiny_state_dict)
    before = snapshot(workdir)
    for name, (path, message) in files.items():
        other_family = name == "SD2 checkpoint"  # a valid file sd15 cannot run: inspect and convert take it
        for args in (["generate", "a", "--model", str(path), "--steps", "1", "-o", "x.png"],
                     None if other_family else ["convert", str(path), str(workdir / "out.safetensors")],
                     None if other_family else ["inspect", str(path), "--no-hash"]):  # fmt: skip
            if args is None:
                continue
            err = refused(args, capsys)
            assert message in err, (name, args, err)
    assert not (inputs / "pwned").exists()
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "0"], "at least 1"),
        (["--width", "-64"], "at least 1"),
        (["--height", "100"], "multiple of 8"),
        (["--width", "65536", "--height", "65536"], "larger than"),
        (["--steps", "0"], "at least 1"),
        (["--steps", "100000"], "steps must be"),
        (["--cfg", "nan"], "finite"),
        (["--cfg", "inf"], "finite"),
        (["--sampler", "nope"], "invalid choice"),
        (["-n", "0"], "at least 1"),
    ],
)
def test_bad_generation_settings(workdir, tiny_checkpoint, capsys, args, message):
    before = snapshot(workdir)
    err = refused(["generate", "a cat", "--model", str(tiny_checkpoint), "-o", "x.png", *args], capsys)
    assert message in err
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    "prompt",
    ["", "a " * 400, "tab\there\x00nul\x07bell\x1b[31mred", "一只猫坐在沙发上", "🐱🛋️ ، קפה", "&lt;b&gt;&amp;", "(((", "\\"],
)
def test_unusual_prompts_work(tiny_model, prompt):
    image = tiny_model.generate(prompt, steps=1, seed=0, width=64, height=64, output_type="np")
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "L", "LA", "CMYK", "1"])
def test_image_modes_are_converted(tiny_model, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    image = rgb.convert("I;16") if mode == "I;16" else rgb.convert(mode)
    out = tiny_model.img2img(image, "a cat", steps=2, seed=0, output_type="np")
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_bad_images_on_the_cli(workdir, tiny_checkpoint, capsys):
    Image.new("RGB", (4, 4)).save(workdir / "tiny.png")
    (workdir / "notimage.png").write_bytes(b"this is not a png")
    Image.new("L", (9000, 9000)).save(workdir / "huge.png")  # 81 Mpixel: refused before it is decoded
    before = snapshot(workdir)
    for name, message in (("tiny.png", "too small"), ("notimage.png", "cannot read"), ("huge.png", "larger than")):
        err = refused(["img2img", name, "a cat", "--model", str(tiny_checkpoint), "--steps", "1", "-o", "x.png"], capsys)
        assert message in err, (name, err)
    assert snapshot(workdir) == before


def test_existing_conversion_output_is_not_replaced(workdir, tiny_checkpoint, capsys):
    target = workdir / "exists.safetensors"
    target.write_bytes(b"keep me")
    err = refused(["convert", str(tiny_checkpoint), str(target)], capsys)
    assert "--force" in err
    assert target.read_bytes() == b"keep me"
