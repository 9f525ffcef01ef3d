"""Samplers (sd15.samplers) against diffusers 0.42.1's schedulers, run as diffusers users run them.

Each reference scheduler is `X.from_config(<SD1.5 scheduler_config>, **overrides)` (the way users swap
samplers) driven by the loop of StableDiffusionPipeline / StableDiffusionImg2ImgPipeline: set_timesteps,
`noise * init_noise_sigma` or get_timesteps + set_begin_index + add_noise, then scale_model_input / model /
step. Both sides get the same deterministic fake eps model, the same latents and same-seeded CPU generators.

Tolerance: final latents agree within 1e-4 in float32. The two sides are the same arithmetic up to rounding
(float32 carries ~6e-8 relative), but not the same operations: the sigma-space samplers hold
x = x_0 + sigma eps, up to ~15x the VP latent, where diffusers' DPM-Solver/UniPC keep the VP latent; LMS
integrates its coefficients exactly, diffusers with scipy.quad in float32; UniPC's 2x2 solve is closed-form.
Observed differences are <= 7e-6 after 50 steps; a single timestep off by one moves the result by ~1e-3
(`test_tolerance_catches_an_off_by_one_timestep`), so 1e-4 separates rounding from mistakes. DPM2's differences
are 0: it does diffusers' float32 operations in diffusers' order, which a 3-step DPM2 a run needs (it passes
|x| ~ 90, and a last-bit change of a midpoint's timestep moves its result by 3e-4; sd15.samplers._midpoint_timesteps).
"""

import inspect

import diffusers  # test-only oracle
import pytest
import torch

from reference_models import SD15_SCHEDULER_CONFIG
from sd15.samplers import SAMPLERS, dpm_2_midpoints, plan_sampling

# the samplers diffusers has a scheduler for; DPM++ 2S a and DPM++ 3M SDE are checked against k-diffusion
# (test_k_diffusion.py)
DIFFUSERS_SAMPLERS = [s for s in SAMPLERS if s not in ("dpmpp_2s_a", "dpmpp_3m_sde")]
SIGMA_SAMPLERS = [s for s in DIFFUSERS_SAMPLERS if s not in ("ddim", "pndm", "lcm")]
SPACED = [s for s in DIFFUSERS_SAMPLERS if s != "lcm"]  # on the training grid; lcm has its own, of at most 50 steps
KARRAS_IN_DIFFUSERS = [s for s in SIGMA_SAMPLERS if s != "euler_a"]  # EulerAncestral has no use_karras_sigmas
SHAPE = (1, 4, 8, 8)
TOL = 1e-4


def reference_scheduler(sampler: str, karras: bool = False, spaced: str | None = None, **overrides):
    """diffusers' scheduler for `sampler`, configured as `X.from_config(SD1.5 config)`; `spaced`: "exponential" or
    "beta", its use_exponential_sigmas or use_beta_sigmas."""
    if karras:
        overrides["use_karras_sigmas"] = True
    if spaced:
        overrides[f"use_{spaced}_sigmas"] = True
    classes = {
        "ddim": diffusers.DDIMScheduler,
        "pndm": diffusers.PNDMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler,
        "heun": diffusers.HeunDiscreteScheduler,
        "dpm_2": diffusers.KDPM2DiscreteScheduler,
        "dpm_2_a": diffusers.KDPM2AncestralDiscreteScheduler,
        "lms": diffusers.LMSDiscreteScheduler,
        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
        "dpmpp_2m_sde": diffusers.DPMSolverMultistepScheduler,
        "dpmpp_2m_sde_heun": diffusers.DPMSolverMultistepScheduler,
        "dpmpp_sde": diffusers.DPMSolverSDEScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
        "lcm": diffusers.LCMScheduler,
    }
    if sampler in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun"):
        overrides["algorithm_type"] = "sde-dpmsolver++"
    if sampler == "dpmpp_2m_sde_heun":
        overrides["solver_type"] = "heun"
    return classes[sampler].from_config(SD15_SCHEDULER_CONFIG, **overrides)


