"""How much a benchmark's attack success rates can be trusted: intervals and a paired test (pure Python).

A targeted-attack benchmark scores one target per trial, so an attack success rate over ``n`` trials is
a binomial proportion, and with the few trials a CPU run affords (12-48) its uncertainty is large: at
12 trials one trial is 8.3 points. Two functions make that visible in the harness's report.

**Wilson score interval.** For ``k`` successes in ``n`` trials, ``p = k / n`` and the normal quantile
``z`` (1.96 for 95 %), the interval is

.. math::

    \\frac{p + z^2 / 2n \\pm z \\sqrt{p (1 - p) / n + z^2 / 4n^2}}{1 + z^2 / n},

which, unlike ``p ± z sqrt(p (1 - p) / n)``, stays inside [0, 1] and does not collapse to a point at
0 or ``n`` successes (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it for small ``n``).

**Exact McNemar test.** Two defenses scored on the same targets (the same trials and poisons) are
compared pairwise: only the discordant targets carry information, ``b`` that succeed under the first
and fail under the second, and ``c`` the other way. Under the null hypothesis that both defenses have
the same success rate, each discordant target is a fair coin, so ``b ~ Binomial(b + c, 1/2)`` and the
two-sided p-value is

.. math::

    p = \\min\\Big(1,\\; 2 \\sum_{i=0}^{\\min(b, c)} \\binom{b + c}{i} 2^{-(b + c)}\\Big).

Pairing removes the trial-to-trial spread that two independent proportions would carry (the
targets' difficulty differs far more between trials than between defenses of one trial).
"""

from __future__ import annotations

import math

__all__ = ["mcnemar_exact", "wilson_interval"]


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Args:
        successes: number of successes ``k`` (0 <= k <= trials).
        trials: number of trials ``n``.
        z: normal quantile of the two-sided level (default: 95 %).

    Returns:
        ``(low, high)`` as fractions; ``(nan, nan)`` when ``trials`` is 0.

    Example::

        >>> low, high = wilson_interval(8, 12)
        >>> round(low, 3), round(high, 3)
        (0.391, 0.862)
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes!r} must be between 0 and trials={trials!r}.")
    if trials == 0:
        return float("nan"), float("nan")
    p = successes / trials
    z2 = z * z
    denominator = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    # at 0 (or n) successes the end is exactly 0 (or 1); computed, it is off by rounding
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def mcnemar_exact(first_only: int, second_only: int) -> float:
    """Two-sided exact McNemar (sign) test on the discordant pairs of a paired comparison.

    Args:
        first_only: pairs where only the first condition succeeds (``b``).
        second_only: pairs where only the second condition succeeds (``c``).

    Returns:
        The p-value, 1.0 when there is no discordant pair.

    Example::

        >>> round(mcnemar_exact(5, 0), 4)  # five targets saved, none lost
        0.0625
    """
    if first_only < 0 or second_only < 0:
        raise ValueError(f"counts must be non-negative, got {first_only!r} and {second_only!r}.")
    n = first_only + second_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(first_only, second_only) + 1)) / 2**n
    return min(1.0, 2 * tail)
