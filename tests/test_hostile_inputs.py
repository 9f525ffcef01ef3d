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


def refused_before_loading(args, workdir, capsys, monkeypatch) -> str:
    """`refused`, and also: the model was never loaded and the folder is byte-identical afterwards."""
    import sd15.cli

    monkeypatch.setattr(sd15.cli, "_load_model", lambda args: pytest.fail("the model was loaded before the input was checked"))
    before = snapshot(workdir)
    err = refused(args, capsys)
    assert snapshot(workdir) == before
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


def _png(path, size=(64, 64), colour=(120, 80, 40)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_no_command_replaces_its_own_inputs(workdir, tiny_checkpoint, capsys):
    """-o or --preview naming an input (the same path, or another name for the same file) is refused before
    the model loads: the user's image, mask or source PNG is never overwritten."""
    _png(workdir / "in.png")
    Image.new("L", (64, 64), 255).save(workdir / "mask.png")
    os.link(workdir / "in.png", workdir / "alias.png")
    from sd15.pnginfo import save_png

    save_png(Image.new("RGB", (64, 64)), workdir / "gen.png", "a cat\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64")
    before = snapshot(workdir)
    model = ["--model", str(tiny_checkpoint), "--steps", "2"]
    for args in (["img2img", "in.png", "a cat", "-o", "in.png"],
                 ["img2img", "in.png", "a cat", "-o", "./sub/../in.png"],
                 ["img2img", "in.png", "a cat", "-o", "alias.png"],
                 ["img2img", "in.png", "a cat", "-o", "out.png", "--preview", "in.png"],
                 ["inpaint", "in.png", "mask.png", "a cat", "-o", "mask.png"],
                 ["generate", "--from-png", "gen.png", "-o", "gen.png"]):  # fmt: skip
        err = refused([*args, *model], capsys)
        assert "input of this run" in err, (args, err)
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    "output, n, make, message",
    [
        ("adir.png", "1", lambda d: (d / "adir.png").mkdir(), "is a folder"),
        ("in.png/x.png", "1", lambda d: _png(d / "in.png"), "is a file, not a folder"),
        ("two.png", "2", lambda d: (d / "two-1.png").mkdir(), "is a folder"),  # -n 2: the second image's name
    ],
)
def test_unwritable_outputs_are_refused_before_the_run(workdir, tiny_checkpoint, capsys, output, n, make, message):
    make(workdir)
    before = snapshot(workdir)
    err = refused(["generate", "a", "--model", str(tiny_checkpoint), "--steps", "1", "-W", "64", "-H", "64",
                   "-n", n, "-o", output], capsys)  # fmt: skip
    assert message in err
    assert snapshot(workdir) == before


def test_a_write_error_after_the_run_is_one_line_not_a_traceback(workdir, tiny_checkpoint, capsys, monkeypatch):
    from sd15 import pnginfo

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pnginfo, "save_png", disk_full)
    err = refused(["generate", "a", "--model", str(tiny_checkpoint), "--steps", "1", "-W", "64", "-H", "64", "-o", "x.png"], capsys)
    assert "No space left on device" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", str(2**64)], "seed must be"),
        (["--seed", str(2**64 - 1), "-n", "2"], "image i uses seed + i"),
        (["-n", "100000000"], "from 1 to 10000"),
        (["--lora", "x.safetensors:nan"], "finite"),
        (["--lora", "x.safetensors:inf"], "finite"),
        (["--hires-scale", "4", "-W", "2048", "-H", "2048"], "larger than"),
        (["--hires-scale", "2", "--hires-strength", "0.01", "--hires-steps", "10"], "leaves no step"),
        (["--negative", "a \udcff cat"], "not a Unicode character"),
        (["--steps", "1000"], "pndm cannot take 1000 steps"),
        (["--steps", "1000", "--sampler", "dpmpp_2m"], "dpmpp_2m cannot take 1000 steps"),
    ],
)
def test_bad_settings_are_refused_before_the_model_loads(workdir, tiny_checkpoint, capsys, monkeypatch, args, message):
    err = refused_before_loading(["generate", "a cat", "--model", str(tiny_checkpoint), "-o", "x.png", *args], workdir, capsys, monkeypatch)
    assert message in err


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("img2img", ["--strength", "0.01", "--steps", "10"], "leaves no step"),
        ("img2img", ["--seed", "-99999999999999999999999"], "seed must be"),
        ("inpaint", ["--strength", "0.01", "--steps", "10"], "leaves no step"),
    ],
)
def test_image_commands_refuse_bad_settings_before_the_model_loads(workdir, tiny_checkpoint, capsys, monkeypatch,
                                                                    command, args, message):  # fmt: skip
    _png(workdir / "in.png")
    Image.new("L", (64, 64), 255).save(workdir / "mask.png")
    inputs = ["in.png", "mask.png"] if command == "inpaint" else ["in.png"]
    err = refused_before_loading([command, *inputs, "a cat", "--model", str(tiny_checkpoint), "-o", "x.png", *args],
                                 workdir, capsys, monkeypatch)  # fmt: skip
    assert message in err


