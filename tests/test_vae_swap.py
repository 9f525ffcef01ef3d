"""A VAE used instead of the checkpoint's (`sd15.load(..., vae=)`, `--vae FILE`), as the web UI's "SD VAE"
setting swaps in vae-ft-mse-840000-ema-pruned: every form a VAE is published in loads the same weights, the
images equal diffusers' with its VAE swapped the same way, the PNG records it, and what is no VAE is refused."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sd15
from reference_models import diffusers_pipeline, diffusers_vae
from sd15 import convert as convert_module
from sd15.checkpoint import UNET_PREFIX, VAE_PREFIX, CheckpointError
from sd15.cli import main
from sd15.pnginfo import content_hash, parse_parameters, read_parameters
from sd15.random_weights import random_checkpoint, save_checkpoint

TOL = 1e-4  # fp32 through a whole pipeline, as tests/test_pipeline.py
PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="module")
def other_state_dict():
    return random_checkpoint("tiny", seed=1)


@pytest.fixture(scope="module")
def vae_files(other_state_dict, tmp_path_factory):
    """The other checkpoint's VAE in each form VAEs are published in: {form: path}."""
    folder = tmp_path_factory.mktemp("vaes")
    bare = {k[len(VAE_PREFIX):]: v for k, v in other_state_dict.items() if k.startswith(VAE_PREFIX)}
    save_file(bare, str(folder / "vae-ft-mse.safetensors"))  # bare keys, as vae-ft-mse-840000-ema-pruned ships
    torch.save({"state_dict": {**{VAE_PREFIX + k: v for k, v in bare.items()},  # prefixed, with training extras
                               "loss.logvar": torch.zeros(())}}, folder / "vae.ckpt")  # fmt: skip
    save_checkpoint(other_state_dict, folder / "other.safetensors")
    convert_module.convert(folder / "other.safetensors", folder / "vae-diffusers", component="vae", progress=False)
    diffusers_file = folder / "diffusers-layout.safetensors"  # a diffusers vae/ file taken out of its folder
    diffusers_file.write_bytes((folder / "vae-diffusers" / "diffusion_pytorch_model.safetensors").read_bytes())
    return {"bare": folder / "vae-ft-mse.safetensors", "ckpt": folder / "vae.ckpt", "folder": folder / "vae-diffusers",
            "diffusers file": diffusers_file, "checkpoint": folder / "other.safetensors"}  # fmt: skip


