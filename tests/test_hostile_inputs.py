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
        (["--hires-scale", "2", "--hires-strength", "0.01", "--hires-steps", "10"], "10 hires steps at strength 0.01 need a 1000-step schedule"),
        (["--negative", "a \udcff cat"], "not a Unicode character"),
        (["--steps", "1000"], "pndm cannot take 1000 steps"),
        (["--steps", "1000", "--sampler", "dpmpp_2m"], "dpmpp_2m cannot take 1000 steps"),
        (["--negative", "[" * 200 + "a:b:0.5" + "]" * 200], "nests brackets more than 100 deep"),
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
    assert float(wide.max() - wide.min()) < 1e-6  # spread evenly over the image (the web UI's outward blur)


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


# ------------------------------------------------------------------------------------------ ControlNet inputs


def _png_header(path, width, height):
    """A PNG that claims width × height pixels and holds almost none (a decompression bomb's header)."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_controlnet_inputs_are_refused_before_the_model_loads(workdir, tiny_checkpoint, controlnet_state_dict, capsys, monkeypatch):
    """Bad ControlNet files, control images and settings: one line, exit status 2, the model never loaded, no
    file created or changed, and a pickle's code never run."""
    from sd15.pnginfo import save_png

    cn = save_checkpoint(controlnet_state_dict, workdir / "cn.safetensors")
    (workdir / "net.png").write_bytes(cn.read_bytes())  # a ControlNet file with a name an output could take
    save_checkpoint({k: v * float("nan") if k.endswith("zero_convs.0.0.weight") else v for k, v in controlnet_state_dict.items()},
                    workdir / "nan.safetensors")  # fmt: skip
    torch.save({"state_dict": dict(controlnet_state_dict), "x": RunsCode(workdir / "pwned")}, workdir / "evil.pth")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(workdir / "lora.safetensors"))  # fmt: skip
    _png(workdir / "edges.png")
    Image.new("L", (64, 64), 255).save(workdir / "mask.png")
    _png_header(workdir / "bomb.png", 30000, 30000)  # over PIL's own limit: its DecompressionBombError
    _png_header(workdir / "big.png", 10000, 10000)  # under it, but PIL warns (two lines on stderr) before sd15 refuses
    Image.new("RGB", (1, 1)).save(workdir / "dot.png")
    (workdir / "cut.png").write_bytes((workdir / "edges.png").read_bytes()[:60])
    (workdir / "notes.txt").write_text("not an image")
    (workdir / "folder").mkdir()
    Image.fromarray(np.full((64, 64), 0.5, np.float32)).save(workdir / "depth.tiff")  # mode F
    recorded = 'ControlNet 0: "Module: none, Model: cn [0123456789], Weight: {}, Guidance Start: {}, Guidance End: 1"'
    for name, weight, start in (("nan-weight.png", "nan", 0), ("late-start.png", 1, 5)):
        save_png(Image.new("RGB", (64, 64)), workdir / name,
                 "a cat\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, " + recorded.format(weight, start))  # fmt: skip
    cases = [
        (["generate", "a cat", "--control-end", "0.5"], "--control-end apply to ControlNets"),
        (["generate", "a cat", "--guess-mode"], "--guess-mode apply to ControlNets"),
        (["generate", "a cat", "--controlnet", "cn.safetensors:O.5", "--control-image", "edges.png"], "must be a number, got 'O.5'"),
        (["generate", "a cat", "--controlnet", "cn.safetensors", "--control-image", "bomb.png"], "bomb.png is larger than sd15 allows"),
        (["generate", "a cat", "--controlnet", "cn.safetensors", "--control-image", "big.png"], "big.png is 10000×10000, larger than sd15 allows"),
        (["generate", "a cat", "--controlnet", "cn.safetensors", "--control-image", "dot.png"], "too small"),
        (["generate", "a cat", "--controlnet", "cn.safetensors", "--control-image", "cut.png"], "cannot read the control image cut.png"),
        (["generate", "a cat", "--controlnet", "cn.safetensors", "--control-image", "notes.txt"], "cannot identify image file"),
        (["generate", "a cat", "--controlnet", "cn.safetensors", "--control-image", "folder"], "Is a directory"),
        (["generate", "a cat", "--controlnet", "cn.safetensors", "--control-image", "depth.tiff"], "floating-point image (PIL mode F)"),
        (["generate", "a cat", "--controlnet", "nan.safetensors", "--control-image", "edges.png"], "zero_convs.0.0.weight holds NaN or infinite numbers"),
        (["generate", "a cat", "--controlnet", "evil.pth", "--control-image", "edges.png"], "Refused to load"),
        (["generate", "a cat", "--controlnet", "lora.safetensors", "--control-image", "edges.png"], "is a LoRA adapter"),
        (["generate", "a cat", "--controlnet", "net.png", "--control-image", "edges.png", "-o", "net.png"], "is also an input of this run"),
        (["generate", "a cat", "--from-png", "nan-weight.png", "--controlnet", "cn.safetensors", "--control-image", "edges.png"], "weight must be a finite number"),
        (["generate", "a cat", "--from-png", "late-start.png", "--controlnet", "cn.safetensors", "--control-image", "edges.png"], "got 5 and 1"),
        (["generate", "a cat", "--sampler", "lcm", "--steps", "51"], "lcm takes 1 to 50 steps"),
        (["generate", "a cat", "--sampler", "lcm", "--karras"], "not 'lcm'"),
        (["generate", "a cat", "--sampler", "ddim", "--karras"], "not 'ddim'"),
        (["img2img", "edges.png", "a cat", "--sampler", "lcm", "--steps", "51"], "lcm takes 1 to 50 steps"),
    ]  # fmt: skip
    for args, message in cases:
        defaults = [["--steps", "2"], ["-o", "x.png"]]
        args = [*args, "--model", str(tiny_checkpoint), "--no-safety-checker", *(a for d in defaults if d[0] not in args for a in d)]
        err = refused_before_loading(args, workdir, capsys, monkeypatch)
        assert message in err and "Warning" not in err, (args, err)  # no stray warning from PIL
    assert not (workdir / "pwned").exists()


