"""Parity of sd15's UNet, VAE and CLIP text encoder with diffusers 0.42.1 and transformers 5.17.0.

The same random original-layout weights go into sd15 (by name, no mapping) and into the reference
models (through diffusers' own converters). Outputs are compared in fp32, as the largest absolute
difference relative to the output's largest magnitude. TOL = 1e-4: fp32 carries ~7 significant digits
(eps 1.2e-7), and the two implementations sum in different orders (fused vs. separate q/k/v, SDPA vs.
explicit softmax) through tens of layers, which leaves differences of 1e-6..1e-5 relative; a real
mistake (a wrong eps, a swapped tensor, a transposed head split) shows as 1e-2 or more.
"""

import pytest
import torch

from reference_models import diffusers_unet, diffusers_vae, max_relative_error, transformers_clip
from sd15.checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from sd15.random_weights import random_checkpoint

TOL = 1e-4


def test_unet_matches_diffusers(tiny_model, tiny_state_dict):
    ref = diffusers_unet(tiny_state_dict, tiny_model.unet.config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([981.0, 1.0])
    ctx = torch.randn(2, 77, tiny_model.unet.config.context_dim, generator=g)
    with torch.no_grad():
        ours = tiny_model.unet(x, t, ctx)
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
    assert ours.shape == (2, 4, 16, 16)
    assert max_relative_error(ours, theirs) < TOL


@pytest.mark.parametrize("size", [(13, 21), (10, 6), (7, 7)])
def test_unet_any_latent_size_matches_diffusers(tiny_model, tiny_state_dict, size):
    """Latent sides not divisible by 4 (the tiny model downsamples twice): upsample to the skip's size."""
    ref = diffusers_unet(tiny_state_dict, tiny_model.unet.config)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, *size, generator=g)
    ctx = torch.randn(1, 77, tiny_model.unet.config.context_dim, generator=g)
    with torch.no_grad():
        ours = tiny_model.unet(x, torch.tensor([500.5]), ctx)
        theirs = ref(x, torch.tensor([500.5]), encoder_hidden_states=ctx).sample
    assert ours.shape == x.shape
    assert max_relative_error(ours, theirs) < TOL


def test_ema_unet_matches_diffusers_extract_ema(tiny_checkpoint, tiny_state_dict):
    import sd15

    m = sd15.load(tiny_checkpoint, ema=True)
    ref = diffusers_unet(tiny_state_dict, m.unet.config, extract_ema=True)
    plain = diffusers_unet(tiny_state_dict, m.unet.config)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 48, generator=g)
    with torch.no_grad():
        ours = m.unet(x, torch.tensor([10]), ctx)
        theirs = ref(x, torch.tensor([10]), encoder_hidden_states=ctx).sample
        not_ema = plain(x, torch.tensor([10]), encoder_hidden_states=ctx).sample
    assert max_relative_error(ours, theirs) < TOL
    assert max_relative_error(ours, not_ema) > 10 * TOL  # the EMA copy really was the one loaded


def test_vae_matches_diffusers(tiny_model, tiny_state_dict):
    ref = diffusers_vae(tiny_state_dict, tiny_model.vae.config)
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        post = tiny_model.vae.encode(images)
        ref_post = ref.encode(images).latent_dist
        z = torch.randn(2, 4, 6, 10, generator=g)
        decoded, ref_decoded = tiny_model.vae.decode(z), ref.decode(z).sample
    assert post.mean.shape == (2, 4, 4, 6)  # the VAE downsamples by 8
    assert max_relative_error(post.mean, ref_post.mean) < TOL
    assert max_relative_error(post.logvar, ref_post.logvar) < TOL
    assert decoded.shape == (2, 3, 48, 80)
    assert max_relative_error(decoded, ref_decoded) < TOL


def test_vae_sample_uses_callers_generator(tiny_model):
    images = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        post = tiny_model.vae.encode(images)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    expected = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, expected)


def test_clip_matches_transformers(tiny_model, tiny_state_dict):
    ref = transformers_clip(tiny_state_dict, tiny_model.text_encoder.config)
    ids = tiny_model.tokenizer(["a photo of an astronaut riding a horse on mars", ""])
    with torch.no_grad():
        ours = tiny_model.text_encoder(ids)
        out = ref(ids, output_hidden_states=True)
        skip2 = tiny_model.text_encoder(ids, clip_skip=2)
    assert ours.shape == (2, 77, 48)
    assert max_relative_error(ours, out.last_hidden_state) < TOL
    # CLIP skip 2: the penultimate layer's hidden state, passed through final_layer_norm
    penultimate = ref.final_layer_norm(out.hidden_states[-2])
    assert max_relative_error(skip2, penultimate) < TOL
    states = tiny_model.text_encoder.hidden_states(ids)
    assert len(states) == len(out.hidden_states)
    for mine, theirs in zip(states, out.hidden_states):
        assert max_relative_error(mine, theirs) < TOL


@pytest.fixture(scope="module")
def full_state_dict():
    return random_checkpoint("full", seed=0)


@pytest.mark.full_size
def test_full_size_unet_matches_diffusers_at_small_latent(full_state_dict):
    """The real SD1.5 shapes (860M parameters) at a 16×16 latent, so the default suite stays fast."""
    import sd15.model as model_module
    from sd15.unet import UNet, UNetConfig

    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in full_state_dict.items() if k.startswith(UNET_PREFIX)}
    ours = UNet(UNetConfig.from_state_dict(unet_sd))
    ours.load_state_dict(unet_sd, strict=True)
    assert ours.config == UNetConfig()
    ref = diffusers_unet(full_state_dict, ours.config)
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        a = ours(x, torch.tensor([700]), ctx)
        b = ref(x, torch.tensor([700]), encoder_hidden_states=ctx).sample
    del ours, ref
    assert max_relative_error(a, b) < TOL
    assert model_module  # the module under test is importable without the references


@pytest.mark.full_size
def test_full_size_vae_and_clip_match_references(full_state_dict):
    from sd15.clip import CLIPTextConfig, CLIPTextModel
    from sd15.vae import AutoencoderKL, VAEConfig

    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in full_state_dict.items() if k.startswith(VAE_PREFIX)}
    vae = AutoencoderKL(VAEConfig.from_state_dict(vae_sd))
    vae.load_state_dict(vae_sd, strict=True)
    ref_vae = diffusers_vae(full_state_dict, vae.config)
    g = torch.Generator().manual_seed(6)
    images, z = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        assert max_relative_error(vae.encode(images).mean, ref_vae.encode(images).latent_dist.mean) < TOL
        assert max_relative_error(vae.decode(z), ref_vae.decode(z).sample) < TOL

    clip_sd = {k[len(CLIP_PREFIX):]: v for k, v in full_state_dict.items() if k.startswith(CLIP_PREFIX)}
    clip = CLIPTextModel(CLIPTextConfig.from_state_dict(clip_sd))
    clip.load_state_dict(clip_sd, strict=True)
    ref_clip = transformers_clip(full_state_dict, clip.config)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    with torch.no_grad():
        assert max_relative_error(clip(ids), ref_clip(ids).last_hidden_state) < TOL
