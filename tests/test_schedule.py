"""The SD1.5 noise schedule and timestep grids (sd15.schedule) against FACTS.md and diffusers 0.42.1."""

import numpy as np
import diffusers  # test-only oracle
import pytest
import torch

from reference_models import SD15_SCHEDULER_CONFIG
from sd15 import schedule




def test_schedule_facts():
    abar, sigmas = schedule.alphas_cumprod(), schedule.sigmas()
    assert abar.dtype == torch.float32 and abar.shape == (1000,)
    assert abar[0].item() == pytest.approx(0.99915, abs=1e-7)
    assert abar[999].item() == pytest.approx(0.0046601, rel=1e-4)
    assert sigmas[999].item() == pytest.approx(14.6146, abs=1e-4)
    assert sigmas[0].item() == pytest.approx(((1 - 0.99915) / 0.99915) ** 0.5, rel=1e-4)  # 1 - abar in float32
    assert torch.all(sigmas[1:] > sigmas[:-1])


def test_tables_equal_diffusers_bit_for_bit():
    ref = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert torch.equal(schedule.betas(), ref.betas)
    assert torch.equal(schedule.alphas_cumprod(), ref.alphas_cumprod)


def test_float32_betas_differ_from_ldm_float64_only_in_the_last_digits():
    betas64 = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2  # what ldm computes
    abar64 = np.cumprod(1 - betas64)
    abar32 = schedule.alphas_cumprod().double().numpy()
    assert not np.array_equal(abar32, abar64)
    np.testing.assert_allclose(abar32, abar64, rtol=2e-5)


def test_tables_are_copies():
    schedule.alphas_cumprod()[0] = 0.0
    assert schedule.alphas_cumprod()[0].item() == pytest.approx(0.99915, abs=1e-7)


def test_spaced_timesteps():
    np.testing.assert_array_equal(schedule.spaced_timesteps(50, "leading"), np.arange(981, 0, -20))
    np.testing.assert_array_equal(schedule.spaced_timesteps(6, "leading"), [831, 665, 499, 333, 167, 1])
    np.testing.assert_allclose(schedule.spaced_timesteps(6, "linspace"), [999, 799.2, 599.4, 399.6, 199.8, 0])
    np.testing.assert_array_equal(schedule.spaced_timesteps(6, "trailing"), [999, 832, 666, 499, 332, 166])
    with pytest.raises(ValueError, match="spacing"):
        schedule.spaced_timesteps(6, "uniform")


def test_t_to_sigma_interpolates_linearly_in_t():
    table = schedule.sigmas().double().numpy()
    np.testing.assert_array_equal(schedule.t_to_sigma(np.arange(1000)), table)
    assert schedule.t_to_sigma(np.array([799.25]))[0] == pytest.approx(0.75 * table[799] + 0.25 * table[800])


def test_sigma_to_t_inverts_the_table_and_clips():
    table = schedule.sigmas().double().numpy()
    np.testing.assert_allclose(schedule.sigma_to_t(table), np.arange(1000), atol=1e-5)  # log taken in float32
    assert schedule.sigma_to_t(np.array(100.0)) == 999 and schedule.sigma_to_t(np.array(1e-3)) == 0
    # between table entries it interpolates log sigma: the geometric mean of two neighbours is halfway
    assert schedule.sigma_to_t(np.sqrt(table[500] * table[501])) == pytest.approx(500.5, abs=1e-4)


def test_sigma_to_t_matches_diffusers():
    ref = diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    log_sigmas = np.log(schedule.sigmas().numpy())
    sigmas = np.exp(np.random.default_rng(0).uniform(-4, 3, size=64))
    expected = np.array([ref._sigma_to_t(s, log_sigmas) for s in sigmas])
    np.testing.assert_array_equal(schedule.sigma_to_t(sigmas), expected)


def test_karras_sigmas():
    s = schedule.karras_sigmas(10, 0.0292, 14.6146)
    assert s[0] == pytest.approx(14.6146) and s[-1] == pytest.approx(0.0292)
    steps = np.diff(s ** (1 / 7))  # eq. (5): evenly spaced in sigma^(1/rho)
    np.testing.assert_allclose(steps, steps[0])
    assert schedule.karras_sigmas(1, 0.0292, 14.6146) == pytest.approx([14.6146])
