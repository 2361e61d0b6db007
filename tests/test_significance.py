"""Wilson intervals and the exact McNemar test against hand-computed values."""

import math

import pytest

from hf_epic.significance import mcnemar_exact, wilson_interval


def test_wilson_interval_matches_hand_computed_values():
    # 8/12: centre (8/12 + z^2/24) / (1 + z^2/12) = 0.62626, half-width 0.23564 (z = 1.96)
    assert wilson_interval(8, 12) == pytest.approx((0.39064, 0.86190), abs=1e-4)
    # no success: the lower end is exactly 0 and the upper end z^2 / (n + z^2) = 0.24250
    low, high = wilson_interval(0, 12)
    assert low == 0.0 and high == pytest.approx(0.24250, abs=1e-4)
    # symmetric: k successes <-> n - k failures
    low, high = wilson_interval(12, 12)
    assert high == 1.0 and low == pytest.approx(1 - 0.24250, abs=1e-4)
    # a wider level widens the interval
    assert wilson_interval(8, 12, z=2.576)[0] < wilson_interval(8, 12)[0]
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="between 0 and trials"):
        wilson_interval(13, 12)
    with pytest.raises(ValueError, match="between 0 and trials"):
        wilson_interval(-1, 12)


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # 2 * C(5,0) / 2^5
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # two-sided: symmetric
    assert mcnemar_exact(3, 1) == pytest.approx(2 * (1 + 4) / 16)  # 0.625
    assert mcnemar_exact(8, 1) == pytest.approx(2 * (1 + 9) / 512)  # 0.0390625
    assert mcnemar_exact(2, 2) == 1.0  # the doubled tail passes 1 and is capped
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 2)
