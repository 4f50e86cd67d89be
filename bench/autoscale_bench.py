"""Replay the autoscaling traces through the operator's policy and an HPA/KEDA-style
baseline (15 s or 30 s polling, 300 s scale-down window) and print the figures.

    python -m bench.autoscale_bench

Figures per trace: seconds and decisions until enough replicas are asked for
after the load steps up, replica-seconds over- and under-provisioned, direction
changes (flaps), the most replicas used, replica-seconds of Pending pods no node
could take, and GPU-seconds over the GPU budget. Under-provisioning counts only
what the pool, the budget and maxReplicas allow.

The last line sums each figure over the traces against the better of the two
baselines on each trace (the one with fewer replica-seconds over- plus
under-provisioned): over- and under-provisioned replica-seconds as ratios,
GPU-seconds past the budget, and direction changes. The line before it compares
with a stricter phantom: each figure of each trace taken from whichever baseline
is best at that figure.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from bench.autoscale_sim import (ALL_TRACES, HpaStylePolicy, Model, OurPolicy, Trace, direction_changes,
                                 gpu_seconds_over_budget, over_provisioned, reach_after, simulate, stuck_pending,
                                 under_provisioned)
from omni_operator.autoscaling.policy import Policy

STEP_AT = {"step": 300, "pool-exhausted": 120, "budget-exhausted": 120, "zero-and-back": 1200, "burst": 600,
           "ramp": 0, "sawtooth-noise": 0, "diurnal": 0, "spikes": 0}


@dataclass
class Row:
    trace: str
    policy: str
    reach: int | None
    decisions: int
    over: float
    under: float
    flaps: int
    most: int
    pending: float
    over_budget: float


def bench_policy(trace: Trace, model: Model) -> Policy:
    """The operator's defaults for a role (scale-to-zero where the trace goes idle)."""
    to_zero = trace.name == "zero-and-back"
    return Policy(target_per_replica=model.target_per_replica, min_replicas=0 if to_zero else 1, max_replicas=10,
                  scale_up_window=15, scale_down_window=120 if to_zero else 300, max_step=2, scale_to_zero=to_zero,
                  startup_seconds=model.load_seconds)


def replay(model: Model) -> list[list[Row]]:
    """Every trace through the operator's policy and both baselines: one list of rows per trace,
    the operator's first."""
    out = []
    for make in ALL_TRACES:
        trace = make()
        policy = bench_policy(trace, model)
        rows = []
        for label, fn in (("operator 5s", OurPolicy(policy, poll=5)), ("hpa-style 15s", HpaStylePolicy(policy, poll=15)),
                          ("keda-style 30s", HpaStylePolicy(policy, poll=30))):
            run = simulate(trace, model, fn, max_replicas=policy.max_replicas)
            reach, decisions = reach_after(run, STEP_AT[trace.name])
            rows.append(Row(trace.name, label, reach, decisions, over_provisioned(run), under_provisioned(run),
                            direction_changes(run.replicas), max(run.replicas), stuck_pending(run, trace),
                            gpu_seconds_over_budget(run, trace)))
        out.append(rows)
    return out


def totals(results: list[list[Row]]) -> tuple[dict, dict, dict]:
    """(ours, the better baseline of each trace, each figure from the baseline best at it),
    summed over the traces. The better baseline is the one with fewer replica-seconds over-
    plus under-provisioned."""
    keys = ("over", "under", "over_budget", "flaps")
    ours, best, phantom = ({k: 0.0 for k in keys} for _ in range(3))
    for ours_row, *baselines in results:
        better = min(baselines, key=lambda r: r.over + r.under)
        for k in keys:
            ours[k] += getattr(ours_row, k)
            best[k] += getattr(better, k)
            phantom[k] += min(getattr(r, k) for r in baselines)
    return ours, best, phantom


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-seconds", type=float, default=90.0, help="weight-loading time of a new replica")
    args = parser.parse_args(argv)
    model = Model(load_seconds=args.load_seconds)
    header = f"{'trace':<17} {'policy':<14} {'reach s':>8} {'decisions':>9} {'over r*s':>9} {'under r*s':>10} " \
             f"{'flaps':>6} {'max':>4} {'pending r*s':>11} {'over budget':>11}"
    print(f"model: service {model.service_seconds:g}s, {model.concurrency} concurrent per replica, "
          f"load {model.load_seconds:g}s, target {model.target_per_replica:g} per replica")
    print(header)
    print("-" * len(header))
    results = replay(model)
    for rows in results:
        for r in rows:
            reach = "never" if r.reach is None else str(r.reach)
            print(f"{r.trace:<17} {r.policy:<14} {reach:>8} {r.decisions:>9} {r.over:>9.0f} {r.under:>10.0f} "
                  f"{r.flaps:>6} {r.most:>4} {r.pending:>11.0f} {r.over_budget:>11.0f}")
    ours, best, phantom = totals(results)
    print(f"vs the best baseline figure by figure: over-provisioned {ours['over'] / phantom['over']:.2f}, "
          f"under-provisioned {ours['under'] / phantom['under']:.2f}, direction changes {ours['flaps']:.0f} vs "
          f"{phantom['flaps']:.0f}")
    print(f"ratios vs the better baseline per trace: over-provisioned {ours['over'] / best['over']:.2f} (goal <= 0.7), "
          f"under-provisioned {ours['under'] / best['under']:.2f} (goal <= 1.0), GPU-s over budget "
          f"{ours['over_budget']:.0f} (goal 0), direction changes {ours['flaps']:.0f} vs {best['flaps']:.0f} "
          "(goal: no more)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
