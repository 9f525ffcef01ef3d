"""Seamless images (sd15.seamless, the web UI's "Tiling"): with circular padding the UNet and the VAE decoder
have no border, so the whole text-to-image pipeline is equivariant to circular shifts. The tiny model's UNet
downsamples twice (4 latent positions) and its VAE 8×, so a start shifted by 4 latent positions gives the image
shifted by 32 pixels. That holds to float rounding (GroupNorm's sums run in another order: 1e-4 on [0, 1]
pixels) only if every convolution wraps around; with zero padding the edges differ by far more.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from sd15.cli import main
from sd15.pnginfo import parse_parameters, read_parameters

RUN = dict(steps=3, sampler="euler", width=128, height=96, output_type="np", guidance_scale=7.5)


def shifted_pair(model, seamless: bool):
    noise = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    start = model.generate("a cat", latents=noise, seamless=seamless, **RUN)[0]
    moved = model.generate("a cat", latents=torch.roll(noise, (4, 8), dims=(2, 3)), seamless=seamless, **RUN)[0]
    return np.roll(start, (32, 64), axis=(0, 1)), moved


def test_a_shifted_start_gives_the_shifted_image(tiny_model):
    expected, moved = shifted_pair(tiny_model, seamless=True)
    assert np.abs(expected - moved).max() < 1e-4
    expected, moved = shifted_pair(tiny_model, seamless=False)  # the comparison can fail: zero padding has edges
    assert np.abs(expected - moved).max() > 1e-2


def test_the_padding_is_restored_after_the_call_and_after_a_refusal(tiny_model):
    convs = [m for part in (tiny_model.unet, tiny_model.vae) for m in part.modules() if isinstance(m, torch.nn.Conv2d)]
    image = tiny_model.generate("a cat", steps=1, width=64, height=64, seamless=True)[0]
    assert image.info["sd15"].seamless and {m.padding_mode for m in convs} == {"zeros"}
    with pytest.raises(ValueError, match="steps must be"):
        tiny_model.generate("a cat", steps=0, seamless=True)
    assert {m.padding_mode for m in convs} == {"zeros"}
    with pytest.raises(ValueError, match="seamless must be True or False"):
        tiny_model.generate("a cat", steps=1, seamless="yes")


def test_img2img_inpaint_and_hires_take_it(tiny_model):
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    run = dict(steps=2, seed=3, sampler="euler")
    for name, call in {
        "img2img": lambda **kw: tiny_model.img2img(image, "a cat", strength=0.8, **kw),
        "inpaint": lambda **kw: tiny_model.inpaint(image, mask, "a cat", **kw),
        "hires_fix": lambda **kw: tiny_model.hires_fix("a cat", width=64, height=64, scale=1.5, **kw),
    }.items():
        plain, seamless = call(**run, output_type="np"), call(**run, output_type="np", seamless=True)
        assert not np.array_equal(plain, seamless), name
        assert call(**run, seamless=True)[0].info["sd15"].seamless, name


def test_the_png_says_tiling_and_from_png_makes_the_image_again(workdir, tiny_checkpoint, capsys):
    run = ["--model", str(tiny_checkpoint), "--no-progress", "--steps", "2", "-W", "64", "-H", "64", "--seed", "5"]
    assert main(["generate", "a cat", "--seamless", "-o", "s.png", *run]) == 0
    assert ", Tiling: True," in read_parameters(workdir / "s.png")
    assert main(["generate", "--from-png", "s.png", "-o", "again.png", "--model", str(tiny_checkpoint), "--no-progress"]) == 0
    assert "does not apply" not in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(workdir / "again.png")), np.asarray(Image.open(workdir / "s.png")))
    assert parse_parameters("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, Tiling: True, Version: v1.10.1")["seamless"]
    (workdir / "jobs.jsonl").write_text('"a cat"\n')
    assert main(["batch", "jobs.jsonl", "--out", "out", "--model", str(tiny_checkpoint), "--seamless"]) == 2
    assert "batch does not take --seamless" in capsys.readouterr().err
