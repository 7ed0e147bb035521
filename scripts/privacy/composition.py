"""Composition of DP stages: the (sigma, q, steps) history of ledger entries and its epsilon."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from scripts.privacy.accounting import compose_epsilon


def entry_history(stages: Sequence[Mapping[str, Any]]) -> list[tuple[float, float, int]]:
    """The (noise multiplier, sample rate, steps) of each entry that took steps."""
    return [(float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"])) for s in stages if s["steps"] > 0]


def compose(steps: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """:func:`compose_epsilon`, with steps taken without noise (a non-private baseline) making epsilon infinite."""
    if any(sigma == 0 for sigma, _, n in steps if n > 0):
        return math.inf
    return compose_epsilon(list(steps), delta, accountant) if steps else 0.0


def largest_fitting(fits: Callable[[int], bool], planned: int) -> int:
    """The plan when it fits (checked once), else the largest step count that fits, by bisection."""
    if fits(planned):
        return planned
    low, high = 0, planned
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
