"""Replay the autoscaling traces through the operator's policy and an HPA/KEDA-style
baseline (15 s or 30 s polling, 300 s scale-down window) and print the figures.

    python -m bench.autoscale_bench

Figures per trace: seconds and decisions until enough replicas are asked for
after the load steps up, replica-seconds over- and under-provisioned, direction
changes (flaps), the most replicas used, replica-seconds of Pending pods no node
could take, and GPU-seconds over the GPU budget.
"""

from __future__ import annotations

import argparse

from bench.autoscale_sim import (ALL_TRACES, HpaStylePolicy, Model, OurPolicy, direction_changes,
                                 gpu_seconds_over_budget, over_provisioned, reach_after, simulate, stuck_pending,
                                 under_provisioned)
from omni_operator.autoscale import Policy

STEP_AT = {"step": 300, "pool-exhausted": 120, "budget-exhausted": 120, "zero-and-back": 1200, "burst": 600,
           "ramp": 0, "sawtooth-noise": 0}


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
    for make in ALL_TRACES:
        trace = make()
        scale_to_zero = trace.name == "zero-and-back"
        policy = Policy(target_per_replica=model.target_per_replica, min_replicas=0 if scale_to_zero else 1,
                        max_replicas=10, scale_up_window=15, scale_down_window=300 if not scale_to_zero else 120,
                        max_step=2, scale_to_zero=scale_to_zero)
        contenders = [("operator 5s", OurPolicy(policy, poll=5)),
                      ("hpa-style 15s", HpaStylePolicy(policy, poll=15)),
                      ("keda-style 30s", HpaStylePolicy(policy, poll=30))]
        for label, fn in contenders:
            run = simulate(trace, model, fn)
            seconds, decisions = reach_after(run, STEP_AT[trace.name])
            reach = "never" if seconds is None else str(seconds)
            print(f"{trace.name:<17} {label:<14} {reach:>8} {decisions:>9} {over_provisioned(run):>9.0f} "
                  f"{under_provisioned(run):>10.0f} {direction_changes(run.replicas):>6} {max(run.replicas):>4} "
                  f"{stuck_pending(run, trace):>11.0f} {gpu_seconds_over_budget(run, trace):>11.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