class FakeEps:
    """A deterministic, nonlinear stand-in for the guided UNet, shaped like a real one.

    It predicts the noise that would make x_0 = g(x, t) = 1.5 tanh(W x + 0.3 sin(t/8 + phase)) at a noise level
    abar(t) = 0.99915 exp(-t/185) close to SD's (0.99915 at t=0, 0.0045 at t=999), so x_0 estimates stay O(1)
    as with the real model, and sin(t/8) makes it as sensitive to t as the UNet's fastest timestep-embedding
    frequencies (a timestep off by one moves x_0 by up to 0.05). Records the timesteps it is called at.
    `spatial` > 0 also mixes each pixel with its left neighbour, as the UNet's convolutions do, so that what an
    inpainting blend puts in the kept region reaches the repainted one.
    """

    def __init__(self, spatial: float = 0.0):
        g = torch.Generator().manual_seed(1234)
        self.W = torch.randn(4, 4, generator=g) * 0.7
        self.phase = torch.rand(4, generator=g) * 6.28
        self.spatial = spatial
        self.seen: list[float] = []

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        self.seen.append(float(t[0]))
        t = t.to(x.device)[:, None, None, None]
        abar = 0.99915 * torch.exp(-t / 185)
        mix = torch.einsum("oc,bchw->bohw", self.W.to(x.device), x)
        mix = mix + self.spatial * torch.roll(mix, 1, dims=-1)
        x0 = 1.5 * torch.tanh(mix + 0.3 * torch.sin(t / 8 + self.phase.to(x.device)[None, :, None, None]))
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def latents(seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


def seed_brownian_noise(scheduler, seed):
    """DPMSolverSDEScheduler seeds its Brownian tree from `noise_sampler_seed` (else from torch's global RNG);
    sd15's dpmpp_sde draws that seed from the image's generator: give diffusers the same number."""
    if hasattr(scheduler, "noise_sampler_seed") and seed is not None:
        scheduler.noise_sampler_seed = int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(seed)))


def run_diffusers(scheduler, steps, noise, init=None, strength=1.0, seed=None, eta=0.0):
    """diffusers' StableDiffusion(Img2Img)Pipeline denoising loop around `scheduler`; returns (latents, t seen)."""
    model = FakeEps()
    seed_brownian_noise(scheduler, seed)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if init is None:
        x = noise * scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        x = scheduler.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
    accepted = inspect.signature(scheduler.step).parameters
    extra = {}
    if "eta" in accepted:
        extra["eta"] = eta
    if "generator" in accepted:
        extra["generator"] = torch.Generator().manual_seed(seed) if seed is not None else None
    for t in timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **extra, return_dict=False)[0]
    return x, model.seen


def run_ours(sampler, steps, noise, init=None, strength=1.0, seed=None, karras=False, eta=0.0, spacing=None, schedule_type=None):
    model = FakeEps()
    plan = plan_sampling(sampler, steps, strength, karras=karras, eta=eta, spacing=spacing, schedule_type=schedule_type)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = plan.sample(model, plan.noise_latents(noise, init), generator=generator)
    return x, model.seen


def assert_parity(ours, ref):
    (x, seen), (x_ref, seen_ref) = ours, ref
    assert seen == pytest.approx(seen_ref, abs=1e-3), "the model was called at different timesteps"
    assert (x - x_ref).abs().max().item() < TOL


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("steps", [1, 2, 3, 6, 20, 50])
@pytest.mark.parametrize("sampler", DIFFUSERS_SAMPLERS)
def test_txt2img_parity(sampler, steps):
    noise = latents(0)
    ref = run_diffusers(reference_scheduler(sampler), steps, noise, seed=7)
    assert_parity(run_ours(sampler, steps, noise, seed=7), ref)


@pytest.mark.parametrize("steps", [1, 2, 3, 6, 20, 50])
@pytest.mark.parametrize("sampler", KARRAS_IN_DIFFUSERS)
def test_txt2img_parity_karras(sampler, steps):
    noise = latents(0)
    ref = run_diffusers(reference_scheduler(sampler, karras=True), steps, noise, seed=7)
    assert_parity(run_ours(sampler, steps, noise, seed=7, karras=True), ref)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("steps", [6, 20, 50])
