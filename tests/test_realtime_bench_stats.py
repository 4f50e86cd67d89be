"""Tier 1: the realtime benchmark's interval for its p50 ratio, drawn from whole rounds."""

from __future__ import annotations

import numpy as np
import pytest

from bench.realtime_bench import ratio_interval

pytestmark = pytest.mark.pure


def rounds(rng, n_rounds: int, users: int, scale: float = 1.0) -> list[list[float]]:
    """Latencies of rounds whose turns share a round's engine steps: a round-wide draw plus a little per turn."""
    return [list(scale * (rng.normal(0.3, 0.05) + rng.normal(0, 0.01, users))) for _ in range(n_rounds)]


def test_paths_alike_give_an_interval_around_one_and_a_clear_lead_one_below_it():
    rng = np.random.default_rng(7)
    http = rounds(rng, 32, 4)
    lo, hi = ratio_interval(rounds(rng, 32, 4), http)
    assert lo < 1.0 < hi and hi - lo < 0.3
    lo, hi = ratio_interval(rounds(rng, 32, 4, scale=0.7), http)
    assert hi < 1.0 and lo > 0.5


def test_the_interval_counts_rounds_not_turns():
    """Eight users in a round are one sample: with 4 rounds the interval is as wide as the rounds
    make it, far wider than 32 independent turns would."""
    rng = np.random.default_rng(3)
    lo, hi = ratio_interval(rounds(rng, 4, 8), rounds(rng, 4, 8))
    independent = [[t] for r in rounds(rng, 4, 8) for t in r]
    lo_i, hi_i = ratio_interval(independent, [[t] for r in rounds(rng, 4, 8) for t in r])
    assert hi - lo > hi_i - lo_i
