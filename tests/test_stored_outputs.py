"""Seeded end-to-end runs against their stored outputs (tests/stored_outputs.py says what and why).

Tolerance: 2e-4 on pixels in [0, 1]. On the machine that stored them the runs repeat bit for bit, and
with torch 2.11 instead of 2.13 too; with 1 thread instead of 2 they move by up to 9e-6 (oneDNN splits
its sums differently), and another CPU's vector width does the same kind of thing. 2e-4 is 20× that, and
25× smaller than what a 1% change of one setting does (guidance 7.5 -> 7.4 moves pixels by up to 5.5e-3).
"""

import numpy as np
import pytest

import sd15
import stored_outputs

TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def outputs(tiny_checkpoint):
    return stored_outputs.compute(sd15.load(tiny_checkpoint, fast=False))


@pytest.fixture(scope="module")
def stored():
    return np.load(stored_outputs.STORED)


def test_the_stored_file_has_every_case(stored):
    assert set(stored.files) - {"torch_version"} == set(stored_outputs.CASES)


@pytest.mark.parametrize("case", list(stored_outputs.CASES))
def test_seeded_run_reproduces_its_stored_output(outputs, stored, case):
    ours, then = outputs[case], stored[case]
    assert ours.shape == then.shape
    assert np.isfinite(ours).all() and ours.std() > 1e-3  # a real image, not a constant
    difference = np.abs(ours - then).max()
    assert difference <= TOLERANCE, f"{case}: pixels moved by up to {difference:.2e} from the stored run " \
        f"(made with torch {stored['torch_version']}); if the change is meant, run scripts/make_stored_outputs.py"
