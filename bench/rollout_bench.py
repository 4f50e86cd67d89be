"""What a rollout of each role costs the clients of a live deployment.

A private local cluster whose node agent runs every pod's real process (tiny random-weight model,
CPU), the operator, and one OmniDeployment with two pods per role (e2e/serving_deployment.py).
Clients send small chat requests back to back (of every four one streamed and one
asking for speech), each on a new connection to a gateway pod that is Ready and not terminating, re-read every
second as kube-proxy would (e2e/gateway_clients.py). For each role in turn: a steady phase, then a
spec change that rolls the role, until its workload reports every pod updated and ready. The steady
phase after one rollout is the one before the next.

    .venv/bin/python -m bench.rollout_bench [--clients 3] [--steady 20]

Prints, per phase, the requests sent (by send time), how many failed, the p50/p99 latency of all of
them and the p99 of the text ones (speech answers are longer and random in length);
the last line: the requests that failed during rollouts (goal 0) and the p99 latency during a
rollout divided by the p99 before it (the baseline, measured in the same run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from e2e.demo_serving import tiny_model
from e2e.gateway_clients import Clients, Outcome, p99
from e2e.serving_deployment import serving_deployment

ROLES = ("gateway", "thinker", "talker")


def p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0.0


def ratio(during: list[Outcome], before: list[Outcome]) -> float:
    """p99 latency during / p99 before."""
    return p99([o.latency for o in during]) / max(p99([o.latency for o in before]), 1e-9)


def row(phase: str, outcomes: list[Outcome], seconds: float) -> str:
    latencies = [o.latency for o in outcomes]
    text = [o.latency for o in outcomes if o.kind != "speech"]
    failed = sum(not o.ok for o in outcomes)
    return (f"{phase:18s} {seconds:6.0f} {len(outcomes):8d} {failed:6d} {p50(latencies):7.2f} {p99(latencies):7.2f}"
            f" {p99(text):10.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3, help="concurrent clients (default 3)")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of each steady phase (default 20)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} cores, load average {load:.1f} at start; state in {work}", flush=True)
    with serving_deployment(work / "cluster", tiny_model(), say=lambda m: print(f"# {m}", flush=True)) as stand:
        with stand.gateway_pods() as pods:
            clients = Clients(pods, stand.model, args.clients)
            phases: list[tuple[str, str, float, float]] = []  # (role, phase, start, end)
            with clients:
                mark = time.monotonic()
                time.sleep(args.steady)
                for i, role in enumerate(ROLES):
                    phases.append((role, "before", mark, time.monotonic()))
                    generation = stand.workload(role)["metadata"]["generation"]
                    began = time.monotonic()
                    stand.roll(role)
                    stand.wait_rolled_out(role, since_generation=generation)
                    mark = time.monotonic()
                    phases.append((role, "during", began, mark))
                    time.sleep(args.steady)
                    phases.append((role, "after", mark, time.monotonic()))
    outcomes = clients.outcomes
    print(f"# load average {os.getloadavg()[0]:.1f} at the end (the machine is shared: other work runs beside it)")
    print(f"{'phase':18s} {'s':>6s} {'requests':>8s} {'failed':>6s} {'p50 s':>7s} {'p99 s':>7s} {'text p99 s':>10s}")
    by_phase = {}
    for role, phase, start, end in phases:
        sent = [o for o in outcomes if start <= o.sent < end]
        by_phase[(role, phase)] = sent
        print(row(f"{role} {phase}", sent, end - start))
    during = [o for role in ROLES for o in by_phase[(role, "during")]]
    before = [o for role in ROLES for o in by_phase[(role, "before")]]
    failed_during = sum(not o.ok for o in during)
    reasons = sorted({o.error[:80] for o in during if not o.ok})
    if reasons:
        print("# failures during rollouts: " + "; ".join(reasons))
    ratios = {role: ratio(by_phase[(role, "during")], by_phase[(role, "before")]) for role in ROLES}
    text = ratio([o for o in during if o.kind != "speech"], [o for o in before if o.kind != "speech"])
    print(f"failed during rollouts: {failed_during} of {len(during)} (goal 0); p99 during a rollout / before it: "
          f"{ratio(during, before):.2f} (text only {text:.2f}; " + ", ".join(f"{r} {ratios[r]:.2f}" for r in ROLES)
          + ")")
    return 0 if failed_during == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
