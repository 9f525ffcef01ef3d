"""The SD1.5 noise schedule, and the timestep and sigma grids that samplers walk.

Stable Diffusion v1 was trained as a discrete DDPM (Ho et al. 2020) with T = 1000 steps and the
"scaled linear" beta schedule of `configs/stable-diffusion/v1-inference.yaml`:

    beta_t            = linspace(sqrt(0.00085), sqrt(0.012), 1000)[t] ** 2        t = 0 … 999
    alphas_cumprod_t  = prod_{s <= t} (1 - beta_s)                                 ("alpha bar")
    x_t               = sqrt(alphas_cumprod_t) * x_0 + sqrt(1 - alphas_cumprod_t) * eps      (VP form)

The same process in the variance-exploding form of Karras et al. 2022 ("Elucidating the Design Space of
Diffusion-Based Generative Models", EDM) is x = x_0 + sigma * eps with

    sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t),    x_VE = x_VP / sqrt(alphas_cumprod_t)

so sigma runs from 0.0292 (t = 0) to 14.6146 (t = 999).

Everything here follows diffusers 0.42.1 number for number: the betas are computed in float32 (ldm used
float64; the two differ in the 7th digit), and the timestep grids and sigma conversions are done in
float64 NumPy on top of the float32 tables, as diffusers' schedulers do, so that a sampler fed these
grids evaluates the UNet at exactly the timesteps diffusers would.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000  # T of the training process
BETA_START = 0.00085  # linear_start of v1-inference.yaml
BETA_END = 0.012  # linear_end of v1-inference.yaml
STEPS_OFFSET = 1  # steps_offset of SD1.5's scheduler_config.json ("leading" spacing ends at t = 1)
KARRAS_RHO = 7.0  # rho of Karras et al. 2022, eq. (5)
LCM_ORIGINAL_STEPS = 50  # the DDIM grid a latent consistency model is distilled on (diffusers' original_inference_steps)

SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------- the training schedule


@cache
def _tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas_cumprod, sigmas), each (1000,) float32, computed once."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return betas, alphas_cumprod, sigmas


def betas() -> torch.Tensor:
    """beta_t for t = 0 … 999, float32, shape (1000,): linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2."""
    return _tables()[0].clone()


def alphas_cumprod() -> torch.Tensor:
    """alpha bar_t = prod_{s<=t} (1 - beta_s), float32, shape (1000,); 0.99915 at t=0, 0.0046601 at t=999."""
    return _tables()[1].clone()


def sigmas() -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha bar_t) / alpha bar_t), float32, shape (1000,), increasing in t."""
    return _tables()[2].clone()


# --------------------------------------------------------------------------- timestep grids


def spaced_timesteps(steps: int, spacing: str, steps_offset: int = STEPS_OFFSET) -> np.ndarray:
    """`steps` training timesteps from noisy to clean, float64, not rounded.

    The three spacings of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Table 2), as diffusers writes them (T = 1000):

        "linspace": linspace(0, T-1, steps), reversed            -> 999, …, 0 (fractional in between)
        "leading":  (arange(steps) * (T // steps)) + offset, reversed  -> e.g. 981, 961, …, 1 for 50 steps
        "trailing": round(arange(T, 0, -T/steps)) - 1            -> 999, …, T/steps - 1

    Each scheduler then rounds (or not) in its own way; see `sd15.samplers.plan_sampling`.
    """
    T = NUM_TRAIN_TIMESTEPS
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")


def lcm_timesteps(steps: int, original_steps: int = LCM_ORIGINAL_STEPS) -> np.ndarray:
    """The `steps` timesteps a latent consistency model (Luo et al. 2023) is sampled at, int64, noisy to clean.

    LCMs (and LCM-LoRA) are distilled on a fixed skipping grid of `original_steps` DDIM timesteps,
    k - 1, 2k - 1, …, T - 1 with k = T // original_steps (19, 39, …, 999 for 50); sampling takes `steps` of
    them at evenly spaced indices from the top, as diffusers' LCMScheduler does:
    4 steps -> 999, 759, 499, 259. There are at most `original_steps` of them.
    """
    if not 1 <= steps <= original_steps:
        raise ValueError(f"lcm takes 1 to {original_steps} steps (the grid it was distilled on), got {steps}")
    k = NUM_TRAIN_TIMESTEPS // original_steps
    grid = (np.arange(1, original_steps + 1) * k - 1)[::-1]  # 999, 979, …, 19
    return grid[np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)]


# --------------------------------------------------------------------------- sigma <-> timestep


