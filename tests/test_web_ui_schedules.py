"""The web UI's schedule types diffusers lacks ("Normal", "SGM Uniform", "Simple", "DDIM", "KL Optimal", "Align Your
Steps"), against the web UI's definitions (its modules/sd_schedulers.py, 1.10) written out here on k-diffusion's
model wrapper, the object those definitions call, and sd15's samplers on them against k-diffusion's own.

Tolerances: noise levels to 1e-5 relative (the web UI computes them in float32 torch, sd15 in float64 NumPy);
latents 1e-4 and timesteps 1e-3, as test_k_diffusion.py (float32 samplers on latents of size ~1).
"""

import numpy as np
import pytest
import torch

import k_diffusion_oracle as kd
from sd15 import schedule
from sd15.samplers import SAMPLERS, WEB_UI_SCHEDULES, plan_sampling
from test_k_diffusion import SAMPLE_FUNCTIONS
from test_samplers import TOL, FakeEps, latents

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # torchsde clamping k-diffusion's tree ends

SIGMA_SAMPLERS = [s for s in SAMPLERS if s not in ("ddim", "pndm", "lcm")]


def web_ui_sigmas(name: str, n: int) -> torch.Tensor:
    """What the web UI's schedule function `name` gives for n steps of an SD1.5 model, on k-diffusion's wrapper."""
    model = kd.denoiser(None)
    table = model.sigmas  # (1000,) float32, increasing
    low, high = table[0], table[-1]
    if name == "normal":  # its normal_scheduler (and "Uniform": k-diffusion's own get_sigmas)
        return model.get_sigmas(n)
    if name == "sgm_uniform":  # n + 1 timesteps from sigma_max's to sigma_min's, the last dropped
        ts = torch.linspace(float(model.sigma_to_t(high)), float(model.sigma_to_t(low)), n + 1)[:n]
        return torch.cat([model.t_to_sigma(ts), torch.zeros(1)])
    if name == "simple":  # every len/n-th table entry from the top
        picked = [float(table[len(table) - 1 - int(i * len(table) / n)]) for i in range(n)]
        return torch.tensor(picked + [0.0])
    if name == "ddim_uniform":  # entries 1, 1 + k, … (k = len // n, at least 1), from the top
        k = max(len(table) // n, 1)
        return torch.tensor([float(v) for v in table[1::k].flip(0)] + [0.0])
    if name == "kl_optimal":  # n + 1 levels, evenly spaced in arctan, ending at sigma_min: no 0
        frac = torch.arange(n + 1) / n
        return torch.tan(frac * torch.arctan(low) + (1 - frac) * torch.arctan(high))
    if name == "align_your_steps":  # NVIDIA's 10-step SD1.5 levels, log-linearly resampled to n points
        levels = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n != len(levels):
            log_levels = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(levels)), np.log(levels[::-1]))
            levels = list(np.exp(log_levels)[::-1])
        return torch.tensor(levels + [0.0], dtype=torch.float32)
    raise ValueError(name)


@pytest.mark.parametrize("steps", [1, 2, 10, 11, 30, 64])
@pytest.mark.parametrize("name", WEB_UI_SCHEDULES)
def test_noise_levels_are_the_web_uis(name, steps):
    if name == "align_your_steps" and steps == 1:
        with pytest.raises(ValueError, match="needs at least 2 steps"):
            plan_sampling("euler", steps, schedule_type=name)
        return
    ref = web_ui_sigmas(name, steps)
    plan = plan_sampling("euler", steps, schedule_type=name)
    assert plan.sigmas.shape == ref.shape and plan.steps == len(ref) - 1
    torch.testing.assert_close(plan.sigmas.double(), ref.double(), rtol=1e-5, atol=0)
    # the model is told k-diffusion's (unrounded) timestep of each level
    torch.testing.assert_close(plan.timesteps, kd.sigma_to_t(ref[:-1]), rtol=0, atol=1e-3)