@pytest.mark.parametrize("sampler", DIFFUSERS_SAMPLERS)
def test_img2img_parity(sampler, steps, strength):
    noise, init = latents(0), latents(1, 0.8)
    ref = run_diffusers(reference_scheduler(sampler), steps, noise, init, strength, seed=7)
    assert_parity(run_ours(sampler, steps, noise, init, strength, seed=7), ref)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("sampler", KARRAS_IN_DIFFUSERS)
def test_img2img_parity_karras(sampler, strength):
    noise, init = latents(0), latents(1, 0.8)
    ref = run_diffusers(reference_scheduler(sampler, karras=True), 20, noise, init, strength, seed=7)
    assert_parity(run_ours(sampler, 20, noise, init, strength, seed=7, karras=True), ref)


# the edges of img2img: one step run at the very end (100 steps, strength 0.01), all steps but the first
# (0.99), every step from the noised image (1.0 with an image: add_noise at the first timestep, not pure noise),
# and the shortest schedules
EDGE_STRENGTHS = [(100, 0.01), (50, 0.5), (50, 0.99), (50, 1.0), (2, 0.5), (2, 1.0), (1, 1.0)]


@pytest.mark.parametrize(
    "sampler, steps, strength",
    [(s, n, x) for s in DIFFUSERS_SAMPLERS for n, x in EDGE_STRENGTHS if s != "lcm" or n <= 50] + [("lcm", 50, 0.02)],
)
def test_img2img_parity_edge_strengths(sampler, steps, strength):
    noise, init = latents(0), latents(1, 0.8)
    ref = run_diffusers(reference_scheduler(sampler), steps, noise, init, strength, seed=7)
    assert_parity(run_ours(sampler, steps, noise, init, strength, seed=7), ref)


@pytest.mark.parametrize("steps, strength", EDGE_STRENGTHS)
@pytest.mark.parametrize("sampler", KARRAS_IN_DIFFUSERS)
def test_img2img_parity_edge_strengths_karras(sampler, steps, strength):
    noise, init = latents(0), latents(1, 0.8)
    ref = run_diffusers(reference_scheduler(sampler, karras=True), steps, noise, init, strength, seed=7)
    assert_parity(run_ours(sampler, steps, noise, init, strength, seed=7, karras=True), ref)


# Karras grids at 999 steps for all but lms and dpmpp_sde, whose diffusers oracles are slow (scipy's quadrature per
# step; a Brownian tree over 999 intervals): their Karras grids are checked at 50 steps above
@pytest.mark.parametrize("sampler, karras", [(s, False) for s in SPACED] + [(s, True) for s in KARRAS_IN_DIFFUSERS if s not in ("lms", "dpmpp_sde")])
def test_999_steps_parity(sampler, karras):
    """The most steps every sampler can take (see test_1000_steps_are_refused_where_the_grid_breaks).

    LMS with Karras sigmas is left out: at 999 steps its last step, sigma_min -> 0, is ~100 times longer than the
    steps before it, so the 4th-order extrapolation multiplies rounding by ~1e5 (both sides end near |x| = 200,
    agreeing to 2e-4 relative; diffusers' quad integrates each coefficient to epsrel 1e-4). That is LMS itself
    (k-diffusion's sample_lms does the same), not a difference between the two."""
    noise = latents(0)
    ref = run_diffusers(reference_scheduler(sampler, karras=karras), 999, noise, seed=7)
    assert_parity(run_ours(sampler, 999, noise, seed=7, karras=karras), ref)


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "unipc"])
def test_1000_steps_are_refused_where_the_grid_breaks(sampler):
    """pipeline.check_settings allows 1000 steps. There diffusers' "leading" grid (DDIM, PNDM) reaches t = 1000, an
    IndexError mid-run, and the DPM-Solver/UniPC grid (1001 points over 0 … 999, rounded) lists t = 500 twice, a
    zero-length step that makes every latent NaN. plan_sampling refuses both with a message instead."""
    noise = latents(0)
    try:
        x_ref, _ = run_diffusers(reference_scheduler(sampler), 1000, noise, seed=7)
    except IndexError:
        pass
    else:
        assert torch.isnan(x_ref).all()
    with pytest.raises(ValueError, match="cannot take 1000 steps.*use fewer steps"):
        plan_sampling(sampler, 1000)
    plan_sampling(sampler, 999)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "lms"])