def _exif_rotated(path, size=(64, 48)):
    """A JPEG stored `size` (64 wide, 48 high) with EXIF Orientation 6: shown 48 wide and 64 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, exif=exif.tobytes())
    return path


def test_exif_rotated_control_images_and_masks_on_the_cli(workdir, tiny_checkpoint, controlnet_state_dict, capsys):
    """The command line reads images as they are shown, as the library does: the output takes an EXIF-rotated
    control image's shown size, and a mask drawn on an EXIF-rotated photo as shown fits it."""
    cn = save_checkpoint(controlnet_state_dict, workdir / "cn.safetensors")
    _exif_rotated(workdir / "photo.jpg")
    Image.new("L", (48, 64), 255).save(workdir / "mask.png")  # drawn over the photo as it is shown
    run = ["--model", str(tiny_checkpoint), "--steps", "2", "--no-progress", "--no-safety-checker"]
    assert main(["generate", "a cat", "--controlnet", str(cn), "--control-image", "photo.jpg", "-o", "a.png", *run]) == 0
    assert main(["inpaint", "photo.jpg", "mask.png", "a cat", "-o", "b.png", *run]) == 0, capsys.readouterr().err
    for name in ("a.png", "b.png"):
        with Image.open(name) as im:
            assert im.size == (48, 64), name


def test_from_png_with_a_controlnet_takes_its_weight_start_and_end(workdir, tiny_checkpoint, controlnet_state_dict, capsys):
    """--from-png of a ControlNet image, with --controlnet FILE and the control image again, makes the same image
    (the PNG's weight, start and end; flags override them); without --controlnet it warns, names escaped."""
    from sd15.pnginfo import read_parameters, save_png

    cn = save_checkpoint(controlnet_state_dict, workdir / "cn.safetensors")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(workdir / "edges.png")
    run = ["--model", str(tiny_checkpoint), "--steps", "3", "--sampler", "ddim", "--no-progress", "--no-safety-checker"]
    assert main(["generate", "a cat", "--controlnet", f"{cn}:0.6", "--control-image", "edges.png", "--control-end", "0.5",
                 "--seed", "3", "-o", "first.png", *run]) == 0  # fmt: skip
    assert main(["generate", "--from-png", "first.png", "--controlnet", str(cn), "--control-image", "edges.png", "-o", "again.png", *run]) == 0
    assert main(["generate", "--from-png", "first.png", "--controlnet", f"{cn}:0.6", "--control-image", "edges.png",
                 "--control-end", "1", "-o", "other.png", *run]) == 0  # fmt: skip
    pixels = {name: np.asarray(Image.open(name)) for name in ("first.png", "again.png", "other.png")}
    assert np.array_equal(pixels["again.png"], pixels["first.png"])
    assert not np.array_equal(pixels["other.png"], pixels["first.png"])  # --control-end 1 overrides the PNG's 0.5
    assert read_parameters("again.png").splitlines()[-1] == read_parameters("first.png").splitlines()[-1]
    capsys.readouterr()
    text = read_parameters("first.png").replace("Model: cn [", "Model: \\u001b[31mcn [")  # an escape sequence in the name
    save_png(Image.new("RGB", (64, 64)), workdir / "escape.png", text)
    assert main(["generate", "--from-png", "escape.png", "-o", "plain.png", *run]) == 0
    err = capsys.readouterr().err
    assert "was made with ControlNet (\\x1b[31mcn)" in err and "\x1b" not in err