def test_a_huge_mask_blur_feathers_without_allocating_more_than_the_image():
    from sd15.inpaint import feather

    hard = torch.zeros(1, 1, 64, 48)
    hard[..., 10:40, 10:30] = 1
    wide = feather(hard, 1e9)  # a kernel of 6e9 taps before the radius was bounded by the image
    assert wide.shape == hard.shape and torch.isfinite(wide).all()
    assert torch.equal(feather(hard, 1e300), wide)  # beyond the image's size, any blur is the same
    assert (wide[hard == 0] == 0).all()


def test_exif_rotated_photos_are_used_as_they_are_shown(tiny_model):
    from sd15.images import to_tensor

    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))  # 64 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path_bytes = __import__("io").BytesIO()
    stored.save(path_bytes, format="JPEG", exif=exif.tobytes())
    photo = Image.open(path_bytes)
    assert photo.size == (64, 48)
    assert to_tensor(photo).shape[-2:] == (64, 48)  # shown 48 wide and 64 high


@pytest.mark.parametrize(
    "latents, message",
    [
        (np.zeros((1, 4, 8, 8), dtype=np.float32) * np.nan, "NaN or infinite"),
        ("noise", "must be a tensor"),
        (torch.zeros(1, 4, 9, 8), "must have shape"),
    ],
)
def test_given_latents_are_checked_up_front(tiny_model, latents, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate("a cat", steps=2, width=64, height=64, latents=latents)


def test_numpy_latents_are_taken_like_a_tensor(tiny_model):
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    a = tiny_model.generate("a cat", steps=2, width=64, height=64, latents=noise, output_type="np")
    b = tiny_model.generate("a cat", steps=2, width=64, height=64, latents=torch.from_numpy(noise), output_type="np")
    assert np.array_equal(a, b)


def test_damaged_lora_and_embedding_numbers_are_refused(tiny_model, tmp_path):
    """NaN or infinite numbers in an adapter file would make every image NaN after a whole run."""
    from safetensors.torch import load_file

    from lora_files import random_attention_lora
    from sd15.checkpoint import CheckpointError

    good = load_file(str(random_attention_lora(tiny_model, tmp_path / "good.safetensors")))
    first = sorted(k for k in good if k.endswith("lora_down.weight"))[0]
    layer = first.removesuffix(".lora_down.weight")
    for name, change, message in (("nan-alpha", {f"{layer}.alpha": torch.tensor(float("nan"))}, "not a finite number"),
                                  ("three-alphas", {f"{layer}.alpha": torch.ones(3)}, "must hold one number"),
                                  ("inf-weight", {first: good[first] * float("inf")}, "not finite")):  # fmt: skip
        save_file({**good, **change}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(CheckpointError, match=message):
            tiny_model.load_lora(tmp_path / f"{name}.safetensors")
    assert tiny_model.loras == []
    with pytest.raises(ValueError, match="finite"):
        tiny_model.load_lora(tmp_path / "good.safetensors", scale=float("nan"))

    width = tiny_model.text_encoder.config.hidden_size
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.full((1, width), float("nan"))}}, folder / "nan.pt")
    torch.save({"string_to_param": 5}, folder / "int.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, width)}}, folder / "ok.pt")
    skipped = tiny_model.load_embeddings_folder(folder)
    assert len(skipped) == 2 and "NaN or infinite" in skipped[1] and "dict of one entry" in skipped[0]
    assert "ok" in tiny_model.embeddings
    torch.save({"": torch.randn(width)}, tmp_path / "untitled.bin")  # diffusers' {token: vector}, with no token
    with pytest.raises(CheckpointError, match="has no tokens"):
        tiny_model.load_embedding(tmp_path / "untitled.bin")
    tiny_model.embeddings.remove("ok")
