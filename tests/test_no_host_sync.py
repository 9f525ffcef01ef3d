"""The denoising loop never reads a value back from the model's device.

On a GPU, a read back (`.item()`, `bool(t)`, `float(t)`, `.cpu()` of a device tensor) makes the CPU wait
until the GPU has finished all the work queued so far, so the next step's launches (or its CUDA-graph
replay) cannot be queued ahead: the GPU idles between steps. The CPU has no such wait to observe, so the
loop runs here on PyTorch's meta device: tensors with shapes and dtypes but no data, where every read back
raises. Only the schedule (timesteps and sigmas, CPU tensors made before the loop) is read as numbers.
(Emphasis in a prompt is decided from the token weights on the host for the same reason.)
"""

import pytest
import torch

import sd15
from sd15 import pipeline
from sd15.random_weights import random_checkpoint, save_checkpoint
from sd15.samplers import SAMPLERS, plan_sampling
from sd15.seeds import NoiseSeeds

META = torch.device("meta")


@pytest.fixture(scope="module")
def meta_model(tiny_checkpoint):
    m = sd15.load(tiny_checkpoint, fast=False)
    m.unet.to(META)  # the UNet's weights become shapes only
    return m


def _context(m, batch=1):
    return torch.zeros(batch, 77, m.unet.config.context_dim, device=META)  # (B, T, D), as the text encoder gives


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_with_guidance_runs_without_reading_the_device(meta_model, sampler):
    m = meta_model
    calls = []
    handle = m.unet.register_forward_hook(lambda module, args, out: calls.append(out.device))
    try:
        eps_model = pipeline.guided_eps_model(m, _context(m, 2), _context(m, 2), guidance_scale=7.5)
        plan = plan_sampling(sampler, 4)
        noise = torch.zeros(2, 4, 8, 8, device=META)
        steps_seen = []
        out = plan.sample(eps_model, plan.noise_latents(noise), generator=torch.Generator().manual_seed(0),
                          callback=lambda info: steps_seen.append(info["i"]))  # fmt: skip
    finally:
        handle.remove()
    assert out.device == META and out.shape == (2, 4, 8, 8)
    assert calls and all(device == META for device in calls)  # the UNet itself ran, on meta
    assert steps_seen == list(range(len(plan.timesteps)))  # PNDM reports its warm-up's extra evaluation too


def test_the_pipeline_from_prompts_to_latents_runs_without_reading_the_device(tiny_checkpoint):
    """Prompt encoding (emphasis, BREAK, prompt editing, negative prompts), guidance, per-image generators,
    the progress bar and the step callback: the whole denoising stage of `generate`, on the meta device."""
    m = sd15.load(tiny_checkpoint, fast=False)
    m.unet.to(META)
    m.text_encoder.to(META)
    plan = plan_sampling("euler_a", 4)
    seen = []
    latents = pipeline._denoise(
        m, plan, ["a [cat:dog:2]", "a (red:1.2) car BREAK blue sky"], ["", "blurry"],
        torch.zeros(2, 4, 8, 8, device=META), NoiseSeeds.make(5, 2).generators(), 7.5, 1,
        callback=lambda info: seen.append((info["i"], list(info["images"]))), progress=True,
    )  # fmt: skip
    assert latents.device == META and latents.shape == (2, 4, 8, 8)
    assert seen == [(i, [image]) for image in (0, 1) for i in range(4)]


def test_inpainting_conditioning_and_img2img_start_run_without_reading_the_device(tmp_path):
    """The inpainting UNet's mask and masked-image latents are appended at every call; img2img starts part-way."""
    m = sd15.load(save_checkpoint(random_checkpoint("tiny", seed=3, inpainting=True), tmp_path / "inpainting.safetensors"))
    m.unet.to(META)
    assert m.unet.config.in_channels == 9
    concat = torch.zeros(1, 5, 8, 8, device=META)  # (B, mask + masked latent, h, w)
    eps_model = pipeline.guided_eps_model(m, _context(m), _context(m), guidance_scale=5.0, concat=concat)
    plan = plan_sampling("dpmpp_2m", 6, strength=0.5)
    start = plan.noise_latents(torch.zeros(1, 4, 8, 8, device=META), init_latents=torch.zeros(1, 4, 8, 8, device=META))
    assert plan.start == 3 and plan.sample(eps_model, start).device == META


def test_a_read_back_in_the_loop_would_be_caught(meta_model):
    """What the tests above rely on: a loop that looks at a device value fails on meta tensors."""
    plan = plan_sampling("euler", 3)

    def eps_model_that_checks_for_nan(x, t):
        if torch.isnan(x).any():  # bool() of a device tensor: a read back
            raise FloatingPointError
        return x

    with pytest.raises(RuntimeError, match="meta"):
        plan.sample(eps_model_that_checks_for_nan, torch.zeros(1, 4, 8, 8, device=META))