def test_1000_steps_run_where_the_grid_holds(sampler):
    noise = latents(0)
    ref = run_diffusers(reference_scheduler(sampler), 1000, noise, seed=7)
    assert_parity(run_ours(sampler, 1000, noise, seed=7), ref)


def test_plan_refuses_grids_outside_the_training_timesteps():
    with pytest.raises(ValueError, match="reaches t = -1"):  # "trailing" at 998 steps lists 999 timesteps, down to -1
        plan_sampling("euler", 998, spacing="trailing")
    with pytest.raises(ValueError, match="reaches t = 1000"):
        plan_sampling("euler", 1000, spacing="leading")
    with pytest.raises(ValueError, match="repeats a noise level"):
        plan_sampling("unipc", 1000, spacing="leading")


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_ddim_eta_parity(eta, strength):
    """DDIM with eta > 0 draws noise each step: the same seeded generator gives the same draws as diffusers."""
    noise, init = latents(0), (latents(1, 0.8) if strength < 1 else None)
    ref = run_diffusers(reference_scheduler("ddim"), 20, noise, init, strength, seed=3, eta=eta)
    assert_parity(run_ours("ddim", 20, noise, init, strength, seed=3, eta=eta), ref)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("sampler", SPACED)
def test_spacing_override_parity(sampler, spacing):
    noise = latents(0)
    ref = run_diffusers(reference_scheduler(sampler, timestep_spacing=spacing), 7, noise, seed=7)
    assert_parity(run_ours(sampler, 7, noise, seed=7, spacing=spacing), ref)


def test_euler_a_karras_uses_eulers_karras_grid():
    """diffusers' EulerAncestral has no Karras option; check our euler_a on the Karras grid of EulerDiscrete."""
    grid = reference_scheduler("euler", karras=True)
    grid.set_timesteps(20)
    ref_scheduler = reference_scheduler("euler_a")
    ref_scheduler.set_timesteps = lambda steps: None  # keep the grid installed below
    ref_scheduler.sigmas, ref_scheduler.timesteps = grid.sigmas, grid.timesteps
    noise = latents(0)
    assert_parity(run_ours("euler_a", 20, noise, seed=7, karras=True), run_diffusers(ref_scheduler, 20, noise, seed=7))


def test_tolerance_catches_an_off_by_one_timestep():
    from sd15 import samplers

    noise = latents(0)
    x_ref, _ = run_diffusers(reference_scheduler("euler"), 20, noise)
    plan = plan_sampling("euler", 20)
    timesteps = plan.timesteps.clone()
    timesteps[10] += 1
    x = samplers.euler(FakeEps(), plan.noise_latents(noise), plan.sigmas, timesteps)
    assert (x - x_ref).abs().max().item() > 5 * TOL


# --------------------------------------------------------------------------- schedules as FACTS.md lists them


def test_timesteps_as_diffusers_lists_them():
    assert plan_sampling("pndm", 50).timesteps.tolist() == [981, 961] + list(range(961, 0, -20))
    assert plan_sampling("ddim", 50).timesteps.tolist() == list(range(981, 0, -20))
    assert plan_sampling("ddim", 6).timesteps.tolist() == [831, 665, 499, 333, 167, 1]
    assert plan_sampling("euler", 6).timesteps.tolist() == pytest.approx([999, 799.2, 599.4, 399.6, 199.8, 0])
    assert plan_sampling("dpmpp_2m", 6).timesteps.tolist() == [999, 832, 666, 500, 333, 166]
    assert plan_sampling("unipc", 6).timesteps.tolist() == [999, 832, 666, 500, 333, 166]
    # DPM2: Euler's grid (its Karras timesteps rounded), and a fractional timestep at each midpoint but the last
    assert plan_sampling("dpm_2", 6, karras=True).timesteps.tolist() == [999, 837, 594, 249, 30, 0]
    mids = plan_sampling("dpm_2", 6).timesteps_mid.tolist()
    assert mids == pytest.approx([906.2466, 705.3850, 501.8292, 293.8246, 17.5260, 0], abs=1e-4)
    # LCM: steps of the 50-step distillation grid 999, 979, …, 19 (the LCM-LoRA paper's 4-step run)
    assert plan_sampling("lcm", 4).timesteps.tolist() == [999, 759, 499, 259]
    assert plan_sampling("lcm", 50).timesteps.tolist() == list(range(999, 0, -20))


