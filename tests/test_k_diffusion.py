"""The k-diffusion family against k-diffusion itself (0.1.1.post1, see k_diffusion_oracle.py).

diffusers has no scheduler for DPM++ 2S a and DPM++ 3M SDE, so k-diffusion's `sample_dpmpp_2s_ancestral` and
`sample_dpmpp_3m_sde` are their oracle: same sigmas, same model (the FakeEps of test_samplers.py behind
k-diffusion's own eps-model wrapper), same noise (drawn from the same seeded generator, or the same Brownian
tree). The samplers that test_samplers.py checks against diffusers are checked against k-diffusion here too, on
sd15's grids: two independent implementations agreeing with each other and with sd15.

Tolerance: 1e-4 on latents of size ~1, as test_samplers.py (float32 throughout; where k-diffusion and diffusers
round a midpoint differently, its timestep moves in the last bits, and the result by ~1e-6).
"""

import dataclasses

import pytest
import torch

import k_diffusion_oracle as kd
from sd15 import samplers
from sd15.samplers import plan_sampling
from test_samplers import SHAPE, TOL, FakeEps, latents

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # torchsde clamping k-diffusion's tree ends

K_ONLY = ["dpmpp_2s_a", "dpmpp_3m_sde"]  # no diffusers scheduler: k-diffusion is their only oracle
SAMPLE_FUNCTIONS = {  # sd15 sampler -> (k-diffusion function, its extra arguments, its noise)
    "euler": ("sample_euler", {}, None),
    "euler_a": ("sample_euler_ancestral", {}, "gaussian"),
    "heun": ("sample_heun", {}, None),
    "dpm_2": ("sample_dpm_2", {}, None),
    "dpm_2_a": ("sample_dpm_2_ancestral", {}, "gaussian"),
    "lms": ("sample_lms", {}, None),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, None),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {"solver_type": "midpoint"}, "gaussian"),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, "gaussian"),
    "dpmpp_sde": ("sample_dpmpp_sde", {}, "brownian"),
    "dpmpp_2s_a": ("sample_dpmpp_2s_ancestral", {}, "gaussian"),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}, "brownian"),
}


