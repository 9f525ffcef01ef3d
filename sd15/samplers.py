"""Samplers for SD1.5, as plain functions, matching diffusers 0.42.1's schedulers step for step (and k-diffusion's
functions, for the two diffusers lacks: `dpmpp_2s_a`, `dpmpp_3m_sde`).

The model. Every sampler takes `eps_model(x, t) -> eps`: the (already classifier-free-guided) noise
prediction for the variance-preserving (VP) latent `x` (B, 4, H, W) at training timestep `t`, a float32
tensor of shape (B,) that may be fractional (799.2). That is the UNet as trained.

Two families:
- `ddim`, `pndm`, `lcm` work on the VP latent x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at integer timesteps
  (`lcm` is for latent consistency models and LCM-LoRAs, on its own grid of at most 50 steps).
- `euler`, `euler_a`, `heun`, `dpm_2`, `dpm_2_a`, `lms`, `dpmpp_2m`, `dpmpp_2m_sde`(`_heun`), `dpmpp_sde`, `dpmpp_2s_a`,
  `dpmpp_3m_sde`, `unipc` work, as Karras
  et al. 2022 and k-diffusion do, on x = x_0 + sigma * eps = x_t / sqrt(abar_t) over a decreasing list of noise
  levels `sigmas` (the last one 0), through the denoiser D(x; sigma) of `denoise`. Each sigma comes with the
  training timestep the UNet is told, `timesteps[i]`, computed the way diffusers' scheduler computes it
  (interpolated, rounded or not: see `plan_sampling`), so there is no sigma -> t guess inside a sampler.
  DPM2's, DPM++ SDE's and DPM++ 2S a's midpoints come with theirs too (`timesteps_mid`).

Callbacks. Every sampler calls `callback(info)` once per step, after the step, with
    {"i": step number in this run, "t": timestep the model saw, "sigma": its noise level,
     "sigma_next": the noise level of the new x, "x": the new latent, "denoised": the step's x0 estimate}.
If the callback returns `True`, the sampler stops and returns that `x` (in its own space: VP for ddim/pndm/lcm,
x_0 + sigma_next * eps for the others; `SamplingPlan.sample` converts it to VP).

Noise. Ancestral/SDE samplers draw one standard normal tensor per step, every step (also the last, where
it is multiplied by 0; `dpm_2_a` and `lcm` skip that last draw, as diffusers does, and `dpmpp_2s_a` as k-diffusion does), from the caller's `torch.Generator`
on the generator's device (the CPU for a CPU generator) and move it to x's device, as diffusers' `randn_tensor`
does; so a seeded CPU generator gives the same image on any device, and the same draws as diffusers given the
same generator. `dpmpp_sde` and `dpmpp_3m_sde` draw a seed per row instead, for a Brownian tree (`BrownianNoise`).

The pipeline uses the last section: `plan = plan_sampling(name, steps, strength, karras, eta)`, then
`x = plan.noise_latents(noise, init_latents)` and `latents = plan.sample(eps_model, x, generator, callback)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from . import schedule
from .philox import PhiloxGenerator
from .seeds import randn

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], "bool | None"]

SAMPLERS = (
    "ddim", "pndm", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "lms", "dpmpp_2m", "dpmpp_2m_sde",
    "dpmpp_2m_sde_heun", "dpmpp_sde", "dpmpp_2s_a", "dpmpp_3m_sde", "unipc", "lcm",
)  # fmt: skip


# --------------------------------------------------------------------------- shared pieces


def _timestep(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """The timestep as the model takes it: float32, shape (B,), on x's device."""
    return torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)


