"""High-resolution fix: native-size first pass, upscale, image-to-image refinement."""

import numpy as np
import pytest
import torch
from PIL import Image

from sd15.cli import main
from sd15.hires import upscaled_size

KW = dict(steps=3, sampler="euler", seed=4, width=64, height=48)


def test_first_pass_is_generate_and_output_is_upscaled(tiny_model):
    first = []
    out = tiny_model.hires_fix("a castle", scale=2.0, strength=0.6, callback=lambda info: first.append(info) if info["pass"] == 1 else None, **KW)
    assert out[0].size == (128, 96)
    assert out[0].info["sd15_hires"] == {"scale": 2.0, "steps": 3, "upscaler": "lanczos", "width": 128, "height": 96}
    assert out[0].info["sd15"].width == 64 and out[0].info["sd15"].strength == 0.6
    plain = tiny_model.generate("a castle", output_type="latent", **KW)
    assert torch.allclose(first[-1]["x"], plain)  # pass 1 is exactly text-to-image at the native size
    again = tiny_model.hires_fix("a castle", scale=2.0, strength=0.6, **KW)
    assert np.array_equal(np.asarray(out[0]), np.asarray(again[0]))


@pytest.mark.parametrize("upscaler", ["lanczos", "latent"])
def test_second_pass_refines_the_upscaled_first(tiny_model, upscaler, monkeypatch):
    """Pass 2 is image-to-image from the first pass's latents upscaled: int(steps · strength) steps at the new size."""
    import sd15.hires as hires

    recorded = {}
    real = hires.upscale_latents

    def spy(m, latents, width, height, how, generators):
        recorded["in"], recorded["out"] = latents.clone(), real(m, latents, width, height, how, generators)
        return recorded["out"]

    monkeypatch.setattr(hires, "upscale_latents", spy)
    second = []
    callback = lambda info: second.append(info["x"].shape) if info["pass"] == 2 else None
    out = tiny_model.hires_fix("a castle", scale=2.0, strength=0.5, hires_steps=4, upscaler=upscaler, output_type="np",
                               callback=callback, **KW)[0]  # fmt: skip
    assert out.shape == (96, 128, 3)
    assert torch.equal(recorded["in"], tiny_model.generate("a castle", output_type="latent", **KW))
    assert recorded["out"].shape == (1, 4, 12, 16)
    if upscaler == "latent":
        expected = torch.nn.functional.interpolate(recorded["in"], size=(12, 16), mode="bilinear")
        assert torch.allclose(recorded["out"], expected)
    else:  # decoded, Lanczos-enlarged, encoded (random weights: the VAE round trip keeps little)
        assert not torch.allclose(recorded["out"], torch.nn.functional.interpolate(recorded["in"], size=(12, 16), mode="bilinear"))
    assert second == [(1, 4, 12, 16)] * 2  # int(4 · 0.5) steps


def test_sizes_and_refusals(tiny_model):
    assert upscaled_size(512, 512, 1.5) == (768, 768)
    assert upscaled_size(512, 768, 1.3) == (664, 1000)
    with pytest.raises(ValueError, match="between 1 and 4"):
        tiny_model.hires_fix("a", scale=5, **KW)
    with pytest.raises(ValueError, match="upscaler"):
        tiny_model.hires_fix("a", upscaler="esrgan", **KW)
    with pytest.raises(ValueError, match="strength"):
        tiny_model.hires_fix("a", strength=0, **KW)


def test_cli_hires(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SD15_SAFETY_CHECKER", raising=False)
    assert main(["generate", "a castle", "--steps", "2", "--width", "64", "--height", "64", "--hires-scale", "1.5",
                 "--hires-steps", "2", "--model", str(tiny_checkpoint), "-o", "big.png", "--no-progress"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "big.png").size == (96, 96)


def test_hires_settings_are_recorded_and_reproduced_from_the_png(workdir, tiny_checkpoint):
    from sd15.pnginfo import parse_parameters, read_parameters

    args = ["--steps", "2", "--width", "64", "--height", "64", "--model", str(tiny_checkpoint), "--no-progress", "--seed", "5"]
    assert main(["generate", "a castle", "--hires-scale", "1.5", "--hires-steps", "3", "--hires-strength", "0.4",
                 "--hires-upscaler", "latent", "-o", "big.png", *args]) == 0  # fmt: skip
    text = read_parameters(workdir / "big.png")
    assert "Size: 64x64" in text and "Denoising strength: 0.4" in text  # the web UI's convention: the first pass's size
    assert "Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent" in text
    parsed = parse_parameters(text)
    assert (parsed["hires_scale"], parsed["hires_steps"], parsed["hires_upscaler"], parsed["strength"]) == (1.5, 3, "latent", 0.4)
    assert main(["generate", "--from-png", "big.png", "-o", "again.png", "--model", str(tiny_checkpoint), "--no-progress"]) == 0
    again = Image.open(workdir / "again.png")
    assert again.size == (96, 96)
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(workdir / "big.png")))


def test_a_png_asking_for_an_upscaler_sd15_lacks_is_refused(workdir, tiny_checkpoint, capsys):
    from sd15.pnginfo import save_png

    text = "a castle\nSteps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 1, Size: 64x64, Denoising strength: 0.5, " \
           "Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+"
    save_png(Image.new("RGB", (8, 8)), workdir / "a1111.png", text)
    assert main(["generate", "--from-png", "a1111.png", "--model", str(tiny_checkpoint), "-o", "x.png"]) == 2
    assert "R-ESRGAN 4x+" in capsys.readouterr().err and not (workdir / "x.png").exists()