@pytest.mark.parametrize("form", ["bare", "ckpt", "folder", "diffusers file", "checkpoint"])
def test_every_form_of_a_vae_loads_the_same_weights(tiny_checkpoint, tiny_model, other_state_dict, vae_files, form):
    m = sd15.load(tiny_checkpoint, vae=vae_files[form])
    assert m.vae_path == str(vae_files[form])
    for key, value in m.vae.state_dict().items():
        assert torch.equal(value, other_state_dict[VAE_PREFIX + key].reshape(value.shape)), key
    for ours, theirs in ((m.unet, tiny_model.unet), (m.text_encoder, tiny_model.text_encoder)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert tiny_model.vae_path is None
    assert not torch.equal(m.vae.decoder.conv_out.weight, tiny_model.vae.decoder.conv_out.weight)  # really swapped


def test_images_equal_diffusers_with_the_vae_swapped(tiny_checkpoint, tiny_state_dict, other_state_dict, vae_files, tmp_path):
    m = sd15.load(tiny_checkpoint, vae=vae_files["bare"])
    reference = diffusers_pipeline(tiny_state_dict, m, tmp_path)
    reference.vae = diffusers_vae(other_state_dict, m.vae.config)  # diffusers' own converter, from the other file
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = m.generate(PROMPT, steps=4, latents=latents, width=64, height=64, output_type="np")
    theirs = reference(PROMPT, num_inference_steps=4, latents=latents, width=64, height=64, output_type="np").images
    own = sd15.load(tiny_checkpoint).generate(PROMPT, steps=4, latents=latents, width=64, height=64, output_type="np")
    assert np.abs(ours - theirs).max() < TOL
    assert np.abs(ours - own).max() > 0.01  # the swapped VAE decodes differently: the comparison can fail

    image = Image.fromarray((ours[0] * 255).round().astype(np.uint8))  # img2img encodes with the swapped VAE too
    ours = m.img2img(image, PROMPT, strength=0.5, steps=4, seed=3, output_type="np")
    img2img = diffusers_pipeline(tiny_state_dict, m, tmp_path, "StableDiffusionImg2ImgPipeline")
    img2img.vae = reference.vae
    theirs = img2img(PROMPT, image=image, strength=0.5, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                     output_type="np").images  # fmt: skip
    assert np.abs(ours - theirs).max() < TOL


def test_a_checkpoint_published_without_a_vae_loads_with_one(tiny_state_dict, vae_files, tmp_path):
    no_vae = save_checkpoint({k: v for k, v in tiny_state_dict.items() if not k.startswith(VAE_PREFIX)}, tmp_path / "no-vae.safetensors")
    with pytest.raises(CheckpointError, match=r"no vae weights; use a full SD1.x checkpoint or pass a VAE file \(vae=, --vae\)"):
        sd15.load(no_vae)
    m = sd15.load(no_vae, vae=vae_files["bare"])
    assert m.generate(PROMPT, steps=1, width=64, height=64, seed=0, output_type="np").shape == (1, 64, 64, 3)


def test_what_is_no_usable_vae_is_refused(tiny_checkpoint, tiny_state_dict, other_state_dict, tmp_path):
    with pytest.raises(CheckpointError, match="No such VAE file or folder: .*missing.safetensors"):
        sd15.load(tiny_checkpoint, vae=tmp_path / "missing.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="LoRA.*not a VAE; pass a VAE file"):
        sd15.load(tiny_checkpoint, vae=tmp_path / "lora.safetensors")
    unet_only = {k: v for k, v in tiny_state_dict.items() if k.startswith(UNET_PREFIX)}
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="not a VAE"):
        sd15.load(tiny_checkpoint, vae=tmp_path / "unet.safetensors")
    bare = {k[len(VAE_PREFIX):]: v for k, v in other_state_dict.items() if k.startswith(VAE_PREFIX)}
    wide = {k: v for k, v in bare.items()}  # a 16-channel latent space, as newer models' VAEs have
    for key in ("encoder.conv_out.weight", "encoder.conv_out.bias"):
        wide[key] = torch.zeros((32,) + tuple(bare[key].shape[1:]))
    wide["quant_conv.weight"], wide["quant_conv.bias"] = torch.zeros(32, 32, 1, 1), torch.zeros(32)
    wide["post_quant_conv.weight"], wide["post_quant_conv.bias"] = torch.zeros(16, 16, 1, 1), torch.zeros(16)
    wide["decoder.conv_in.weight"] = torch.zeros((bare["decoder.conv_in.weight"].shape[0], 16, 3, 3))
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="has 16 latent channels.*4-channel latents"):
        sd15.load(tiny_checkpoint, vae=tmp_path / "wide.safetensors")
    broken = dict(bare)
    del broken["decoder.conv_out.bias"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        sd15.load(tiny_checkpoint, vae=tmp_path / "broken.safetensors")


def test_cli_records_the_vae_and_from_png_says_when_another_is_used(workdir, tiny_checkpoint, vae_files, capsys):
    vae = vae_files["bare"]
    args = ["--steps", "2", "-W", "64", "-H", "64", "--seed", "5", "--model", str(tiny_checkpoint), "--no-progress"]
    assert main(["generate", PROMPT, *args, "--vae", str(vae), "-o", "swapped.png"]) == 0
    fields = parse_parameters(read_parameters(workdir / "swapped.png"))["fields"]
    assert fields["VAE hash"] == content_hash(vae) and fields["VAE"] == "vae-ft-mse.safetensors"
    assert fields["VAE hash"] != content_hash(tiny_checkpoint)[:10]
    expected = sd15.load(tiny_checkpoint, vae=vae).generate(PROMPT, steps=2, width=64, height=64, seed=5)[0]
    assert np.array_equal(np.asarray(Image.open(workdir / "swapped.png")), np.asarray(expected))
    capsys.readouterr()

    assert main(["generate", "--from-png", "swapped.png", "--model", str(tiny_checkpoint), "-o", "own.png", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "was decoded with the VAE vae-ft-mse.safetensors [" in err and "give --vae FILE" in err
    assert "VAE" not in read_parameters(workdir / "own.png")
    assert main(["generate", "--from-png", "swapped.png", "--model", str(tiny_checkpoint), "--vae", str(vae_files["ckpt"]),
                 "-o", "ckpt.png", "--no-progress"]) == 0  # fmt: skip
    assert f"--vae {vae_files['ckpt']} is another file" in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(workdir / "ckpt.png")), np.asarray(expected))  # the same weights
    assert main(["generate", "--from-png", "swapped.png", "--model", str(tiny_checkpoint), "--vae", str(vae),
                 "-o", "again.png", "--no-progress"]) == 0  # fmt: skip
    assert "VAE" not in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(workdir / "again.png")), np.asarray(expected))

    assert main(["generate", PROMPT, *args, "--vae", "missing.safetensors", "-o", "x.png"]) == 2
    assert "no such VAE file: missing.safetensors" in capsys.readouterr().err and not (workdir / "x.png").exists()


def test_batch_ids_and_pngs_follow_the_vae(workdir, tiny_checkpoint, vae_files):
    (workdir / "prompts.jsonl").write_text('{"prompt": "a red cube", "seed": 1}\n')
    common = ["batch", "prompts.jsonl", "--model", str(tiny_checkpoint), "--steps", "1", "-W", "64", "-H", "64", "--no-progress"]
    assert main([*common, "--out", "own"]) == 0
    assert main([*common, "--out", "swapped", "--vae", str(vae_files["bare"])]) == 0
    (own,), (swapped,) = (sorted((workdir / d).glob("*.png")) for d in ("own", "swapped"))
    assert own.name != swapped.name  # a rerun with another VAE makes its images anew
    fields = parse_parameters(read_parameters(swapped))["fields"]
    assert fields["VAE"] == "vae-ft-mse.safetensors" and fields["VAE hash"] == content_hash(vae_files["bare"])
    assert "VAE" not in read_parameters(own)