def test_lcm_refuses_what_its_grid_cannot_give():
    """diffusers' LCMScheduler refuses more steps than the 50 it was distilled on; so does sd15, before any work,
    and says so. Karras sigmas and a timestep spacing have no meaning on that grid: refused, not ignored."""
    with pytest.raises(ValueError, match="lcm takes 1 to 50 steps"):
        plan_sampling("lcm", 51)
    with pytest.raises(ValueError, match="smaller than `num_inference_steps`: 51"):
        reference_scheduler("lcm").set_timesteps(51)
    with pytest.raises(ValueError, match="karras"):
        plan_sampling("lcm", 4, karras=True)
    with pytest.raises(ValueError, match="spacing does not apply"):
        plan_sampling("lcm", 4, spacing="trailing")


def test_lcm_boundary_condition():
    """c_skip(0) = 1 and c_out(0) = 0 (f is the identity at t = 0); at SD's timesteps the step is ~ the x_0 estimate."""
    from sd15.samplers import lcm_boundary_scalings

    assert [float(c) for c in lcm_boundary_scalings(0)] == [1.0, 0.0]
    c_skip, c_out = lcm_boundary_scalings(19)
    assert float(c_skip) == pytest.approx(0.25 / (190**2 + 0.25)) and float(c_out) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("sampler", KARRAS_IN_DIFFUSERS)
@pytest.mark.parametrize("schedule_type", ["exponential", "beta"])
def test_txt2img_parity_spaced_between_the_ends(schedule_type, sampler, steps):
    """The web UI's "Exponential" and "Beta" schedule types: diffusers' use_exponential_sigmas and use_beta_sigmas
    (timesteps unrounded, DPM2's too, but truncated for the multistep samplers). Beta's quantiles are sd15's own
    (schedule.beta_quantile), diffusers' scipy's."""
    noise = latents(0)
    ref = run_diffusers(reference_scheduler(sampler, spaced=schedule_type), steps, noise, seed=7)
    assert_parity(run_ours(sampler, steps, noise, seed=7, schedule_type=schedule_type), ref)


@pytest.mark.parametrize("sampler, schedule_type", [("euler", "exponential"), ("dpmpp_2m_sde", "exponential"),
                                                    ("heun", "beta"), ("dpmpp_2m", "beta")])  # fmt: skip
def test_img2img_parity_spaced_between_the_ends(sampler, schedule_type):
    noise, init = latents(0), latents(1)
    ref = run_diffusers(reference_scheduler(sampler, spaced=schedule_type), 20, noise, init, 0.6, seed=7)
    assert_parity(run_ours(sampler, 20, noise, init, 0.6, seed=7, schedule_type=schedule_type), ref)