def denoise(eps_model: EpsModel, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """D(x; sigma), the x_0 estimate, from an eps-predicting VP model (Karras et al. 2022, Table 1, VP column).

        c_in = 1 / sqrt(sigma^2 + 1)           the VP latent the UNet was trained on is c_in * x
        D(x; sigma) = x - sigma * eps_model(c_in * x, t)        (c_skip = 1, c_out = -sigma)

    `t` is the training timestep for `sigma`, as the scheduler being reproduced defines it.
    """
    eps = eps_model(x / (sigma**2 + 1) ** 0.5, _timestep(t, x))
    return x - sigma * eps


def _randn_like(x: torch.Tensor, generator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """N(0, I) shaped like x, drawn on the generator's device in `dtype` (default x.dtype), then moved to x.

    `generator` may be a list with one generator per batch row (each row drawn from its own, as diffusers'
    `randn_tensor` does), so an image's noise does not depend on which batch it was run in.
    """
    if isinstance(generator, (list, tuple)):
        return torch.cat([_randn_like(row[None], g, dtype) for row, g in zip(x, generator)])
    noise = randn(x.shape, generator, dtype or x.dtype)
    if noise.device.type == "cpu" and x.is_cuda:  # pinned, so that the copy does not wait for the GPU to go idle
        return noise.pin_memory().to(device=x.device, dtype=x.dtype, non_blocking=True)
    return noise.to(device=x.device, dtype=x.dtype)


def _report(callback: Callback | None, i: int, t, sigma, sigma_next, x, denoised) -> bool:
    """Call the callback (if any) with the step's info dict; True means stop."""
    if callback is None:
        return False
    info = {"i": i, "t": float(t), "sigma": float(sigma), "sigma_next": float(sigma_next), "x": x, "denoised": denoised}
    return callback(info) is True


def _vp_sigma(abar: torch.Tensor) -> torch.Tensor:
    """sigma of a VP noise level: sqrt((1 - abar) / abar)."""
    return ((1 - abar) / abar) ** 0.5


def _ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of an ancestral step sigma -> sigma_next (k-diffusion's `get_ancestral_step`, eta = 1):
    a deterministic step down to sigma_down, then fresh noise of std sigma_up, with
        sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),  sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    so that sigma_down^2 + sigma_up^2 = sigma_next^2 (and sigma_down = sigma_next^2 / sigma).
    """
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def dpm_2_midpoints(sigmas: torch.Tensor, ancestral: bool = False) -> torch.Tensor:
    """(n,) the noise level of DPM2's second evaluation in each step of `sigmas` (n+1,): halfway in log sigma
    between sigma_i and where the step lands, sigma_{i+1} (`dpm_2`) or sigma_down (`dpm_2_a`),
        sigma_mid = exp((log sigma_i + log sigma_end) / 2) = sqrt(sigma_i sigma_end);
    0 for a step to sigma = 0, which has no second evaluation. `plan_sampling` gives each its timestep.
    The halving runs in diffusers' direction (from sigma_next up, from sigma down to sigma_down), so the
    midpoints agree with its to the last bit (see `_midpoint_timesteps` for why that matters).
    """
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    if ancestral:
        log_mid = torch.lerp(sigma.log(), _ancestral_step(sigma, sigma_next)[0].log(), 0.5)
    else:
        log_mid = torch.lerp(sigma_next.log(), sigma.log(), 0.5)
    return torch.where(sigma_next > 0, log_mid.exp(), 0.0)


def _midpoint_timesteps(sigmas_mid: torch.Tensor) -> torch.Tensor:
    """The model timestep of each DPM2 midpoint: `schedule.sigma_to_t` (linear in log sigma between the two table
    entries around it), but in float32 arithmetic, as diffusers' KDPM2 schedulers compute these. The float64 value
    differs in t's last bit, which moves a 3-step dpm_2_a result by 3e-4 (its x passes |x| ~ 90 before the last step).
    """
    return torch.from_numpy(schedule.sigma_to_t(sigmas_mid.numpy(), dtype=np.float32))


# --------------------------------------------------------------------------- VP samplers


def ddim(
    eps_model: EpsModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    step_ratio: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. (12) with sigma_t(eta) of eq. (16).

    x: the VP latent at timesteps[0]. timesteps: integer training timesteps, noisy to clean. Each step goes
    from t to t - step_ratio, or to abar = abar_0 below 0 (SD1.5's `set_alpha_to_one=False`), as diffusers'
    DDIMScheduler does; for "leading" spacing that is the next listed timestep. eta = 0 is deterministic DDIM,
    eta = 1 is DDPM-like ancestral sampling.
    """
    abar = schedule.alphas_cumprod()
    for i, t in enumerate(int(t) for t in timesteps):
        t_prev = t - step_ratio
        a_t, a_prev = abar[t], abar[t_prev] if t_prev >= 0 else abar[0]
        eps = eps_model(x, _timestep(t, x))
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # "predicted x_0" of eq. (12)
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5  # sigma_t(eta), eq. (16)
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps  # eq. (12): x_0 part + "direction to x_t"
        if eta > 0:
            x = x + std * _randn_like(x, generator)  # eq. (12): the random noise term
        if _report(callback, i, t, _vp_sigma(a_t), _vp_sigma(a_prev), x, x0):
            break
    return x


def _pndm_transfer(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """The transfer part phi(x_t, eps, t, t-delta) of PNDM (Liu et al. 2022, eq. 9), with a = abar:

        x_{t-delta} = sqrt(a_prev / a_t) x_t
                      - (a_prev - a_t) / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev)) * eps

    This is the deterministic DDIM step, regrouped.
    """
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def pndm(
    eps_model: EpsModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    step_ratio: int,
    callback: Callback | None = None,
) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method of Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models
    on Manifolds" (PNDM), eq. (12), as SD1.5 ships it: diffusers' PNDMScheduler with skip_prk_steps=True.

    Instead of the paper's Runge-Kutta warm-up it uses CompVis' plms.py warm-up, an improved-Euler step.
    timesteps: the evaluation timesteps, the second one repeated: [981, 961, 961, 941, …, 1] for 50 steps.
      evaluation 0 at t0: a plain transfer step t0 -> t0 - r (r = step_ratio);
      evaluation 1 at the repeated t1 = t0 - r, on that result: redo the step t0 -> t1 from the start with
        the mean of both eps (the evaluation-1 eps is not kept in the history);
      evaluation k >= 2 at t: one transfer step t -> t - r with the Adams-Bashforth mix of the newest
        (up to 4) kept eps e0 (newest), e1, e2, e3:
        e0,  (3 e0 - e1) / 2,  (23 e0 - 16 e1 + 5 e2) / 12,  (55 e0 - 59 e1 + 37 e2 - 9 e3) / 24.
    Below t = 0 the step lands on abar_0 (set_alpha_to_one=False). Every step moves by exactly r, as in
    diffusers, also when img2img has sliced this list (then the repeat may be gone: kept for parity).
    """
    abar = schedule.alphas_cumprod()
    kept_eps: list[torch.Tensor] = []  # history for the multistep formula, newest last
    x_start = x
    for i, t in enumerate(int(t) for t in timesteps):
        eps = eps_model(x, _timestep(t, x))
        if i == 0:  # warm-up, first half: a plain step from t
            t_from, t_to, eps_step, x_start = t, t - step_ratio, eps, x
            kept_eps.append(eps)
        elif i == 1:  # warm-up, second half: eps at the end point; redo the step from x_start with the mean
            t_from, t_to, eps_step, x = t + step_ratio, t, (eps + kept_eps[-1]) / 2, x_start
        else:  # linear multistep (Adams-Bashforth) on the kept eps
            kept_eps = (kept_eps + [eps])[-4:]
            e = kept_eps[::-1]  # newest first
            if len(e) == 2:
                eps_step = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                eps_step = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                eps_step = (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24
            t_from, t_to = t, t - step_ratio
        a_from, a_to = abar[t_from], abar[t_to] if t_to >= 0 else abar[0]
        x0 = (x - (1 - a_from) ** 0.5 * eps_step) / a_from**0.5
        x = _pndm_transfer(x, eps_step, a_from, a_to)
        if _report(callback, i, t, _vp_sigma(abar[t]), _vp_sigma(a_to), x, x0):
            break
    return x


LCM_SIGMA_DATA = 0.5  # sigma_data of the consistency-model boundary condition (Song et al. 2023; LCM keeps it)
LCM_TIMESTEP_SCALING = 10.0  # LCM's scale from the training timestep to the boundary condition's time variable


def lcm_boundary_scalings(t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of a latent consistency model at timestep t (Luo et al. 2023, eq. 9; Song et al. 2023):

        f(x, t) = c_skip(t) x + c_out(t) x0_pred,   c_skip = sd^2 / (s^2 + sd^2),  c_out = s / sqrt(s^2 + sd^2)

    with s = 10 t and sd = 0.5, so that f is the identity at t = 0. In float32, as diffusers' LCMScheduler.
    At SD's timesteps c_skip is ~0 (7e-6 at t = 19): the step is, in effect, the model's x_0 estimate.
    """
    s = torch.tensor(float(t) * LCM_TIMESTEP_SCALING, dtype=torch.float32)
    c_skip = LCM_SIGMA_DATA**2 / (s**2 + LCM_SIGMA_DATA**2)
    c_out = s / (s**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def lcm(
    eps_model: EpsModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1; Luo et al. 2023,
    "Latent Consistency Models", Algorithm 3), for an LCM or a model with an LCM-LoRA (diffusers' LCMScheduler).

    x: the VP latent at timesteps[0]; timesteps: integers from `schedule.lcm_timesteps`. Each step maps x_t
    straight to a clean estimate x_0 = f(x_t, t) (`lcm_boundary_scalings`), then noises it afresh to the next
    timestep, x = sqrt(abar_next) x_0 + sqrt(1 - abar_next) z with z ~ N(0, I) from `generator`; the last
    step returns x_0 itself. Stochastic by design: the fresh noise is what lets a few steps refine the image.
    """
    abar = schedule.alphas_cumprod()
    last = len(timesteps) - 1
    for i, t in enumerate(int(t) for t in timesteps):
        a_t = abar[t]
        eps = eps_model(x, _timestep(t, x))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # the model's x_0 estimate
        c_skip, c_out = lcm_boundary_scalings(t)
        denoised = c_out * x0 + c_skip * x  # the consistency function f(x_t, t)
        if i < last:
            a_next = abar[int(timesteps[i + 1])]
            x = a_next.sqrt() * denoised + (1 - a_next).sqrt() * _randn_like(denoised, generator)
            sigma_next = _vp_sigma(a_next)
        else:
            x, sigma_next = denoised, 0.0
        if _report(callback, i, t, _vp_sigma(a_t), sigma_next, x, denoised):
            break
    return x


# --------------------------------------------------------------------------- sigma-space samplers


def euler(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

    Karras et al. 2022, Algorithm 1 without its second-order correction (lines 3-4); k-diffusion's
    `sample_euler`; diffusers' EulerDiscreteScheduler. x: the latent at sigmas[0]; sigmas: (n+1,) with
    sigmas[-1] = 0; timesteps: (n,) the model timestep of each sigma.
    """
    for i in range(len(timesteps)):
        denoised = denoise(eps_model, x, sigmas[i], timesteps[i])
        d = (x - denoised) / sigmas[i]  # dx/dsigma
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if _report(callback, i, timesteps[i], sigmas[i], sigmas[i + 1], x, denoised):
            break
    return x


def euler_a(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler ancestral: DDPM's ancestral sampling (Ho et al. 2020, Algorithm 2) in sigma form.

    Each step sigma -> sigma_next is split into a deterministic Euler step down to sigma_down and fresh
    noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (`_ancestral_step`; diffusers'
    EulerAncestralDiscreteScheduler):
        sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),  sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    """
    for i in range(len(timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(eps_model, x, sigma, timesteps[i])
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        x = x + _randn_like(x, generator) * sigma_up
        if _report(callback, i, timesteps[i], sigma, sigma_next, x, denoised):
            break
    return x


def heun(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    callback: Callback | None = None,
    on_predictor: Callable[[dict], None] | None = None,
    timestep_end: float = 0.0,
) -> torch.Tensor:
    """Heun's second-order method: Karras et al. 2022, Algorithm 1 (deterministic, S_churn = 0).

    An Euler step to sigma_next, then the slope there averaged with the first (trapezoid rule); the last step,
    to sigma = 0, stays a plain Euler step. Two model evaluations per step but the last, the second at
    (sigmas[i+1], timesteps[i+1]), as diffusers' HeunDiscreteScheduler interleaves them; a last step that ends
    above 0 (KL Optimal's) is corrected too, with the model told `timestep_end` there.

    `on_predictor(info)` sees the Euler point before the model is evaluated there ({"i", "sigma_next", "x"},
    x editable in place), as diffusers' pipelines see every interleaved half step (inpainting blends it).
    """
    for i in range(len(timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(eps_model, x, sigma, timesteps[i])
        d = (x - denoised) / sigma  # Algorithm 1, line 3
        x_euler = x + d * (sigma_next - sigma)  # line 4
        if sigma_next > 0:  # lines 5-7: correct with the slope at the end point
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else timestep_end
            if on_predictor is not None:
                on_predictor({"i": i, "t": t_next, "sigma_next": sigma_next, "x": x_euler})
            d_next = (x_euler - denoise(eps_model, x_euler, sigma_next, t_next)) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        else:
            x = x_euler
        if _report(callback, i, timesteps[i], sigma, sigma_next, x, denoised):
            break
    return x


def dpm_2(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    timesteps_mid: torch.Tensor,
    callback: Callback | None = None,
    on_predictor: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """DPM2: Karras et al. 2022, Algorithm 2 (S_churn = 0) with its Heun correction replaced by a midpoint step in
    log sigma, which is DPM-Solver-2 (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic
    Model Sampling in Around 10 Steps", r_1 = 1/2) in sigma form; k-diffusion's `sample_dpm_2`; diffusers'
    KDPM2DiscreteScheduler.

    The slope at sigma carries x half the way (in log sigma) to sigma_mid, and the slope found there takes the
    whole step from x (the explicit midpoint rule):
        d = (x - D(x; sigma)) / sigma,     sigma_mid = sqrt(sigma sigma_next)       (`dpm_2_midpoints`)
        x_mid = x + d (sigma_mid - sigma),  d_mid = (x_mid - D(x_mid; sigma_mid)) / sigma_mid
        x_next = x + d_mid (sigma_next - sigma)
    The last step, to sigma = 0, is a plain Euler step (x_next = D(x; sigma)). Two model evaluations per step but
    the last, the second at (sigma_mid, timesteps_mid[i]): timesteps_mid (n,) is the model timestep of each
    midpoint (its last entry, for the step without one, unused).

    `on_predictor(info)` sees the midpoint before the model is evaluated there ({"i", "t", "sigma_mid",
    "sigma_next", "x"}, x editable in place), as diffusers' pipelines see every interleaved half step. Inpainting
    blends it; diffusers then noises the kept region to the step's sigma_next, not to sigma_mid (its interleaved
    sigma list holds sigma_next at a midpoint's index), and so does sd15's blend, for parity.
    """
    return _dpm_2_steps(eps_model, x, sigmas, timesteps, timesteps_mid, None, callback, on_predictor, ancestral=False)


def dpm_2_a(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    timesteps_mid: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    on_predictor: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """DPM2 ancestral: the `dpm_2` step down to sigma_down, then fresh noise of std sigma_up, as `euler_a` does
    with an Euler step (k-diffusion's `sample_dpm_2_ancestral`; diffusers' KDPM2AncestralDiscreteScheduler):
        sigma_down, sigma_up = `_ancestral_step`(sigma, sigma_next),  sigma_mid = sqrt(sigma sigma_down)
        x_mid = x + d (sigma_mid - sigma),  d_mid = (x_mid - D(x_mid; sigma_mid)) / sigma_mid
        x_next = x + d_mid (sigma_down - sigma) + sigma_up z,      z ~ N(0, I)
    Since sigma_down = sigma_next^2 / sigma, sigma_mid = sigma_next: the second slope is taken at the Euler point
    for sigma_next (up to rounding; its timestep is computed from sigma_mid all the same, as diffusers does).
    The last step, to sigma = 0, is a plain Euler step with no noise, and draws none (diffusers draws z only
    after a midpoint evaluation, so n steps draw n - 1 times; k-diffusion draws on the last step too).
    Two model evaluations per step but the last; timesteps_mid and `on_predictor` as in `dpm_2`.
    """
    return _dpm_2_steps(eps_model, x, sigmas, timesteps, timesteps_mid, generator, callback, on_predictor, ancestral=True)


def _dpm_2_steps(eps_model, x, sigmas, timesteps, timesteps_mid, generator, callback, on_predictor, ancestral: bool):
    """The loop of `dpm_2` (ancestral=False: each step lands on sigma_next) and `dpm_2_a` (ancestral=True: it lands
    on sigma_down, and noise of std sigma_up is added)."""
    sigmas_mid = dpm_2_midpoints(sigmas, ancestral)
    for i in range(len(timesteps)):
        sigma, sigma_mid, sigma_next = sigmas[i], sigmas_mid[i], sigmas[i + 1]
        denoised = denoise(eps_model, x, sigma, timesteps[i])
        d = (x - denoised) / sigma
        if sigma_next > 0:
            sigma_end, sigma_up = _ancestral_step(sigma, sigma_next) if ancestral else (sigma_next, None)
            x_mid = x + d * (sigma_mid - sigma)
            if on_predictor is not None:
                info = {"i": i, "t": timesteps_mid[i], "sigma_mid": sigma_mid, "sigma_next": sigma_next, "x": x_mid}
                on_predictor(info)
            d_mid = (x_mid - denoise(eps_model, x_mid, sigma_mid, timesteps_mid[i])) / sigma_mid
            x = x + d_mid * (sigma_end - sigma)
            if ancestral:
                x = x + _randn_like(x, generator) * sigma_up
        else:
            x = x + d * (sigma_next - sigma)  # Euler to sigma = 0: x = denoised
        if _report(callback, i, timesteps[i], sigma, sigma_next, x, denoised):
            break
    return x


def dpmpp_2s_a_midpoints(sigmas: torch.Tensor) -> torch.Tensor:
    """(n,) the noise level of DPM++ 2S a's second evaluation in each step of `sigmas` (n+1,): halfway in
    t = -log sigma between sigma_i and the ancestral step's sigma_down, computed as k-diffusion does (in float32,
    exp(-(t + h/2))), so the plan's midpoint timesteps belong to the very sigmas the sampler evaluates; 0 for a
    step with no second evaluation (sigma_down = 0, the step to sigma = 0)."""
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    sigma_down = _ancestral_step(sigma, sigma_next)[0]
    t, t_next = sigma.log().neg(), sigma_down.log().neg()
    return torch.where(sigma_down > 0, (t + (t_next - t) * 0.5).neg().exp(), 0.0)


def dpmpp_2s_a(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    timesteps_mid: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    on_predictor: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """DPM++ 2S a: the single-step second-order DPM-Solver++(2S) of Lu et al. 2022 (their Algorithm 1 with
    r = 1/2), taken as the deterministic part of an ancestral step, as k-diffusion's
    `sample_dpmpp_2s_ancestral` (eta = 1) and the web UI's "DPM++ 2S a". diffusers has no scheduler for it.

    Each step goes from sigma down to sigma_down (`_ancestral_step`), in log-noise time t = -log sigma,
    h = t_down - t, through a midpoint s = t + h/2 (sigma_s = sqrt(sigma sigma_down), `dpmpp_2s_a_midpoints`):
        x_s    = (sigma_s / sigma) x - expm1(-h/2) D(x; sigma)              (first-order step to the midpoint)
        x_down = (sigma_down / sigma) x - expm1(-h) D(x_s; sigma_s)         (the whole step, with the midpoint's x_0)
        x_next = x_down + sigma_up z,   z ~ N(0, I)
    Using the midpoint's estimate of x_0 for the whole step is what makes it second order: that is the
    exponential integrator of `dpmpp_2m` with its x_0 taken halfway instead of extrapolated from the last step.
    A step with sigma_down = 0 (the last) is an Euler step to 0 (x = D(x; sigma)) with no noise and no draw,
    as in k-diffusion. Two model evaluations per step but the last; timesteps_mid and `on_predictor` as in `dpm_2`.
    """
    sigmas_mid = dpmpp_2s_a_midpoints(sigmas)
    for i in range(len(timesteps)):
        sigma, sigma_mid, sigma_next = sigmas[i], sigmas_mid[i], sigmas[i + 1]
        denoised = denoise(eps_model, x, sigma, timesteps[i])
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)  # Euler to sigma = 0: x = denoised
        else:
            h = sigma.log() - sigma_down.log()  # t_down - t
            x_mid = (sigma_mid / sigma) * x - torch.expm1(-h * 0.5) * denoised
            if on_predictor is not None:
                info = {"i": i, "t": timesteps_mid[i], "sigma_mid": sigma_mid, "sigma_next": sigma_next, "x": x_mid}
                on_predictor(info)
            denoised_mid = denoise(eps_model, x_mid, sigma_mid, timesteps_mid[i])
            x = (sigma_down / sigma) * x - torch.expm1(-h) * denoised_mid
        if sigma_next > 0:
            x = x + _randn_like(x, generator) * sigma_up
        if _report(callback, i, timesteps[i], sigma, sigma_next, x, denoised):
            break
    return x


class BrownianNoise:
    """Standard normal noise for an SDE sampler that asks for the noise of overlapping intervals (DPM++ SDE asks for
    [sigma, sigma_mid] and then [sigma, sigma_next]): the normalized increment of one Brownian path W per image,
        z(a, b) = (W(b) - W(a)) / sqrt(|b - a|)  ~ N(0, I),
    so that the two draws of a step are correlated as the SDE's noise over nested intervals is. A Brownian tree
    (torchsde's BrownianInterval, as k-diffusion's `BrownianTreeNoiseSampler` and diffusers' DPMSolverSDEScheduler
    use it) gives W at any point from one seed, the same whichever points are asked in whichever order.

    One tree per row, seeded by a 63-bit number drawn from that row's generator (a single generator: one tree for
    the whole batch; None: torch's global RNG, as diffusers without `noise_sampler_seed`), or, for CUDA's generator
    (sd15.philox, rng="nv": the web UI's noise), by the row's seed itself, as the web UI seeds its trees. The tree lives on the
    CPU in float32 and its increments are moved to x, so an image is the same on any device. Its interval is
    [sigma_min, sigma_max] of the whole schedule, not only of the steps run (img2img), as diffusers'.
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, generator=None):
        try:
            import torchsde
        except ImportError:  # a dependency of sd15; only a partial install lacks it
            raise ImportError("dpmpp_sde needs torchsde: pip install torchsde") from None
        generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        self.batched = isinstance(generator, (list, tuple))
        shape = x.shape[1:] if self.batched else x.shape
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)  # float32, as diffusers passes them
        # CUDA's generator (rng="nv", the web UI's noise): the tree seeded with the image's seed, as the web UI seeds it
        seeds = [g.seed if isinstance(g, PhiloxGenerator) else int(torch.randint(0, 2**63 - 1, (), generator=g)) for g in generators]
        self.trees = [
            torchsde.BrownianInterval(t0=t0, t1=t1, size=shape, dtype=torch.float32, device="cpu", entropy=seed,
                                      tol=1e-6, pool_size=24, halfway_tree=True)  # torchsde's BrownianTree settings
            for seed in seeds
        ]  # fmt: skip

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """z(sigma, sigma_next) shaped, typed and placed like `like`."""
        lo, hi = sorted((sigma, sigma_next))
        with warnings.catch_warnings():  # after exp(-(-log sigma)) an end may lie an ulp outside the tree's interval:
            warnings.filterwarnings("ignore", "Should have t[ab]")  # torchsde warns and clamps it, as it does for diffusers
            w = torch.stack([tree(lo, hi) for tree in self.trees])  # W(hi) - W(lo)
        w = (w if self.batched else w[0]) * (1.0 if sigma < sigma_next else -1.0)  # W(sigma_next) - W(sigma)
        return (w / (sigma_next - sigma).abs().sqrt()).to(device=like.device, dtype=like.dtype)


def dpmpp_sde(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    timesteps_mid: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    on_predictor: Callable[[dict], None] | None = None,
    sigma_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """DPM++ SDE: the second-order singlestep SDE solver DPM-Solver++(2S) of Lu et al. 2022 ("DPM-Solver++: Fast
    Solver for Guided Sampling of Diffusion Probabilistic Models") with ancestral noise at both stages, as
    k-diffusion's `sample_dpmpp_sde` (eta = 1, r = 1/2) and diffusers' DPMSolverSDEScheduler; "DPM++ SDE" in the
    web UI. In log-noise time t = -log sigma, each step to t_next takes two stages of one ancestral step each:
        stage 1: t -> s = t + h/2 (sigma_mid = sqrt(sigma sigma_next)), from D(x; sigma):
                 x_mid = (sigma_d / sigma) x - expm1(t - t_d) D(x; sigma) + sigma_up z(sigma, sigma_mid)
        stage 2: t -> t_next, from the same x with the midpoint's estimate D(x_mid; sigma_mid):
                 x_next = (sigma_d / sigma) x - expm1(t - t_d) D(x_mid; sigma_mid) + sigma_up z(sigma, sigma_next)
    where each stage's (sigma_d, sigma_up) = `_ancestral_step`(sigma, its target), t_d = -log sigma_d: the
    exponential-integrator step (exact for a constant x_0 estimate) down to sigma_d, then fresh noise up to the
    target. The noise comes from one Brownian path per image (`BrownianNoise`), which is what makes the two
    stages' noises consistent. The last step, to sigma = 0, is an Euler step with one evaluation.
    timesteps_mid (n,): the model timestep of each midpoint (the last unused); `on_predictor` as in `dpm_2`.
    sigma_range: (sigma_min, sigma_max) of the whole schedule (default: of `sigmas`), the Brownian tree's interval.
    Every quantity is computed as diffusers does, in float32 and in its order, down to sigma = exp(-(-log sigma)).
    """
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    if sigma_range is None:
        sigma_range = (float(sigmas[sigmas > 0].min()), float(sigmas.max()))
    noise = BrownianNoise(x, *sigma_range, generator)

    def ancestral_stage(x, denoised, t, t_to):
        """x at sigma_fn(t) -> sigma_fn(t_to): the deterministic step to sigma_down, then noise of std sigma_up."""
        sigma_from, sigma_to = sigma_fn(t), sigma_fn(t_to)
        sigma_up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        t_down = t_fn((sigma_to**2 - sigma_up**2) ** 0.5)
        x = (sigma_fn(t_down) / sigma_fn(t)) * x - (t - t_down).expm1() * denoised
        return x + noise(sigma_fn(t), sigma_fn(t_to), like=x) * sigma_up

    for i in range(len(timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(eps_model, x, sigma, timesteps[i])
        if sigma_next > 0:
            t, t_next = t_fn(sigma), t_fn(sigma_next)
            t_mid = t + (t_next - t) * 0.5
            x_mid = ancestral_stage(x, denoised, t, t_mid)
            if on_predictor is not None:
                info = {"i": i, "t": timesteps_mid[i], "sigma_mid": sigma_fn(t_mid), "sigma_next": sigma_next, "x": x_mid}
                on_predictor(info)
            x = ancestral_stage(x, denoise(eps_model, x_mid, sigma_fn(t_mid), timesteps_mid[i]), t, t_next)
        else:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)  # Euler to sigma = 0: x = denoised
        if _report(callback, i, timesteps[i], sigma, sigma_next, x, denoised):
            break
    return x


def _lms_coefficient(sigmas: torch.Tensor, i: int, order: int, j: int) -> float:
    """integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through sigma_i, …, sigma_{i-order+1}
    that is 1 at sigma_{i-j}: the weight of the slope from j steps ago. Integrated exactly (it is a polynomial)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    basis = np.poly1d([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis *= np.poly1d([1.0, -node]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


def lms(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    order: int = 4,
    start: int = 0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma) on the probability-flow ODE, up to 4th order.

    The slope d_i = (x - D(x; sigma_i)) / sigma_i is extrapolated with the last `order` slopes' Lagrange
    polynomial and integrated exactly over [sigma_i, sigma_{i+1}] (k-diffusion's `sample_lms`, after
    Karras et al. 2022's ODE; diffusers' LMSDiscreteScheduler, which integrates numerically).

    start: img2img runs only steps start … n-1 of the full `sigmas`/`timesteps`. diffusers' LMS still takes
    the order from the absolute step (min(i + 1, order)) and so uses the basis over sigmas before `start`,
    as if the skipped steps had slope 0; we do the same, for parity. start = 0 is the plain method.
    """
    slopes: list[torch.Tensor] = []  # newest last
    for i in range(start, len(timesteps)):
        denoised = denoise(eps_model, x, sigmas[i], timesteps[i])
        slopes = (slopes + [(x - denoised) / sigmas[i]])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(sigmas, i, cur_order, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes)))  # zip drops the skipped steps' terms
        if _report(callback, i - start, timesteps[i], sigmas[i], sigmas[i + 1], x, denoised):
            break
    return x


def dpmpp_2m(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2 (multistep second order, data prediction), in sigma form (k-diffusion's
    `sample_dpmpp_2m`; diffusers' DPMSolverMultistepScheduler defaults: order 2, midpoint, lower_order_final).

    With lambda = -log sigma (the half log-SNR) and h = lambda_next - lambda:
        x_next = (sigma_next / sigma) x - (e^{-h} - 1) D,
    where D = denoised on the first step (first order, = DDIM) and otherwise the midpoint extrapolation
        D = denoised + (denoised - denoised_prev) / (2 r),  r = h_prev / h.
    The last step, to sigma = 0, is first order: x = denoised.
    """
    old_denoised, h_prev = None, None
    for i in range(len(timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(eps_model, x, sigma, timesteps[i])
        if sigma_next == 0:
            x = denoised  # the h -> infinity limit of the update
        else:
            h = torch.log(sigma) - torch.log(sigma_next)  # lambda_next - lambda
            D = denoised if old_denoised is None else denoised + (denoised - old_denoised) / (2 * (h_prev / h))
            x = (sigma_next / sigma) * x - torch.expm1(-h) * D
            h_prev = h
        old_denoised = denoised
        if _report(callback, i, timesteps[i], sigma, sigma_next, x, denoised):
            break
    return x


def _draws_as_cuda(generator) -> bool:
    """Whether the noise is CUDA's generator's (sd15.philox, rng="nv"), with the web UI's conventions for it."""
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    return bool(generators) and all(isinstance(g, PhiloxGenerator) for g in generators)


def dpmpp_2m_sde(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    solver: str = "midpoint",
    brownian: "BrownianNoise | None" = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: the stochastic variant of Lu et al. 2022 (the "SDE-DPM-Solver++" of their
    appendix, as in diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") and k-diffusion's
    `sample_dpmpp_2m_sde` with eta = 1). With h = lambda_next - lambda, lambda = -log sigma and
    d = (denoised - denoised_prev) / r, r = h_prev / h (the slope of the data prediction, per step):
        x_next = (sigma_next / sigma) e^{-h} x + (1 - e^{-2h}) denoised + c d + sigma_next sqrt(1 - e^{-2h}) z,
    where the second-order correction's weight c is (1 - e^{-2h}) / 2 for solver "midpoint" (the sampler
    `dpmpp_2m_sde`), and 1 - (1 - e^{-2h}) / (2h) for solver "heun" (`dpmpp_2m_sde_heun`, the web UI's
    "DPM++ 2M SDE Heun": the exact integral of the linearly extrapolated data prediction). The first step is
    first order (c = 0) and the last, to sigma = 0, gives x = denoised. z is drawn in float32, as diffusers does,
    or, given `brownian`, is the Brownian path's increment over the step, as k-diffusion and the web UI draw it.
    """
    if solver not in ("midpoint", "heun"):
        raise ValueError(f"solver must be 'midpoint' or 'heun', got {solver!r}")
    old_denoised, h_prev = None, None
    for i in range(len(timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(eps_model, x, sigma, timesteps[i])
        if brownian is None:
            z = _randn_like(x, generator, dtype=torch.float32)  # drawn every step, as diffusers does
        elif sigma_next > 0:
            z = brownian(sigma, sigma_next, x)
        if sigma_next == 0:
            x = denoised
        else:
            h = torch.log(sigma) - torch.log(sigma_next)
            one_minus_e2h = -torch.expm1(-2 * h)  # 1 - e^{-2h}
            x = (sigma_next / sigma) * torch.exp(-h) * x + one_minus_e2h * denoised
            if old_denoised is not None:
                d = (denoised - old_denoised) / (h_prev / h)
                c = one_minus_e2h / 2 if solver == "midpoint" else 1 - one_minus_e2h / (2 * h)
                x = x + c * d
            x = x + sigma_next * one_minus_e2h**0.5 * z
            h_prev = h
        old_denoised = denoised
        if _report(callback, i, timesteps[i], sigma, sigma_next, x, denoised):
            break
    return x


def dpmpp_3m_sde(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    sigma_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: `dpmpp_2m_sde` with one more past x_0 estimate, as k-diffusion's
    `sample_dpmpp_3m_sde` (eta = 1) and the web UI's "DPM++ 3M SDE". diffusers has no scheduler for it (its
    DPMSolverMultistepScheduler's third order is deterministic only).

    With lambda = -log sigma, h = lambda_next - lambda and h2 = 2h (eta = 1 doubles the exponential decay):
        x_next = e^{-h2} x + (1 - e^{-h2}) D0 + phi_2 d1 - phi_3 d2 + sigma_next sqrt(1 - e^{-h2}) z,
        phi_2 = 1 - (1 - e^{-h2}) / h2,   phi_3 = phi_2 / h2 - 1/2,
    where d1 and d2 are the first and second divided differences of the last three x_0 estimates over the
    log-noise steps (r0 = h_prev / h, r1 = h_prev2 / h):
        d1_0 = (D0 - D1) / r0,  d1_1 = (D1 - D2) / r1,
        d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1),  d2 = (d1_0 - d1_1) / (r0 + r1).
    The first step is first order (no history), the second is the Heun variant of `dpmpp_2m_sde` (phi_2 d1_0
    only), and the last, to sigma = 0, gives x = denoised. (e^{-h2} x is (sigma_next / sigma) e^{-h} x, since
    sigma_next / sigma = e^{-h}.) The noise z comes from one Brownian path per image (`BrownianNoise`), as k-diffusion
    and the web UI draw it; sigma_range as in `dpmpp_sde`.
    """
    if sigma_range is None:
        sigma_range = (float(sigmas[sigmas > 0].min()), float(sigmas.max()))
    noise = BrownianNoise(x, *sigma_range, generator)
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(len(timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(eps_model, x, sigma, timesteps[i])
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h2 = 2 * h
            x = torch.exp(-h2) * x - torch.expm1(-h2) * denoised
            phi_2 = torch.expm1(-h2) / h2 + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h2 - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            x = x + noise(sigma, sigma_next, like=x) * sigma_next * (-torch.expm1(-h2)).sqrt()
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
        if _report(callback, i, timesteps[i], sigma, sigma_next, x, denoised):
            break
    return x


def unipc(
    eps_model: EpsModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """UniPC-2 with B(h) = e^h - 1 ("bh2"), data prediction: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
    Framework for Fast Sampling of Diffusion Models", Algorithms 1-2 (UniP-p predictor, UniC-p corrector);
    diffusers' UniPCMultistepScheduler defaults (solver_order 2, predict_x0, bh2, lower_order_final), in sigma form.

    With lambda = -log sigma, h = lambda_to - lambda_from, B = e^{-h} - 1 and the first-order (DDIM) update
        x_lin = (sigma_to / sigma_from) x_from - B m_from,           m = denoised:
    predictor (UniP), from step i:  order 1: x_{i+1} = x_lin;   order 2: x_{i+1} = x_lin - B * D / 2,
        D = (m_{i-1} - m_i) / r, r = (lambda_{i-1} - lambda_i) / h   (the same step as DPM-Solver++(2M));
    corrector (UniC), once the model has seen x_{i+1}: redo the step from x_i using m_{i+1} too,
        order 1: x_{i+1} = x_lin - B (m_{i+1} - m_i) / 2
        order 2: x_{i+1} = x_lin - B (rho_0 D + rho_1 (m_{i+1} - m_i)), [[1, 1], [r, 1]] rho = [b_1, b_2],
                 b_k = k! hh phi_{k+1}(hh) / B,  hh = -h,  phi_1(hh) = (e^hh - 1)/hh,  phi_{k+1} = (phi_k - 1/k!)/hh.
    The corrector reuses the evaluation the next predictor needs anyway, so it costs no extra model call.
    Orders: the predictor uses min(2, steps done + 1, steps left); the corrector the order of the step it corrects.
    """
    n = len(timesteps)
    lambdas = -torch.log(sigmas[:n])
    ms: list[torch.Tensor] = []  # denoised of each step so far, newest last
    x_from, order_from = None, 0  # the (corrected) latent the last predictor step started from, its order
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        m = denoise(eps_model, x, sigma, timesteps[i])
        if x_from is not None:  # UniC: redo the last step, from x_from at sigma_{i-1} to sigma_i, knowing m
            h = lambdas[i] - lambdas[i - 1]
            B = torch.expm1(-h)
            x_lin = (sigma / sigmas[i - 1]) * x_from - B * ms[-1]
            if order_from == 1:
                x = x_lin - B * (m - ms[-1]) / 2
            else:
                r = (lambdas[i - 2] - lambdas[i - 1]) / h
                h_phi_2 = B / -h - 1  # hh phi_2(hh), hh = -h
                h_phi_3 = h_phi_2 / -h - 1 / 2  # hh phi_3(hh)
                b1, b2 = h_phi_2 / B, 2 * h_phi_3 / B
                rho0 = (b1 - b2) / (1 - r)  # solves [[1, 1], [r, 1]] (rho0, rho1) = (b1, b2)
                rho1 = b1 - rho0
                x = x_lin - B * (rho0 * (ms[-2] - ms[-1]) / r + rho1 * (m - ms[-1]))
        ms = (ms + [m])[-3:]
        x_from, order_from = x, min(2, i + 1, n - i)
        if sigma_next == 0:  # UniP to sigma = 0 (first order there): the h -> infinity limit
            x = m
        else:  # UniP
            h = torch.log(sigma) - torch.log(sigma_next)
            B = torch.expm1(-h)
            x = (sigma_next / sigma) * x - B * m
            if order_from == 2:
                r = (lambdas[i - 1] - lambdas[i]) / h
                x = x - B * ((ms[-2] - m) / r) / 2
        if _report(callback, i, timesteps[i], sigma, sigma_next, x, m):
            break
    return x


# --------------------------------------------------------------------------- the plan the pipeline runs


_VP_SAMPLERS = ("ddim", "pndm", "lcm")  # VP latent, integer timesteps (LCM's on its own grid)
_MULTISTEP = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "unipc")  # DPMSolverMultistep/UniPCMultistep timestep grids
_DPM_2 = ("dpm_2", "dpm_2_a")  # a second evaluation per step, at a midpoint with its own timestep
_DEFAULT_SPACING = {"ddim": "leading", "pndm": "leading"}  # the others default to "linspace" in diffusers


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields, not plans
class SamplingPlan:
    """What one sampling run does: the full schedule of `steps` steps, and where img2img starts in it.

    timesteps: (n,) float32, the model timesteps of the full schedule (diffusers' `scheduler.timesteps`,
        except that Heun's, DPM2's and DPM++ SDE's are listed once per step, not interleaved; PNDM's has
        steps + 1 entries).
    sigmas: (n+1,) float32 noise levels ending in 0 for the sigma-space samplers; None for ddim/pndm/lcm.
    start: index of the first step run: 0 for txt2img, steps - int(steps * strength) for img2img, as
        diffusers' StableDiffusionImg2ImgPipeline.get_timesteps (its `order` factor is Heun's, DPM2's and
        DPM++ SDE's interleaving).
    init_noise_sigma: the scale of pure-noise latents (txt2img) in this sampler's space.
    timesteps_mid: (n,) float32 for dpm_2/dpm_2_a/dpmpp_sde: the model timestep of each step's midpoint
        (`dpm_2_midpoints`, or sqrt(sigma sigma_next) for dpmpp_sde), the entries diffusers interleaves between
        `timesteps`; None for the others.
    """

    sampler: str
    steps: int
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None
    start: int
    init_noise_sigma: float
    eta: float = 0.0
    step_ratio: int = 0  # T // steps: the stride of ddim/pndm
    timesteps_mid: torch.Tensor | None = None
    timestep_end: float = 0.0  # the model timestep of sigmas[-1] where that is above 0 (KL Optimal): Heun evaluates there

    def noise_latents(self, noise: torch.Tensor, init_latents: torch.Tensor | None = None) -> torch.Tensor:
        """The starting latent: `noise * init_noise_sigma` (txt2img), or `init_latents` noised to the first
        step run (img2img: diffusers' `scheduler.add_noise` at `timesteps[start]`)."""
        if init_latents is None:
            if self.start > 0:
                raise ValueError("strength < 1 (img2img) needs init_latents")
            return noise * self.init_noise_sigma
        if self.sigmas is None:  # VP: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
            abar = schedule.alphas_cumprod()[int(self.timesteps[self.start])]
            return abar**0.5 * init_latents + (1 - abar) ** 0.5 * noise
        return init_latents + self.sigmas[self.start] * noise  # x = x_0 + sigma eps

    def sample(
        self,
        eps_model: EpsModel,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        on_predictor: Callable[[dict], None] | None = None,
    ) -> torch.Tensor:
        """Run the sampler from `x` (from `noise_latents`); returns the final VP latent (x_0 at sigma = 0).

        If `callback` returns True the run stops and the latent at that point is returned, scaled to VP.
        `on_predictor` goes to Heun, DPM2 and DPM++ SDE (see `heun`, `dpm_2`); the other samplers have no intermediate point.
        """
        ts, sigmas, s = self.timesteps, self.sigmas, self.start
        last = {}

        def remember(info: dict) -> bool | None:
            last["sigma_next"] = info["sigma_next"]
            return callback(info) if callback is not None else None

        cb = remember  # every sampler reports through it, so we know where an early stop left x
        if self.sampler == "ddim":
            return ddim(eps_model, x, ts[s:], self.step_ratio, self.eta, generator, cb)
        if self.sampler == "pndm":
            return pndm(eps_model, x, ts[s:], self.step_ratio, cb)
        if self.sampler == "lcm":
            return lcm(eps_model, x, ts[s:], generator, cb)
        if self.sampler == "euler":
            x = euler(eps_model, x, sigmas[s:], ts[s:], cb)
        elif self.sampler == "euler_a":
            x = euler_a(eps_model, x, sigmas[s:], ts[s:], generator, cb)
        elif self.sampler == "heun":
            x = heun(eps_model, x, sigmas[s:], ts[s:], cb, on_predictor, self.timestep_end)
        elif self.sampler == "dpm_2":
            x = dpm_2(eps_model, x, sigmas[s:], ts[s:], self.timesteps_mid[s:], cb, on_predictor)
        elif self.sampler == "dpm_2_a":
            x = dpm_2_a(eps_model, x, sigmas[s:], ts[s:], self.timesteps_mid[s:], generator, cb, on_predictor)
        elif self.sampler == "lms":
            x = lms(eps_model, x, sigmas, ts, start=s, callback=cb)
        elif self.sampler == "dpmpp_2m":
            x = dpmpp_2m(eps_model, x, sigmas[s:], ts[s:], cb)
        elif self.sampler in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun"):
            solver = "heun" if self.sampler == "dpmpp_2m_sde_heun" else "midpoint"
            brownian = None
            if _draws_as_cuda(generator):  # the web UI's: a Brownian tree seeded with the image's seed
                brownian = BrownianNoise(x, float(sigmas[sigmas > 0].min()), float(sigmas.max()), generator)
            x = dpmpp_2m_sde(eps_model, x, sigmas[s:], ts[s:], generator, cb, solver, brownian)
        elif self.sampler == "dpmpp_sde":  # its Brownian noise spans the whole schedule, also in img2img
            sigma_range = (float(sigmas[sigmas > 0].min()), float(sigmas.max()))
            x = dpmpp_sde(eps_model, x, sigmas[s:], ts[s:], self.timesteps_mid[s:], generator, cb, on_predictor, sigma_range)
        elif self.sampler == "dpmpp_2s_a":
            x = dpmpp_2s_a(eps_model, x, sigmas[s:], ts[s:], self.timesteps_mid[s:], generator, cb, on_predictor)
        elif self.sampler == "dpmpp_3m_sde":  # a Brownian path over the whole schedule, as dpmpp_sde's
            sigma_range = (float(sigmas[sigmas > 0].min()), float(sigmas.max()))
            x = dpmpp_3m_sde(eps_model, x, sigmas[s:], ts[s:], generator, cb, sigma_range)
        elif self.sampler == "unipc":
            x = unipc(eps_model, x, sigmas[s:], ts[s:], cb)
        sigma_end = last.get("sigma_next", 0.0)  # 0 unless the callback stopped the run early (or KL Optimal's end)
        if sigma_end == 0 or sigma_end == float(sigmas[-1]):  # a whole run: KL Optimal's x at sigma_min is decoded as is, as the web UI does
            return x
        return x / (sigma_end**2 + 1) ** 0.5  # x_0 + sigma eps -> VP latent


def _without_penultimate_sigma(full: SamplingPlan, strength: float) -> SamplingPlan:
    """`full`'s grid with its next-to-last noise level (and that step's timestep) left out, as the web UI's
    `torch.cat([sigmas[:-2], sigmas[-1:]])`; the midpoints recomputed for the new last step; img2img's start
    counted on the steps that remain."""
    sigmas = torch.cat([full.sigmas[:-2], full.sigmas[-1:]])
    steps = len(sigmas) - 1
    sigmas, ts_mid = _sigmas_and_midpoints(full.sampler, sigmas[:-1].double().numpy(), float(sigmas[-1]))
    init_steps = min(int(steps * strength), steps)
    if init_steps == 0:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run")
    return dataclasses.replace(full, steps=steps, timesteps=full.timesteps[:-1], sigmas=sigmas, timesteps_mid=ts_mid,
                               start=steps - init_steps, step_ratio=schedule.NUM_TRAIN_TIMESTEPS // steps)  # fmt: skip


def _sigmas_and_midpoints(sampler: str, sig: np.ndarray, final: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sigmas, timesteps_mid) of a plan: the steps' noise levels `sig` (float64) and the last step's target `final`
    (0, or KL Optimal's sigma_min) as float32, and the model timestep of each step's midpoint for the samplers
    that have one (None for the others; 0 for a step to sigma = 0, which has none)."""
    sigmas = torch.from_numpy(np.append(sig, final).astype(np.float32))
    ts_mid = None
    if sampler == "dpmpp_sde":  # the midpoints' timesteps, from the float64 sigmas, as diffusers computes them
        ends = np.append(sig, final) if final > 0 else sig
        log_mid = np.log(ends[:-1]) + np.diff(np.log(ends)) * 0.5  # halfway in log sigma (diffusers: in t = -log sigma)
        mids = schedule.sigma_to_t(np.exp(log_mid))
        ts_mid = torch.from_numpy((mids if final > 0 else np.append(mids, 0.0)).astype(np.float32))
    if sampler in _DPM_2:  # the midpoints' timesteps, by log-sigma interpolation, not rounded
        ts_mid = _midpoint_timesteps(dpm_2_midpoints(sigmas, ancestral=sampler == "dpm_2_a"))
    if sampler == "dpmpp_2s_a":  # likewise (k-diffusion's sigma_to_t, as for any sigma it evaluates)
        ts_mid = _midpoint_timesteps(dpmpp_2s_a_midpoints(sigmas))
    return sigmas, ts_mid


def _refuse_broken_grid(sampler: str, steps: int, spacing: str, timesteps: np.ndarray, noise_levels: np.ndarray) -> None:
    """Refuse a grid that leaves the training timesteps 0 … 999 or does not lower the noise level at every step.

    diffusers' grids break at the top of the range, and it then fails mid-run: "leading" spacing with
    steps_offset 1 reaches t = 1000 at 1000 steps (an IndexError in DDIM/PNDM), and DPM-Solver/UniPC's
    steps + 1 rounded "linspace" points repeat t = 500 at 1000 steps (a zero-length step: h = 0, NaN latents).
    `noise_levels` is any quantity that must fall strictly from step to step (sigma, or t itself).
    """
    T = schedule.NUM_TRAIN_TIMESTEPS
    outside = [t for t in (timesteps.min(), timesteps.max()) if not 0 <= t <= T - 1]
    if outside or not np.all(np.diff(noise_levels) < 0):
        what = f"reaches t = {outside[0]:g}, outside 0 … {T - 1}" if outside else "repeats a noise level"
        raise ValueError(f"{sampler} cannot take {steps} steps with {spacing!r} timestep spacing: its grid {what}; "
                         "use fewer steps")  # fmt: skip


# Noise schedules: the sampler's own grid, or noise levels set apart between the grid's ends as diffusers does
# (its use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas), or one of the web UI's other schedule types,
# run as the web UI runs them (`WEB_UI_SCHEDULES`).
SCHEDULES = ("default", "karras", "exponential", "beta", "normal", "sgm_uniform", "simple", "ddim_uniform",
             "kl_optimal", "align_your_steps")  # fmt: skip
_SPACED_BETWEEN_ENDS = {"karras": schedule.karras_sigmas, "exponential": schedule.exponential_sigmas, "beta": schedule.beta_sigmas}
# name -> (steps -> noise levels, ending in the last step's target): k-diffusion's conventions throughout (the model
# is told the unrounded log-sigma timestep of each level, pure noise is scaled by the first level)
WEB_UI_SCHEDULES = {
    "normal": schedule.normal_sigmas,
    "sgm_uniform": schedule.sgm_uniform_sigmas,
    "simple": schedule.simple_sigmas,
    "ddim_uniform": schedule.ddim_uniform_sigmas,
    "kl_optimal": schedule.kl_optimal_sigmas,
    "align_your_steps": schedule.align_your_steps_sigmas,
}


def takes_schedule_types(sampler: str) -> bool:
    """Whether `sampler` walks noise levels that a schedule type sets (not ddim, pndm, lcm: their timestep grids)."""
    return sampler not in _VP_SAMPLERS


def resolve_schedule(karras: bool = False, schedule_type: str | None = None) -> str:
    """The one noise schedule that `karras` (a shorthand for "karras") and `schedule_type` name together."""
    name = schedule_type or ("karras" if karras else "default")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule type {name!r}; choose one of {', '.join(SCHEDULES)}")
    if karras and name != "karras":
        raise ValueError(f"karras=True and schedule_type={name!r} name two schedules; give one")
    return name


def plan_sampling(
    sampler: str,
    steps: int,
    strength: float = 1.0,
    karras: bool = False,
    eta: float = 0.0,
    spacing: str | None = None,
    schedule_type: str | None = None,
    discard_penultimate_sigma: bool = False,
) -> SamplingPlan:
    """The schedule diffusers 0.42.1 runs for `SchedulerClass.from_config(<SD1.5 scheduler_config>)`.

    sampler: one of SAMPLERS. steps: num_inference_steps. strength: img2img strength (1.0 = txt2img).
    karras: Karras et al. 2022 sigmas (rho = 7), for the sigma-space samplers (diffusers' use_karras_sigmas;
    diffusers' EulerAncestral lacks it, so euler_a uses the grid EulerDiscrete would, as k-diffusion allows).
    schedule_type: one of SCHEDULES; "karras" is karras=True, "exponential" noise levels evenly spaced in log sigma
    between the same ends (diffusers' use_exponential_sigmas; the model gets their log-sigma timesteps, unrounded),
    "beta" at the quantiles of a Beta(0.6, 0.6) distribution (diffusers' use_beta_sigmas), both with the
    timesteps diffusers gives them; the others, `WEB_UI_SCHEDULES`, as the AUTOMATIC1111 web UI runs them (see
    sd15/schedule.py: "normal", "sgm_uniform", "simple", "ddim_uniform", "kl_optimal", "align_your_steps"), which
    take no `spacing`; "ddim_uniform" may run a step more or fewer than asked (its docstring), and the plan's
    `steps` is the count it runs.
    eta: DDIM's eta. spacing: override the scheduler's default timestep spacing ("leading" for ddim/pndm,
    "linspace" for the rest, since SD1.5's config does not set it; lcm has its own grid and takes none).
    discard_penultimate_sigma: the web UI's way for DPM2 and DPM2 a (and for any sigma-space sampler with its
    "Discard penultimate sigma" option): the grid of steps + 1 steps with its next-to-last noise level left out,
    so that the last step, to 0, starts from a higher one (`_without_penultimate_sigma`).
    A grid diffusers cannot run is refused
    (`_refuse_broken_grid`: 1000 steps for ddim, pndm and the multistep solvers).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if discard_penultimate_sigma:
        if sampler in _VP_SAMPLERS:
            raise ValueError(f"discarding the penultimate sigma applies to the sigma-space samplers, not {sampler!r}")
        return _without_penultimate_sigma(plan_sampling(sampler, steps + 1, 1.0, karras, eta, spacing, schedule_type), strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    schedule_type = resolve_schedule(karras, schedule_type)
    if schedule_type != "default" and sampler in _VP_SAMPLERS:
        raise ValueError(f"{schedule_type} sigmas apply to the sigma-space samplers, not {sampler!r}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError("eta is DDIM's parameter")
    if spacing is not None and sampler == "lcm":
        raise ValueError("lcm samples on the grid it was distilled on; a timestep spacing does not apply to it")
    if spacing is not None and schedule_type in WEB_UI_SCHEDULES:
        raise ValueError(f"the {schedule_type} schedule sets its own noise levels; a timestep spacing does not apply to it")
    spacing = spacing or _DEFAULT_SPACING.get(sampler, "linspace")
    train_sigmas = schedule.sigmas().numpy()
    sigmas, ts_mid, timestep_end = None, None, 0.0

    if sampler == "lcm":
        ts = schedule.lcm_timesteps(steps)
        init_noise_sigma = 1.0
    elif sampler in _VP_SAMPLERS:  # integer timesteps; DDIM/PNDM round "linspace"
        ts = schedule.spaced_timesteps(steps, spacing).round()
        _refuse_broken_grid(sampler, steps, spacing, ts, noise_levels=ts)
        if sampler == "pndm" and steps > 1:  # PLMS warm-up evaluates the second timestep twice
            ts = np.concatenate([ts[:2], ts[1:]])
        init_noise_sigma = 1.0
    elif schedule_type in WEB_UI_SCHEDULES:  # k-diffusion's: log-sigma timesteps, unrounded; pure noise times sigma_0
        levels = WEB_UI_SCHEDULES[schedule_type](steps)
        if not np.all(np.diff(levels) < 0):
            raise ValueError(f"the {schedule_type} schedule cannot take {steps} steps: it repeats a noise level; use fewer steps")
        sig, steps = levels[:-1], len(levels) - 1  # ddim_uniform's count may differ from the one asked
        ts = schedule.sigma_to_t(sig)
        sigmas, ts_mid = _sigmas_and_midpoints(sampler, sig, final=float(levels[-1]))
        init_noise_sigma = float(sigmas[0])
        timestep_end = float(schedule.sigma_to_t(levels[-1:])[0]) if levels[-1] > 0 else 0.0
    else:
        if sampler in _MULTISTEP:  # these space steps + 1 points and drop the last (t ~ 0) one
            if spacing == "trailing":
                ts = schedule.spaced_timesteps(steps, spacing)
            else:
                ts = schedule.spaced_timesteps(steps + 1, spacing)[:-1].round()
            sig = schedule.t_to_sigma(ts)
            if schedule_type == "karras":  # over the full training range, then the nearest integer timestep for the model
                sig = schedule.karras_sigmas(steps, float(train_sigmas[0]), float(train_sigmas[-1]))
                ts = schedule.sigma_to_t(sig).round()
            elif schedule_type != "default":  # likewise, the timesteps truncated (diffusers casts them to int64)
                sig = _SPACED_BETWEEN_ENDS[schedule_type](steps, float(train_sigmas[0]), float(train_sigmas[-1]))
                ts = np.trunc(schedule.sigma_to_t(sig))
        else:  # Euler, Euler a, Heun, DPM2, LMS, DPM++ SDE, 2S a, 3M SDE: fractional timesteps, sigma interpolated linearly in t
            ts = schedule.spaced_timesteps(steps, spacing)
            if sampler != "dpmpp_sde":  # the others round t to float32 before interpolating
                ts = ts.astype(np.float32)
            sig = schedule.t_to_sigma(ts)
            if schedule_type != "default":  # between this grid's end sigmas; the model gets the log-sigma timestep
                sig = _SPACED_BETWEEN_ENDS[schedule_type](steps, float(sig[-1]), float(sig[0]))
                ts = schedule.sigma_to_t(sig)
                if sampler in _DPM_2 and schedule_type == "karras":  # DPM2 rounds Karras's, not the others'
                    ts = ts.round()
        _refuse_broken_grid(sampler, steps, spacing, ts, noise_levels=sig)
        sigmas, ts_mid = _sigmas_and_midpoints(sampler, sig, final=0.0)
        if sampler in _MULTISTEP:  # they start from VP noise: x = x_t / sqrt(abar) = eps * sqrt(sigma^2 + 1)
            init_noise_sigma = float((sigmas[0] ** 2 + 1) ** 0.5)
        elif spacing == "leading":  # diffusers' Euler-family init_noise_sigma
            init_noise_sigma = float((sigmas.max() ** 2 + 1) ** 0.5)
        else:
            init_noise_sigma = float(sigmas.max())

    init_steps = min(int(steps * strength), steps)  # diffusers' get_timesteps
    if init_steps == 0:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run")
    return SamplingPlan(
        sampler=sampler,
        steps=steps,
        timesteps=torch.from_numpy(np.asarray(ts, dtype=np.float32)),
        sigmas=sigmas,
        start=steps - init_steps,
        init_noise_sigma=init_noise_sigma,
        eta=eta,
        step_ratio=schedule.NUM_TRAIN_TIMESTEPS // steps,
        timesteps_mid=ts_mid,
        timestep_end=timestep_end,
    )