def test_the_schedules_differ_and_normal_is_uniform_in_t():
    """The comparison can fail: the six schedules are six different grids. "normal" is Euler's own grid up to how a
    fractional timestep's sigma is interpolated (log sigma here, sigma in diffusers: 1e-5 apart between 999 and
    1), but not the multistep samplers' own, which space steps + 1 timesteps and drop the last."""
    grids = {name: plan_sampling("euler", 8, schedule_type=name).sigmas for name in WEB_UI_SCHEDULES}
    names = list(grids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(grids[a], grids[b], rtol=1e-3), (a, b)
    torch.testing.assert_close(grids["normal"], plan_sampling("euler", 8).sigmas, rtol=1e-5, atol=0)
    assert not torch.allclose(plan_sampling("dpmpp_2m", 8, schedule_type="normal").sigmas, plan_sampling("dpmpp_2m", 8).sigmas, rtol=1e-3)


def test_ddim_uniform_runs_the_steps_its_stride_gives():
    """The web UI's "DDIM" schedule steps through t = 1, 1 + k, … with k = 1000 // steps: 30 asked run 31."""
    assert plan_sampling("euler", 30, schedule_type="ddim_uniform").steps == 31
    assert plan_sampling("euler", 20, schedule_type="ddim_uniform").steps == 20
    assert plan_sampling("euler", 600, schedule_type="ddim_uniform").steps == 999
    from sd15.hires import second_pass_plan  # a hires fix's second pass still runs exactly its hires steps

    plan = second_pass_plan("euler", 10, 0.35, schedule_type="ddim_uniform")  # 28 asked: stride 35, 29 run
    assert (plan.steps, plan.steps - plan.start) == (29, 10)


def test_kl_optimal_ends_at_sigma_min_and_the_run_returns_that_latent():
    """KL Optimal's last step goes to sigma_min, not 0; the web UI decodes the latent there as it is."""
    plan = plan_sampling("euler", 5, schedule_type="kl_optimal")
    assert float(plan.sigmas[-1]) == pytest.approx(float(schedule.sigmas()[0]))
    seen = []
    x = plan.sample(FakeEps(), plan.noise_latents(latents(0)), callback=lambda info: seen.append(info["x"]))
    assert torch.equal(x, seen[-1])


def test_spacing_and_vp_samplers_are_refused():
    with pytest.raises(ValueError, match="the sgm_uniform schedule sets its own noise levels"):
        plan_sampling("euler", 20, schedule_type="sgm_uniform", spacing="trailing")
    with pytest.raises(ValueError, match="simple sigmas apply to the sigma-space samplers, not 'ddim'"):
        plan_sampling("ddim", 20, schedule_type="simple")
    with pytest.raises(ValueError, match="cannot take 2000 steps: it repeats a noise level"):
        plan_sampling("euler", 2000, schedule_type="simple")


def run_k_diffusion(sampler: str, sigmas: torch.Tensor, noise: torch.Tensor, init=None, start: int = 0, seed: int = 7):
    """k-diffusion's sampler from `start` on `sigmas`, from pure noise times sigmas[0] or `init` noised to
    sigmas[start], as the web UI starts it; returns (x, timesteps the model saw). `sigmas` are sd15's, equal to the
    web UI's to 1e-5 (test_noise_levels_are_the_web_uis) but not to the bit, and a Brownian tree's noise between two
    levels moves by ~sqrt(their change): this compares the samplers, the test above the levels."""
    sampling, _ = kd.load()
    name, extra, noise_kind = SAMPLE_FUNCTIONS[sampler]
    model = FakeEps()
    x = noise * sigmas[0] if init is None else init + noise * sigmas[start]
    if noise_kind == "gaussian":
        extra = {**extra, "noise_sampler": kd.gaussian_noise(torch.Generator().manual_seed(seed), x.shape)}
    elif noise_kind == "brownian":
        extra = {**extra, "noise_sampler": kd.brownian_noise(x, sigmas, seed)}
    return getattr(sampling, name)(kd.denoiser(model), x, sigmas[start:], disable=True, **extra), model.seen


def run_ours(sampler: str, schedule_type: str, steps: int, noise: torch.Tensor, init=None, strength=1.0, seed=7, **plan_args):
    plan, model = plan_sampling(sampler, steps, strength, schedule_type=schedule_type, **plan_args), FakeEps()
    x = plan.sample(model, plan.noise_latents(noise, init), generator=torch.Generator().manual_seed(seed))
    return x, model.seen, plan


def assert_same_run(ours, ref):
    (x, seen, _), (x_ref, seen_ref) = ours, ref
    assert seen == pytest.approx(seen_ref, abs=1e-3), "the model was called at different timesteps"
    assert (x - x_ref).abs().max().item() < TOL


@pytest.mark.parametrize(
    "sampler, name",
    [(s, "kl_optimal") for s in SAMPLE_FUNCTIONS]  # its last step ends above 0: every sampler's general step
    + [(s, n) for s in ("euler_a", "dpmpp_2m", "dpmpp_sde") for n in WEB_UI_SCHEDULES if n != "kl_optimal"],
)
def test_samplers_on_the_web_ui_schedules_equal_k_diffusions(sampler, name):
    noise = latents(0)
    ours = run_ours(sampler, name, 7, noise)
    assert_same_run(ours, run_k_diffusion(sampler, ours[2].sigmas, noise))


@pytest.mark.parametrize("sampler, name", [("euler", "sgm_uniform"), ("dpmpp_2m_sde", "align_your_steps"), ("heun", "kl_optimal")])
def test_img2img_on_a_web_ui_schedule_equals_k_diffusion_from_the_same_step(sampler, name):
    """img2img starts `steps - int(steps * strength)` steps in, as sd15's other schedules do (diffusers' rule)."""
    noise, init = latents(0), latents(1, 0.8)
    ours = run_ours(sampler, name, 12, noise, init, strength=0.6)
    start = ours[2].start
    assert start == 12 - int(12 * 0.6)
    assert_same_run(ours, run_k_diffusion(sampler, ours[2].sigmas, noise, init, start))


def test_beta_quantiles_are_scipys():
    """sd15's Beta schedule computes the Beta distribution's quantiles itself (no scipy at run time)."""
    from scipy import stats

    p = np.concatenate([np.linspace(0, 1, 101), [1e-6, 1 - 1e-6]])  # nearer the ends scipy's own root finder gives up
    for a, b in [(0.6, 0.6), (2.0, 0.5), (0.5, 3.0), (1.0, 1.0)]:
        np.testing.assert_allclose(schedule.beta_cdf(p, a, b), stats.beta.cdf(p, a, b), rtol=0, atol=1e-13)
        # 1e-11: near the ends a quantile is found to the CDF's last bits, which a flat CDF there magnifies (3e-13 seen)
        np.testing.assert_allclose(schedule.beta_quantile(p, a, b), stats.beta.ppf(p, a, b), rtol=0, atol=1e-11)


def test_discarding_the_penultimate_sigma_is_the_web_uis_dpm2():
    """The web UI runs DPM2 and DPM2 a on the grid of steps + 1 steps without its next-to-last level (its sampler
    option discard_next_to_last_sigma); on its own noise levels ("normal", k-diffusion's get_sigmas) sd15's run is
    k-diffusion's sample_dpm_2 on `torch.cat([sigmas[:-2], sigmas[-1:]])`."""
    full, cut = plan_sampling("dpm_2", 9), plan_sampling("dpm_2", 8, discard_penultimate_sigma=True)
    assert torch.equal(cut.sigmas, torch.cat([full.sigmas[:-2], full.sigmas[-1:]])) and cut.steps == 8
    assert torch.equal(cut.timesteps, full.timesteps[:-1])
    noise = latents(0)
    for sampler in ("dpm_2", "dpm_2_a"):
        ours = run_ours(sampler, "normal", 8, noise, discard_penultimate_sigma=True)
        web_ui = web_ui_sigmas("normal", 9)
        assert torch.allclose(ours[2].sigmas, torch.cat([web_ui[:-2], web_ui[-1:]]), rtol=1e-5)
        assert_same_run(ours, run_k_diffusion(sampler, ours[2].sigmas, noise))
    with pytest.raises(ValueError, match="discarding the penultimate sigma applies to the sigma-space samplers, not 'ddim'"):
        plan_sampling("ddim", 8, discard_penultimate_sigma=True)
    assert plan_sampling("euler", 8, strength=0.5, discard_penultimate_sigma=True).start == 4

