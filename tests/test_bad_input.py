"""Absurd values and malformed inputs: refused or answered with the numbers, never a hang or a silent result."""

from __future__ import annotations

import pytest

from scripts.privacy.accounting import MIN_NOISE_MULTIPLIER, calibrate_noise, compute_epsilon


@pytest.mark.timeout(120)  # a hang guard: the search used to run for minutes at this target
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrate_noise_huge_target_answers_with_the_smallest_searched_sigma(accountant):
    with pytest.warns(RuntimeWarning, match="smallest searched noise_multiplier"):
        sigma = calibrate_noise(1e6, 1e-5, 0.5, 2, accountant=accountant)
    assert sigma == MIN_NOISE_MULTIPLIER
    assert compute_epsilon(0.5, sigma, 2, 1e-5, accountant=accountant) <= 1e6