def t_to_sigma(t: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps by linear interpolation of the sigma table in t.

    This is how diffusers' Euler/Heun/LMS schedulers get the sigma of a fractional timestep such as 799.2
    (`np.interp(timesteps, arange(1000), sigmas)`); at integer timesteps it is the table itself.
    """
    table = _tables()[2].numpy()
    return np.interp(np.asarray(t, dtype=np.float64), np.arange(NUM_TRAIN_TIMESTEPS), table)


def sigma_to_t(sigma: np.ndarray, dtype=np.float64) -> np.ndarray:
    """The (fractional) timestep of each sigma, by linear interpolation in log-sigma between table entries.

    The inverse diffusers (and k-diffusion's `DiscreteSchedule.sigma_to_t`) use for sigmas that are not
    on the table, e.g. Karras sigmas: find the table interval [log sigma_lo, log sigma_hi] holding
    log sigma and return lo + w with w = (log sigma_lo - log sigma) / (log sigma_lo - log sigma_hi),
    clipped to [0, 999]. Computed in `dtype`: diffusers' schedulers differ in that (float32 for DPM2's midpoints).
    """
    log_sigmas = np.log(_tables()[2].numpy())  # (1000,) float32, as diffusers keeps it
    sigma = np.asarray(sigma, dtype=dtype)
    log_sigma = np.log(np.maximum(sigma, dtype(1e-10))).reshape(-1)  # (N,)
    at_or_below = log_sigma[None, :] - log_sigmas[:, None] >= 0  # (1000, N)
    # index of the last table entry at or below log sigma, kept one short of the end so that hi exists
    lo = np.cumsum(at_or_below, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[lo] - log_sigma) / (log_sigmas[lo] - log_sigmas[lo + 1]), 0, 1)
    lo = lo.astype(dtype)
    return ((1 - w) * lo + w * (lo + 1)).reshape(sigma.shape)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> np.ndarray:
    """The noise levels of Karras et al. 2022, eq. (5), from sigma_max down to sigma_min, float64.

        sigma_i = (sigma_max^(1/rho) + i/(steps-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    rho = 7 spends more steps at low noise than a uniform grid in t does.
    """
    ramp = np.linspace(0, 1, steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Noise levels evenly spaced in log sigma, from sigma_max down to sigma_min, float64 (k-diffusion's
    get_sigmas_exponential, the web UI's "Exponential" schedule type, diffusers' use_exponential_sigmas).
    Between the uniform grid in t and Karras's in where the steps go."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), steps))


# --------------------------------------------------------------------------- the web UI's other schedule types
#
# AUTOMATIC1111's web UI (1.9+) offers more ways to set a sampler's noise levels apart ("Schedule type"). Each
# below gives the noise levels its function gives for SD1.5, from noisy to clean, ending in the level the last
# step goes to. They work on the model's sigma table as k-diffusion's model wrapper does: a fractional timestep's
# sigma is interpolated in log sigma (`t_to_sigma_log`), not linearly as diffusers does (`t_to_sigma`).

BETA_SCHEDULE_AB = (0.6, 0.6)  # alpha, beta of the Beta schedule: Lee et al. 2024's, the web UI's and diffusers' default
# Align Your Steps (Sabour et al. 2024): the 10-step noise levels NVIDIA optimised for SD1.5; other step counts
# interpolate them in log sigma
ALIGN_YOUR_STEPS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def t_to_sigma_log(t: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps by linear interpolation of log sigma in t (k-diffusion's
    `DiscreteSchedule.t_to_sigma`, the inverse of `sigma_to_t`), float64."""
    log_sigmas = np.log(_tables()[2].numpy()).astype(np.float64)
    return np.exp(np.interp(np.asarray(t, dtype=np.float64), np.arange(NUM_TRAIN_TIMESTEPS), log_sigmas))


def _training_sigma_range() -> tuple[float, float]:
    table = _tables()[2]
    return float(table[0]), float(table[-1])


def normal_sigmas(steps: int) -> np.ndarray:
    """"Normal" (also the web UI's "Uniform", k-diffusion's `get_sigmas`): `steps` timesteps evenly spaced from
    999 to 0, both ends included, then 0."""
    return np.append(t_to_sigma_log(np.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, steps)), 0.0)


def sgm_uniform_sigmas(steps: int) -> np.ndarray:
    """"SGM Uniform": `steps + 1` timesteps evenly spaced from 999 to 0 with the last (t = 0) left out, then 0, so
    that no step ends on the table's smallest sigma (as Stability's sgm code samples SDXL)."""
    return np.append(t_to_sigma_log(np.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, steps + 1)[:-1]), 0.0)


def simple_sigmas(steps: int) -> np.ndarray:
    """"Simple": table entries taken every 1000 / steps from the top (t = 999, 999 - 1000/steps, …, floored), then 0."""
    table = _tables()[2].numpy().astype(np.float64)
    stride = NUM_TRAIN_TIMESTEPS / steps
    return np.append(table[[NUM_TRAIN_TIMESTEPS - 1 - int(i * stride) for i in range(steps)]], 0.0)


def ddim_uniform_sigmas(steps: int) -> np.ndarray:
    """The web UI's "DDIM" schedule type (ComfyUI's ddim_uniform): table entries t = 1, 1 + k, 1 + 2k, … below 1000
    with k = max(1000 // steps, 1), from the top, then 0. Its step count is ceil(999 / k), which is `steps` only
    where k divides evenly: 30 asked steps run 31, and any count above 500 runs 999."""
    table = _tables()[2].numpy().astype(np.float64)
    stride = max(NUM_TRAIN_TIMESTEPS // steps, 1)
    return np.append(table[1::stride][::-1], 0.0)


def kl_optimal_sigmas(steps: int) -> np.ndarray:
    """"KL Optimal" (Sabour et al. 2024, eq. (18) for a Gaussian data distribution): noise levels evenly spaced in
    arctan sigma from sigma_max to sigma_min, both ends included. It has `steps + 1` levels and no 0: the last step
    ends at sigma_min, where the web UI stops."""
    sigma_min, sigma_max = _training_sigma_range()
    ramp = np.arange(steps + 1) / steps
    return np.tan(ramp * np.arctan(sigma_min) + (1 - ramp) * np.arctan(sigma_max))


def align_your_steps_sigmas(steps: int) -> np.ndarray:
    """"Align Your Steps": `ALIGN_YOUR_STEPS_SD15` for 10 steps; for other counts the table's log sigmas linearly
    interpolated at `steps` evenly spaced points (both ends kept); then 0. Needs at least 2 steps (one point would
    be the table's last, sigma_min alone)."""
    if steps < 2:
        raise ValueError("the Align Your Steps schedule needs at least 2 steps: its one point would be its last, "
                         "the smallest noise level")  # fmt: skip
    log_table = np.log(np.asarray(ALIGN_YOUR_STEPS_SD15)[::-1])  # increasing, as np.interp wants
    points = np.linspace(0, 1, steps)
    log_sigmas = np.interp(points, np.linspace(0, 1, len(ALIGN_YOUR_STEPS_SD15)), log_table)
    return np.append(np.exp(log_sigmas)[::-1], 0.0)


def beta_sigmas(steps: int, sigma_min: float, sigma_max: float, a: float = BETA_SCHEDULE_AB[0],
                b: float = BETA_SCHEDULE_AB[1]) -> np.ndarray:  # fmt: skip
    """Noise levels at the quantiles of a Beta(a, b) distribution (Lee et al. 2024, "Beta Sampling is All You
    Need"), float64: sigma_min + (sigma_max - sigma_min) * q_i with q_i its quantile at 1 - i / (steps - 1). With
    a = b = 0.6 < 1 the steps crowd at both ends, where the layout and the fine detail are decided. The web UI's
    "Beta" schedule type and diffusers' use_beta_sigmas (which compute the quantiles with scipy)."""
    quantiles = beta_quantile(1 - np.linspace(0, 1, steps), a, b)
    return sigma_min + quantiles * (sigma_max - sigma_min)


def _incomplete_beta_fraction(x: np.ndarray, a: float, b: float, terms: int = 300) -> np.ndarray:
    """The continued fraction 1 / (1 + d_1 / (1 + d_2 / (1 + …))) of the regularized incomplete beta function,
    evaluated from the bottom up (it converges fast where x < (a + 1) / (a + b + 2))."""
    fraction = np.ones_like(x)
    for k in range(terms, 0, -1):
        m = k // 2
        if k % 2:  # d_{2m+1}
            d = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_{2m}
            d = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        fraction = 1 + d / fraction
    return 1 / fraction


def beta_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """The regularized incomplete beta function I_x(a, b), the Beta(a, b) distribution's CDF, float64:
    x^a (1 - x)^b / (a B(a, b)) times its continued fraction, by the symmetry I_x(a, b) = 1 - I_{1-x}(b, a)
    where x is past the fraction's good range."""
    import math

    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def series(y: np.ndarray, p: float, q: float) -> np.ndarray:  # I_y(p, q) where the fraction converges fast
        with np.errstate(divide="ignore"):
            front = np.exp(p * np.log(y) + q * np.log1p(-y) - log_beta) / p
        return front * _incomplete_beta_fraction(y, p, q)

    direct = x < (a + 1) / (a + b + 2)
    out = np.empty_like(x)
    out[direct] = series(x[direct], a, b)
    out[~direct] = 1 - series(1 - x[~direct], b, a)
    return out


def beta_quantile(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """The Beta(a, b) distribution's quantile function (the inverse of `beta_cdf`; scipy.stats.beta.ppf), float64,
    by bisection: the CDF rises monotonically from 0 to 1, so 60 halvings pin each quantile to the last bits."""
    p = np.asarray(p, dtype=np.float64)
    lo, hi = np.zeros_like(p), np.ones_like(p)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = beta_cdf(mid, a, b) < p
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(p <= 0, 0.0, np.where(p >= 1, 1.0, (lo + hi) / 2))