def test_exponential_sigmas_are_k_diffusions_over_the_models_range():
    """What the web UI runs for "Exponential": k-diffusion's get_sigmas_exponential(n, sigma_min, sigma_max)."""
    import k_diffusion_oracle
    from sd15 import schedule

    k_sampling, _ = k_diffusion_oracle.load()
    train = schedule.sigmas()
    ref = k_sampling.get_sigmas_exponential(20, float(train[0]), float(train[-1]), device="cpu")
    # the web UI's Polyexponential at its default rho (1) is the same schedule: sd15 reads it as Exponential
    poly = k_sampling.get_sigmas_polyexponential(20, float(train[0]), float(train[-1]), rho=1.0, device="cpu")
    assert torch.allclose(poly.double(), ref.double(), rtol=1e-6)
    for sampler in ("euler", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        assert torch.allclose(plan_sampling(sampler, 20, schedule_type="exponential").sigmas.double(), ref.double(), rtol=1e-6)


def test_schedule_types_are_checked():
    with pytest.raises(ValueError, match="unknown schedule type 'cosine'"):
        plan_sampling("euler", 20, schedule_type="cosine")
    with pytest.raises(ValueError, match="name two schedules"):
        plan_sampling("euler", 20, karras=True, schedule_type="exponential")
    with pytest.raises(ValueError, match="exponential sigmas apply to the sigma-space samplers, not 'ddim'"):
        plan_sampling("ddim", 20, schedule_type="exponential")
    assert torch.equal(plan_sampling("euler", 9, schedule_type="karras").sigmas, plan_sampling("euler", 9, karras=True).sigmas)


@pytest.mark.parametrize("sampler, karras", [(s, False) for s in DIFFUSERS_SAMPLERS] + [(s, True) for s in KARRAS_IN_DIFFUSERS])
def test_grid_equals_diffusers(sampler, karras):
    ref = reference_scheduler(sampler, karras=karras)
    ref.set_timesteps(30)
    plan = plan_sampling(sampler, 30, karras=karras)
    ref_t, ref_sigmas = ref.timesteps.float(), getattr(ref, "sigmas", None)
    if sampler == "heun":  # diffusers interleaves [t0, t1, t1, t2, t2, …]; we list each step once
        ref_t, ref_sigmas = torch.cat([ref_t[:1], ref_t[1::2]]), torch.cat([ref_sigmas[:1], ref_sigmas[1::2]])
    if sampler in ("dpm_2", "dpm_2_a"):  # diffusers interleaves [t0, t_mid0, t1, t_mid1, …], [s0, s1, s1, s2, …]
        ref_t_mid, ref_t, ref_sigmas = ref_t[1::2], torch.cat([ref_t[:1], ref_t[2::2]]), ref_sigmas[::2]
        # sigmas_interpol, interleaved like the sigmas: step i's midpoint at 2i + 1 (DPM2) or 2i (DPM2 a)
        ref_mid = ref.sigmas_interpol[1::2] if sampler == "dpm_2" else ref.sigmas_interpol[::2]
        assert torch.equal(plan.timesteps_mid[:-1], ref_t_mid.float())  # the last step has no midpoint
        assert torch.equal(dpm_2_midpoints(plan.sigmas, sampler == "dpm_2_a"), ref_mid[:30])
    if sampler == "dpmpp_sde":  # diffusers interleaves [t0, t_mid0, t1, t_mid1, …, t_last], [s0, s1, s1, s2, …, 0]
        ref_t_mid, ref_t, ref_sigmas = ref_t[1::2], ref_t[::2], torch.cat([ref_sigmas[:1], ref_sigmas[1::2]])
        assert torch.equal(plan.timesteps_mid[:-1], ref_t_mid)  # the last step has no midpoint
    assert torch.equal(plan.timesteps, ref_t)
    if plan.sigmas is not None:
        assert torch.equal(plan.sigmas, ref_sigmas.float())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_start_follows_get_timesteps(sampler):
    for steps, strength in [(50, 0.75), (20, 0.3), (10, 1.0), (7, 0.5)]:
        plan = plan_sampling(sampler, steps, strength)
        assert plan.start == steps - int(steps * strength)


# --------------------------------------------------------------------------- callbacks, noise, errors


def expected_calls(sampler: str, steps: int) -> int:
    return steps + 1 if sampler == "pndm" else steps  # PNDM evaluates its second timestep twice


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_callback_sees_every_step(sampler):
    infos = []
    plan = plan_sampling(sampler, 8)
    plan.sample(FakeEps(), plan.noise_latents(latents(0)), torch.Generator().manual_seed(0), infos.append)
    assert [info["i"] for info in infos] == list(range(expected_calls(sampler, 8)))
    assert set(infos[0]) == {"i", "t", "sigma", "sigma_next", "x", "denoised"}
    assert infos[0]["t"] == pytest.approx(float(plan.timesteps[0]))
    assert all(info["x"].shape == SHAPE and info["denoised"].shape == SHAPE for info in infos)
    if plan.sigmas is not None:
        assert infos[-1]["sigma_next"] == 0.0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_callback_returning_true_stops_early(sampler):
    calls = []

    def stop_after_three(info):
        calls.append(info)
        return info["i"] == 2

    plan = plan_sampling(sampler, 10)
    x = plan.sample(FakeEps(), plan.noise_latents(latents(0)), torch.Generator().manual_seed(0), stop_after_three)
    assert len(calls) == 3
    last = calls[-1]
    vp_scale = 1.0 if plan.sigmas is None else (last["sigma_next"] ** 2 + 1) ** 0.5
    torch.testing.assert_close(x, last["x"] / vp_scale)  # the latent at that point, returned in VP form


@pytest.mark.parametrize("sampler", ["euler_a", "dpm_2_a", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_sde", "dpmpp_2s_a", "dpmpp_3m_sde", "lcm"])
def test_noise_comes_from_the_generator(sampler):
    noise = latents(0)
    a, _ = run_ours(sampler, 10, noise, seed=1)
    b, _ = run_ours(sampler, 10, noise, seed=1)
    c, _ = run_ours(sampler, 10, noise, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)
    torch.manual_seed(5)  # without a generator: torch's global RNG, as diffusers
    d, _ = run_ours(sampler, 10, noise)
    torch.manual_seed(5)
    assert torch.equal(d, run_ours(sampler, 10, noise)[0])


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_png_parameters_name_every_sampler(sampler, karras):
    """Each sampler has its web UI name in the PNG `parameters` (DPM2 a Karras, …) and reads back as itself, also in
    the older form with the schedule in the sampler's name."""
    from sd15.pipeline import GenerationSettings
    from sd15.pnginfo import SAMPLER_NAMES, format_parameters, parse_parameters

    karras = karras and sampler not in ("ddim", "pndm", "lcm")
    text = format_parameters(GenerationSettings("a cat", "", 20, 7.0, sampler, 5, 512, 512, karras))
    assert f"Sampler: {SAMPLER_NAMES[sampler]}," in text
    assert (parse_parameters(text)["sampler"], parse_parameters(text)["karras"]) == (sampler, karras)
    old = parse_parameters(f"a cat\nSteps: 20, Sampler: {SAMPLER_NAMES[sampler]}{' Karras' * karras}, Seed: 5")
    assert (old["sampler"], old["karras"]) == (sampler, karras)


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown sampler"):
        plan_sampling("dpm_fast", 20)
    with pytest.raises(ValueError, match="karras"):
        plan_sampling("ddim", 20, karras=True)
    with pytest.raises(ValueError, match="eta"):
        plan_sampling("euler", 20, eta=0.5)
    with pytest.raises(ValueError, match="no step"):
        plan_sampling("euler", 3, strength=0.2)
    with pytest.raises(ValueError, match="init_latents"):
        plan_sampling("euler", 10, strength=0.5).noise_latents(latents(0))


# --------------------------------------------------------------------------- inpainting with a regular UNet


MASK = torch.zeros(1, 1, 8, 8)
MASK[..., 2:6, 1:5] = 1  # 1 = repaint


def run_diffusers_inpaint(scheduler, steps, noise, init, strength, seed):
    """StableDiffusionInpaintPipeline's loop for a 4-channel UNet: after every scheduler step (Heun, DPM2: every
    half step) the kept region becomes `add_noise(init, noise, timesteps[i + 1])`, or init after the last step."""
    model = FakeEps(spatial=0.5)
    seed_brownian_noise(scheduler, seed)
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    x = noise * scheduler.init_noise_sigma if strength == 1.0 else scheduler.add_noise(init, noise, timesteps[:1])
    extra = {"generator": torch.Generator().manual_seed(seed)} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(timesteps):
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **extra, return_dict=False)[0]
        known = scheduler.add_noise(init, noise, torch.tensor([timesteps[i + 1]])) if i < len(timesteps) - 1 else init
        x = (1 - MASK) * known + MASK * x
    return x, model.seen


@pytest.mark.parametrize("steps, strength", [(6, 1.0), (20, 0.5), (10, 0.3), (2, 1.0), (50, 0.99)])
@pytest.mark.parametrize("sampler", DIFFUSERS_SAMPLERS)
def test_known_region_blending_parity(sampler, steps, strength):
    """sd15.inpaint's blend for a regular UNet noises the kept region to the level of the new x, for every sampler
    family: the next listed timestep (DDIM/PNDM, PLMS's repeated one included) or sigma_next (the others, and
    Heun's intermediate Euler point), as diffusers' inpainting pipeline does. At DPM2's midpoint diffusers also
    noises it to the step's sigma_next (not to sigma_mid, the level of x there), and so does sd15. The model mixes
    neighbouring pixels, so a blend different from diffusers' would show in the repainted region too."""
    from sd15.inpaint import _known_region_blender

    noise, init = latents(0), latents(1, 0.8)
    ref = run_diffusers_inpaint(reference_scheduler(sampler), steps, noise, init, strength, seed=7)
    model = FakeEps(spatial=0.5)
    plan = plan_sampling(sampler, steps, strength)
    blend = _known_region_blender(plan, init, noise, MASK, None)
    one_image = lambda info: blend({**info, "images": range(1)})  # the pipeline adds the batch rows
    x = plan.noise_latents(noise) if strength == 1.0 else plan.noise_latents(noise, init)
    x = plan.sample(model, x, torch.Generator().manual_seed(7), one_image, on_predictor=one_image)
    assert_parity((x, model.seen), ref)
    assert torch.equal(x * (1 - MASK), init * (1 - MASK))  # the kept region ends exactly on the image


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("sampler, eta", [("ddim", 1.0), ("euler_a", 0.0), ("dpm_2_a", 0.0), ("dpmpp_2m_sde", 0.0), ("dpmpp_sde", 0.0), ("lcm", 0.0)])
def test_each_row_draws_from_its_own_generator(sampler, eta):
    """With one generator per row (the pipeline's seed + i), a row's sampler noise does not depend on its batch."""
    plan = plan_sampling(sampler, 8, eta=eta)
    noise = torch.cat([latents(0), latents(1)])
    batch = plan.sample(FakeEps(), plan.noise_latents(noise), [torch.Generator().manual_seed(s) for s in (5, 6)])
    for row, s in enumerate((5, 6)):
        alone = plan.sample(FakeEps(), plan.noise_latents(noise[row : row + 1]), torch.Generator().manual_seed(s))
        torch.testing.assert_close(batch[row : row + 1], alone, rtol=0, atol=1e-6)


def test_brownian_noise_is_one_path_per_image():
    """dpmpp_sde's two noises per step are increments of one Brownian path: each N(0, 1), and over nested intervals
    [a, m] ⊂ [a, b] correlated by sqrt((a - m) / (a - b)); the same seed gives the same path whatever is asked
    first; each row of a batch has its own path, equal to that row alone. (Statistics over 4·64·64 numbers: the
    standard error of a mean or correlation is ~0.008, so 0.04 bounds are five of them.)"""
    from sd15.samplers import BrownianNoise

    like = torch.zeros(2, 4, 64, 64)
    a, m, b = torch.tensor(10.0), torch.tensor(6.4), torch.tensor(1.0)
    noise = BrownianNoise(like, 0.03, 14.6, [torch.Generator().manual_seed(s) for s in (1, 2)])
    z_am, z_ab = noise(a, m, like), noise(a, b, like)
    assert abs(z_ab.mean()) < 0.04 and abs(z_ab.std() - 1) < 0.04
    corr = float((z_am * z_ab).mean())
    assert corr == pytest.approx(((a - m) / (a - b)).sqrt().item(), abs=0.04)  # 0.6; independent draws give 0
    again = BrownianNoise(like, 0.03, 14.6, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(again(a, b, like), z_ab)  # asked in the other order: the same path
    alone = BrownianNoise(like[1:], 0.03, 14.6, [torch.Generator().manual_seed(2)])
    assert torch.equal(alone(a, b, like[1:]), z_ab[1:])
    assert float((z_ab[0] * z_ab[1]).mean()) == pytest.approx(0, abs=0.04)  # rows are independent paths