def midpoints(sampler: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Where each step of `sampler` evaluates the model a second time (0: no second evaluation)."""
    if sampler in ("dpm_2", "dpm_2_a"):
        return samplers.dpm_2_midpoints(sigmas, ancestral=sampler == "dpm_2_a")
    if sampler == "dpmpp_2s_a":
        return samplers.dpmpp_2s_a_midpoints(sigmas)
    if sampler == "dpmpp_sde":
        return torch.where(sigmas[1:] > 0, (sigmas[:-1] * sigmas[1:]).sqrt(), 0.0)
    return None


def k_plan(sampler, steps, strength=1.0, karras=False) -> samplers.SamplingPlan:
    """sd15's plan with every timestep the model is told replaced by k-diffusion's `sigma_to_t` of its sigma, as
    k-diffusion's model wrapper tells it. sd15's grids are diffusers' (Euler's interpolates sigma linearly in t,
    not log sigma, so its timesteps differ from k-diffusion's in the third decimal): this compares the samplers,
    not the grids, which test_samplers.py compares with diffusers."""
    plan = plan_sampling(sampler, steps, strength, karras=karras)
    mids = midpoints(sampler, plan.sigmas)
    return dataclasses.replace(plan, timesteps=kd.sigma_to_t(plan.sigmas[:-1]),
                               timesteps_mid=None if mids is None else kd.sigma_to_t(mids))  # fmt: skip


def run_ours_k_grid(sampler, steps, noise, init=None, strength=1.0, seed=7, karras=False):
    plan, model = k_plan(sampler, steps, strength, karras), FakeEps()
    x = plan.sample(model, plan.noise_latents(noise, init), generator=torch.Generator().manual_seed(seed))
    return x, model.seen


def run_k_diffusion(sampler, steps, noise, init=None, strength=1.0, seed=7, karras=False):
    """k-diffusion's sampler on sd15's plan (its sigmas from the img2img start on, its starting latent); returns
    (x, timesteps the model saw) as test_samplers.run_ours does."""
    sampling, _ = kd.load()
    name, extra, noise_kind = SAMPLE_FUNCTIONS[sampler]
    plan = plan_sampling(sampler, steps, strength, karras=karras)
    model = FakeEps()
    x = plan.noise_latents(noise, init)
    if noise_kind == "gaussian":
        extra = {**extra, "noise_sampler": kd.gaussian_noise(torch.Generator().manual_seed(seed), x.shape)}
    elif noise_kind == "brownian":  # the tree spans the whole schedule, also in img2img (as sd15 and diffusers)
        extra = {**extra, "noise_sampler": kd.brownian_noise(x, plan.sigmas, seed)}
    x = getattr(sampling, name)(kd.denoiser(model), x, plan.sigmas[plan.start :], disable=True, **extra)
    return x, model.seen  # it ends at sigma = 0, where x is the VP latent


def assert_close_runs(ours, ref):
    (x, seen), (x_ref, seen_ref) = ours, ref
    assert seen == pytest.approx(seen_ref, abs=1e-3), "the model was called at different timesteps"
    assert (x - x_ref).abs().max().item() < TOL


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize(
    "sampler, steps",  # k-diffusion's 3M SDE cannot take 1 step (an UnboundLocalError): see the next test
    [(s, n) for s in K_ONLY for n in (1, 2, 3, 6, 20, 50) if (s, n) != ("dpmpp_3m_sde", 1)],
)
def test_txt2img_parity(sampler, steps, karras):
    noise = latents(0)
    assert_close_runs(run_ours_k_grid(sampler, steps, noise, karras=karras), run_k_diffusion(sampler, steps, noise, karras=karras))


@pytest.mark.parametrize("steps, strength", [(1, 1.0), (2, 0.5), (100, 0.01)])
@pytest.mark.parametrize("sampler", K_ONLY)
def test_one_step_is_the_denoised_estimate(sampler, steps, strength):
    """A run of one step goes from its sigma to 0: x = D(x; sigma), k-diffusion's denoiser output there."""
    noise, init = latents(0), (latents(1, 0.8) if strength < 1 else None)
    plan = k_plan(sampler, steps, strength)
    x_start = plan.noise_latents(noise, init)
    expected = kd.denoiser(FakeEps())(x_start, plan.sigmas[plan.start : plan.start + 1])
    x, seen = run_ours_k_grid(sampler, steps, noise, init, strength)
    assert seen == pytest.approx([float(plan.timesteps[plan.start])]) and (x - expected).abs().max() < TOL


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize(
    "sampler, steps, strength",  # one step run (2 at 0.5, 100 at 0.01) fails in k-diffusion's 3M SDE, as above
    [(s, n, x) for s in K_ONLY for n, x in [(20, 0.3), (20, 0.75), (50, 0.5), (2, 0.5), (100, 0.01)]
     if s != "dpmpp_3m_sde" or n * x >= 2],
)  # fmt: skip
def test_img2img_parity(sampler, steps, strength, karras):
    noise, init = latents(0), latents(1, 0.8)
    ours = run_ours_k_grid(sampler, steps, noise, init, strength, karras=karras)
    assert_close_runs(ours, run_k_diffusion(sampler, steps, noise, init, strength, karras=karras))


def test_999_steps_parity():
    """The most steps the grid has. DPM++ 2S a only: 3M SDE's Brownian tree over 999 intervals takes 10 s, and
    and each of its steps is a step of the 50-step run (test_txt2img_parity), only shorter."""
    sampler, noise = "dpmpp_2s_a", latents(0)
    assert_close_runs(run_ours_k_grid(sampler, 999, noise), run_k_diffusion(sampler, 999, noise))


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sampler", [s for s in SAMPLE_FUNCTIONS if s not in K_ONLY])
def test_the_diffusers_checked_samplers_agree_with_k_diffusion(sampler, karras):
    """The samplers test_samplers.py checks against diffusers, against k-diffusion's functions on the same grid.
    dpmpp_2m_sde(_heun) take their noise from the generator here; k-diffusion would draw it from a Brownian tree by
    default, as the web UI does (see docs/samplers.md)."""
    noise = latents(0)
    assert_close_runs(run_ours_k_grid(sampler, 20, noise, karras=karras), run_k_diffusion(sampler, 20, noise, karras=karras))


def test_the_oracle_tells_the_samplers_apart():
    """The comparison can fail: DPM++ 2S a is not Euler a, and DPM++ 3M SDE is not DPM++ SDE on the same tree."""
    noise = latents(0)
    x, _ = run_ours_k_grid("dpmpp_2s_a", 20, noise)
    assert (x - run_k_diffusion("euler_a", 20, noise)[0]).abs().max() > 100 * TOL
    x, _ = run_ours_k_grid("dpmpp_3m_sde", 20, noise)
    assert (x - run_k_diffusion("dpmpp_sde", 20, noise)[0]).abs().max() > 100 * TOL


@pytest.mark.parametrize("sampler", K_ONLY)
def test_each_row_has_its_own_noise(sampler):
    """With one generator per row (the pipeline's seed + i), a row's image does not depend on its batch."""
    plan = plan_sampling(sampler, 8)
    noise = torch.cat([latents(0), latents(1)])
    batch = plan.sample(FakeEps(), plan.noise_latents(noise), [torch.Generator().manual_seed(s) for s in (5, 6)])
    for row, s in enumerate((5, 6)):
        alone = plan.sample(FakeEps(), plan.noise_latents(noise[row : row + 1]), torch.Generator().manual_seed(s))
        torch.testing.assert_close(batch[row : row + 1], alone, rtol=0, atol=1e-6)
    assert batch.shape == (2, *SHAPE[1:])


def test_dpmpp_2s_a_midpoint_timesteps_are_k_diffusions():
    """The plan tells the model k-diffusion's `sigma_to_t` at each DPM++ 2S a midpoint (as diffusers' DPM2 does at
    DPM2's); its grid timesteps are Euler's (test_samplers.py)."""
    plan = plan_sampling("dpmpp_2s_a", 20)
    mids = samplers.dpmpp_2s_a_midpoints(plan.sigmas)
    assert mids[-1] == 0 and (mids[:-1] > plan.sigmas[1:-1] * 0.999).all()  # ~ sigma_next: sigma_down = sigma_next^2 / sigma
    torch.testing.assert_close(plan.timesteps_mid, kd.sigma_to_t(mids), rtol=0, atol=1e-3)
    assert torch.equal(plan.timesteps, plan_sampling("euler", 20).timesteps)


@pytest.mark.parametrize("sampler", K_ONLY)
def test_inpainting_blend_keeps_the_image(sampler):
    """sd15.inpaint's blend for a regular UNet works with these samplers as with the others (diffusers' rule, checked
    against diffusers in test_samplers.py): the kept region ends exactly on the image, the repainted one does not."""
    from sd15.inpaint import _known_region_blender
    from test_samplers import MASK

    noise, init = latents(0), latents(1, 0.8)
    plan = plan_sampling(sampler, 10, 0.6)
    blend = _known_region_blender(plan, init, noise, MASK, None)
    one_image = lambda info: blend({**info, "images": range(1)})  # noqa: E731  (the pipeline adds the batch rows)
    x = plan.sample(FakeEps(spatial=0.5), plan.noise_latents(noise, init), torch.Generator().manual_seed(7), one_image,
                    on_predictor=one_image)  # fmt: skip
    assert torch.equal(x * (1 - MASK), init * (1 - MASK))
    assert torch.isfinite(x).all() and not torch.allclose(x * MASK, init * MASK, atol=1e-2)
