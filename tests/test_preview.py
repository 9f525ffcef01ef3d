"""Live previews: the linear latent->RGB approximation, TAESD against diffusers' AutoencoderTiny on random
weights (both file layouts), the step callback, and `--preview` on the command line."""

import numpy as np
import pytest
import torch
from PIL import Image
from reference_models import max_relative_error
from safetensors.torch import save_file

from sd15.cli import main
from sd15.preview import (
    SD15_LATENT_RGB,
    Previewer,
    TAESDDecoder,
    fit_latent_rgb,
    latent_to_rgb,
    load_taesd_decoder,
)


@pytest.fixture(scope="module")
def autoencoder_tiny():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny().eval()  # TAESD's configuration: 64 channels, (3, 3, 3, 1) decoder blocks
    with torch.no_grad():
        for p in model.decoder.parameters():  # default init is near-silent after 20 ReLU layers; widen it
            p.mul_(1.5)
    return model


@pytest.fixture(scope="module")
def taesd_files(autoencoder_tiny, tmp_path_factory):
    """The same weights as a diffusers AutoencoderTiny file and as taesd's own `taesd_decoder.safetensors`."""
    folder = tmp_path_factory.mktemp("taesd")
    state = {k: v.contiguous() for k, v in autoencoder_tiny.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    original = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v for k, v in state.items() if k.startswith("decoder.layers.")}
    save_file(original, str(folder / "taesd_decoder.safetensors"))
    return folder


def test_taesd_matches_diffusers_autoencoder_tiny(autoencoder_tiny, taesd_files):
    z = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        theirs = autoencoder_tiny.decode(z).sample
    for file in ("diffusion_pytorch_model.safetensors", "taesd_decoder.safetensors"):
        ours = load_taesd_decoder(taesd_files / file).decode(z)
        assert ours.shape == theirs.shape == (2, 3, 96, 128)
        assert max_relative_error(ours, theirs) < 1e-5
    assert theirs.std() > 1e-3


def test_taesd_module_names_follow_the_original_file(autoencoder_tiny):
    names = list(TAESDDecoder().state_dict())
    assert names[:2] == ["1.weight", "1.bias"] and names[-2:] == ["19.weight", "19.bias"]
    assert "7.weight" in names and "7.bias" not in names  # the convolution after each upsample has no bias
    assert sum(p.numel() for p in TAESDDecoder().parameters()) == sum(p.numel() for p in autoencoder_tiny.decoder.parameters())


def test_taesd_loading_is_strict(taesd_files, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(taesd_files / "taesd_decoder.safetensors"))
    del state["19.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="19.bias"):
        load_taesd_decoder(tmp_path / "broken.safetensors")


def test_latent_to_rgb_is_the_linear_map():
    z = torch.zeros(1, 4, 2, 3)
    z[0, 0] = 1.0
    z[0, 3, 1, 2] = 1.0
    rgb = latent_to_rgb(z)
    assert rgb.shape == (1, 3, 2, 3)
    assert torch.allclose(rgb[0, :, 0, 0], SD15_LATENT_RGB[0])
    assert torch.allclose(rgb[0, :, 1, 2], SD15_LATENT_RGB[0] + SD15_LATENT_RGB[3])


def test_fitted_coefficients_approximate_the_vae(tiny_model):
    coefficients, bias = fit_latent_rgb(tiny_model.vae, size=32, samples=2)
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5)), size=(32, 32), mode="bicubic")
    with torch.no_grad():
        target = torch.nn.functional.avg_pool2d(tiny_model.vae.decode(z / 0.18215), 8).clamp(-1, 1)
    fitted = (latent_to_rgb(z, coefficients, bias) - target).abs().mean()
    generic = (latent_to_rgb(z) - target).abs().mean()
    assert fitted < 0.7 * generic  # the SD1.5 coefficients are for the real VAE, not this random one


def test_previewer_writes_every_n_steps(tiny_model, tmp_path):
    previewer = Previewer(tmp_path / "live.png", every=2)
    seen = []
    previewer.then = lambda info: seen.append(info["i"])
    tiny_model.generate("a cat", steps=5, sampler="euler", seed=0, width=64, height=48, callback=previewer)
    assert previewer.written == 2 and seen == [0, 1, 2, 3, 4]
    assert Image.open(tmp_path / "live.png").size == (64, 48)
    with pytest.raises(ValueError, match="at least 1"):
        Previewer(tmp_path / "x.png", every=0)



def test_a_preview_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path):
    """A full disk or a vanished folder mid-run used to raise out of the callback and end the run."""
    import warnings

    (tmp_path / "gone").write_text("a file where the preview's folder should be")
    seen = []
    previewer = Previewer(tmp_path / "gone" / "live.png", every=1, then=lambda info: seen.append(info["i"]))
    info = {"i": 0, "denoised": torch.zeros(1, 4, 8, 8)}
    with pytest.warns(UserWarning, match="preview not written to .*live.png.*the run goes on") as caught:
        previewer(info)
        previewer({**info, "i": 1})
    assert len(caught) == 1 and previewer.written == 0 and seen == [0, 1]
    (tmp_path / "gone").unlink()  # the folder can be made again: previews resume
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        previewer({**info, "i": 2})
    assert previewer.written == 1 and Image.open(tmp_path / "gone" / "live.png").size == (64, 64)
    assert [p.name for p in (tmp_path / "gone").iterdir()] == ["live.png"]  # no temporary file left behind


def test_cli_preview(workdir, tiny_checkpoint, taesd_files, capsys):
    args = ["generate", "a cat", "--steps", "3", "--sampler", "euler", "--width", "64", "--height", "64", "--seed", "1",
            "--model", str(tiny_checkpoint), "--no-progress", "--preview", "prev/live.png", "--preview-every", "1"]  # fmt: skip
    assert main([*args, "-o", "a.png"]) == 0
    assert "previews: prev/live.png every 1 steps, by the linear latent approximation" in capsys.readouterr().err
    approx = np.asarray(Image.open(workdir / "prev/live.png"))
    assert approx.shape == (64, 64, 3)
    assert main([*args, "-o", "b.png", "--taesd", str(taesd_files / "taesd_decoder.safetensors")]) == 0
    assert "by TAESD" in capsys.readouterr().err
    assert not np.array_equal(np.asarray(Image.open(workdir / "prev/live.png")), approx)
    assert main([*args, "-o", "c.png", "--taesd", "missing.safetensors"]) == 2
    assert "no TAESD decoder at missing.safetensors" in capsys.readouterr().err
