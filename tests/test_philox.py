"""CUDA's torch.randn computed on the CPU (sd15.philox, `rng="nv"`).

Oracles: the numbers torch.randn(3, 4, device="cuda") gives after torch.manual_seed(0) (printed, to 8 digits, in the
web UI's modules/rng_philox.py; float32, so 3e-7 at these magnitudes); and Philox 4x32-10 written out again here
with Python's unbounded integers, one number at a time, for seeds above 2^32 and later draws (bit-equal).
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sd15.cli import main
from sd15.philox import PhiloxGenerator
from sd15.pnginfo import format_parameters, parse_parameters, read_parameters
from sd15.seeds import randn

CUDA_SEED_0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
               [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
               [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]  # fmt: skip
MASK = 0xFFFFFFFF


def reference_normal(seed: int, offset: int, i: int) -> np.float32:
    """Number i of draw `offset`: ten Philox rounds on (offset, 0, i, 0) keyed by the seed's two words, then the
    sine half of Box-Muller on the first two words (the same float32 constants, in double precision)."""
    c = [offset, 0, i, 0]
    k = [seed & MASK, (seed >> 32) & MASK]
    for r in range(10):
        p0, p1 = c[0] * 0xD2511F53, c[2] * 0xCD9E8D57
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK]
        if r < 9:
            k = [(k[0] + 0x9E3779B9) & MASK, (k[1] + 0xBB67AE85) & MASK]
    unit, angle = float(np.float32(2.3283064e-10)), float(np.float32(2.3283064e-10 * 6.2831855))
    return np.float32(math.sqrt(-2.0 * math.log(c[0] * unit + unit / 2)) * math.sin(c[1] * angle + angle / 2))


def test_seed_0_is_what_cuda_draws():
    torch.testing.assert_close(PhiloxGenerator(0).randn((3, 4)), torch.tensor(CUDA_SEED_0), rtol=0, atol=3e-7)


@pytest.mark.parametrize("seed", [0, 1234, 2**32 + 5, 2**63 + 77])
def test_each_number_is_philox_4x32_10(seed):
    g = PhiloxGenerator(seed)
    for offset in range(3):  # each draw is the next offset
        draw = randn((2, 3, 5), g).flatten().numpy()
        assert [draw[i] for i in range(30)] == [reference_normal(seed, offset, i) for i in range(30)], offset
    assert g.offset == 3


def test_the_noise_of_a_run_is_cudas_and_steps_on(tiny_model):
    """rng="nv": the initial noise is the CUDA generator's first draw (Euler draws nothing after it), and an
    ancestral sampler's noise its next draws, reproducibly; not the CPU generator's."""
    run = dict(steps=3, sampler="euler", width=64, height=64, output_type="latent", seed=9)
    nv = tiny_model.generate("a cat", rng="nv", **run)
    assert torch.equal(nv, tiny_model.generate("a cat", latents=PhiloxGenerator(9).randn((1, 4, 8, 8)), **run))
    assert not torch.equal(nv, tiny_model.generate("a cat", **run))
    ancestral = {**run, "sampler": "euler_a"}
    a = tiny_model.generate("a cat", rng="nv", **ancestral)
    assert torch.equal(a, tiny_model.generate("a cat", rng="nv", **ancestral))
    assert not torch.equal(a, tiny_model.generate("a cat", latents=PhiloxGenerator(9).randn((1, 4, 8, 8)), **ancestral))
    with pytest.raises(ValueError, match="rng must be one of cpu, nv"):
        tiny_model.generate("a cat", rng="gpu", **run)


def test_pngs_say_where_the_noise_came_from_as_the_web_ui_does(workdir, tiny_checkpoint, capsys):
    from sd15.pipeline import GenerationSettings

    assert ", RNG: CPU," in format_parameters(GenerationSettings("a cat", "", 20, 7.0, "euler", 5, 512, 512))
    webui = "a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64{}, Version: v1.10.1"
    assert parse_parameters(webui.format(""))["rng"] == "nv"  # its default, the GPU: CUDA's generator
    assert parse_parameters(webui.format(", RNG: NV"))["rng"] == "nv"
    assert parse_parameters(webui.format(", RNG: CPU"))["rng"] == "cpu"
    assert parse_parameters("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, Version: sd15")["rng"] == "cpu"
    run = ["--model", str(tiny_checkpoint), "--no-progress", "--steps", "2", "-W", "64", "-H", "64", "--seed", "5",
           "--sampler", "euler_a"]  # fmt: skip
    assert main(["generate", "a cat", "--rng", "nv", "-o", "nv.png", *run]) == 0
    assert ", RNG: NV," in read_parameters(workdir / "nv.png")
    assert main(["generate", "--from-png", "nv.png", "-o", "again.png", "--model", str(tiny_checkpoint), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(workdir / "again.png")), np.asarray(Image.open(workdir / "nv.png")))
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_with_cudas_generator_the_sde_samplers_draw_as_the_web_ui(sampler):
    """The web UI's SDE samplers take their noise from k-diffusion's BrownianTreeNoiseSampler seeded with the image's
    seed (DPM++ 2M SDE too, where sd15's own draws diffusers' Gaussian steps): with rng="nv" sd15 does the same,
    and equals k-diffusion's sampler given that tree (the model told k-diffusion's timesteps, as test_k_diffusion.py)."""
    import dataclasses

    import k_diffusion_oracle as kd
    from sd15.samplers import plan_sampling
    from test_k_diffusion import SAMPLE_FUNCTIONS, midpoints
    from test_samplers import TOL, FakeEps, latents

    seed, plan = 2**33 + 5, plan_sampling(sampler, 8, karras=True)
    mids = midpoints(sampler, plan.sigmas)
    plan = dataclasses.replace(plan, timesteps=kd.sigma_to_t(plan.sigmas[:-1]),
                               timesteps_mid=None if mids is None else kd.sigma_to_t(mids))  # fmt: skip
    noise = latents(0)
    ours = plan.sample(FakeEps(), plan.noise_latents(noise), generator=PhiloxGenerator(seed))
    sampling, _ = kd.load()
    name, extra, _ = SAMPLE_FUNCTIONS[sampler]
    x = plan.noise_latents(noise)
    tree = sampling.BrownianTreeNoiseSampler(x, plan.sigmas[plan.sigmas > 0].min(), plan.sigmas.max(), seed=seed)
    theirs = getattr(sampling, name)(kd.denoiser(FakeEps()), x, plan.sigmas, disable=True, noise_sampler=tree, **extra)
    assert (ours - theirs).abs().max() < TOL
    cpu = plan.sample(FakeEps(), plan.noise_latents(noise), generator=torch.Generator().manual_seed(seed))
    assert (ours - cpu).abs().max() > 100 * TOL  # the comparison can fail: the CPU generator's noise is another
