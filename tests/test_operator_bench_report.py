"""Tier 1: the operator benchmark's report compares each burst with the baselines around it."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.operator_bench import BenchResult, BurstResult, DirectResult, report
from bench.operator_bench_cluster import Interval

pytestmark = pytest.mark.pure


def _burst(round_: int, p99: float) -> BurstResult:
    interval = Interval(seconds=10, operator_cpu_s=1, operator_rss_mib=100, machine_busy=0.5, reconciles=400,
                        reconcile_s=40)
    return BurstResult(count=200, round=round_, apply_s=20, p50_s=p99 / 2, p99_s=p99, max_s=p99,
                       until_done=interval, until_settled=interval, writes=Counter({"create services": 1000}),
                       reads=Counter({"list pods": 20 * round_}))


def test_each_round_is_divided_by_the_baselines_before_and_after_it_and_the_median_is_last():
    result = BenchResult(cores=2, kubernetes="v1", load_at_start=0.1, command="python -m bench.operator_bench",
                         children_per_object=7, bursts=[_burst(1, 40.0), _burst(2, 60.0), _burst(3, 45.0)],
                         directs=[DirectResult(200, 10, p99, p99) for p99 in (30.0, 50.0, 30.0, 60.0)])
    text = report(result)
    # 40 / mean(30, 50), 60 / mean(50, 30), 45 / mean(30, 60)
    assert text.splitlines()[-1] == ("ratio: operator p99 / direct p99 (mean of the baselines before and after the "
                                     "burst) for N=200: 1.00, 1.50, 1.00 over 3 round(s), median 1.00 (goal <= 1.5); "
                                     "operator reads per object 0.2")
    assert "baseline after burst round 3, operator stopped" in text
