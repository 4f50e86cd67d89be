"""A small discrete-time model of one role under load, to replay traces through
an autoscaling policy (ours, or an HPA/KEDA-style baseline).

Model, one step per second: requests arrive at rate ``rate(t)`` and each takes
``service_seconds``; a ready replica runs up to ``concurrency`` requests at
once, the rest wait. New replicas become ready ``load_seconds`` after they are
asked for (weight loading), or never when the pool has no room
(``capacity``). Removed replicas leave at once. While no replica is ready the
gateway holds the requests (its ``omni_gateway_waiting_requests``). Each pod
reports its waiting and running requests and a counter of the requests it
finished, as the runtime pods do. Deterministic for a given trace (noise comes
from a seeded generator).

Simplified against a cluster: metrics are exact and instantaneous (no scrape
lag), requests are spread evenly over the ready pods, a removed replica's
requests go back to the queue at once, and the baselines see the same
per-pod metric the operator does (HPA/KEDA would read it through a metrics
adapter or Prometheus, one more scrape interval late). The baselines follow the
HPA's defaults (10 % tolerance, immediate scale-up of at most double, 300 s
scale-down stabilisation); the KEDA-style one is that algorithm polled every
30 s, KEDA's default, and like the HPA it keeps one replica (KEDA could also
idle at zero with minReplicaCount 0).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

from omni_operator.autoscaling.policy import Decision, History, PodLoad, Policy, RoleState, decide

Rate = Callable[[float], float]


@dataclass(frozen=True)
class Trace:
    name: str
    rate: Rate
    seconds: int
    capacity: int = 10_000  # replicas the GPU pool can hold
    gpu_budget: int | None = None
    gpus_per_replica: int = 1
    gateway_waiting_from: float | None = None  # when the gateway starts holding requests at zero replicas


@dataclass(frozen=True)
class Model:
    service_seconds: float = 8.0
    concurrency: int = 8
    load_seconds: float = 90.0
    target_per_replica: float = 4.0


@dataclass
class Run:
    replicas: list[int] = field(default_factory=list)  # asked-for replicas per second
    ready: list[int] = field(default_factory=list)
    needed: list[int] = field(default_factory=list)
    allowed: list[int] = field(default_factory=list)  # needed, capped by what pool, budget and max allow
    waiting: list[float] = field(default_factory=list)
    decisions: list[tuple[int, int, str]] = field(default_factory=list)  # (t, replicas, reason)


def needed_replicas(rate: float, model: Model) -> int:
    """Replicas that hold the offered load at the target depth (Little's law)."""
    return max(1, math.ceil(rate * model.service_seconds / model.target_per_replica - 1e-9)) if rate > 0 else 0


class OurPolicy:
    """omni_operator.autoscaling.policy.decide at the operator's poll interval."""

    def __init__(self, policy: Policy, poll: float = 5.0):
        self.policy, self.poll, self.history = policy, poll, History()

    def __call__(self, t: float, loads: list[PodLoad], state: RoleState) -> Decision | None:
        if t % self.poll:
            return None
        return decide(t, loads, state, self.policy, self.history)


class HpaStylePolicy:
    """What a KEDA/HPA setup does on the same signal: poll every ``poll`` seconds,
    desired = ceil(current x average metric / target) with a 10% tolerance,
    scale-up immediately (at most doubling), scale-down to the highest
    recommendation of the last ``down_window`` seconds. Pending pods count as
    replicas, and it never goes below one replica."""

    def __init__(self, policy: Policy, poll: float = 15.0, down_window: float = 300.0):
        self.policy, self.poll, self.down_window = policy, poll, down_window
        self.history: list[tuple[float, int]] = []

    def __call__(self, t: float, loads: list[PodLoad], state: RoleState) -> Decision | None:
        if t % self.poll or state.current == 0:
            return None
        avg = sum(p.total for p in loads) / len(loads) if loads else 0.0
        ratio = avg / self.policy.target_per_replica
        raw = state.current if abs(ratio - 1) <= 0.1 else math.ceil(state.current * ratio - 1e-9)
        raw = max(self.policy.min_replicas, 1, min(self.policy.max_replicas, raw, 2 * max(1, state.current)))
        self.history.append((t, raw))
        self.history = [(s, v) for s, v in self.history if t - s <= self.down_window]
        desired = raw if raw >= state.current else max(v for _, v in self.history)
        return Decision(desired=desired, reason="hpa-style", recommendation=raw, load=avg * len(loads))


def allowed_replicas(trace: Trace, max_replicas: int) -> int:
    """The most replicas the pool, the GPU budget and maxReplicas let run."""
    budget = trace.gpu_budget // trace.gpus_per_replica if trace.gpu_budget is not None else max_replicas
    return min(max_replicas, trace.capacity, budget)


def simulate(trace: Trace, model: Model, policy_fn, start_replicas: int = 1, seed: int = 7,
             max_replicas: int = 10) -> Run:
    rng = random.Random(seed)
    run = Run()
    replicas = start_replicas
    ready_at: list[float] = [0.0] * start_replicas  # when each replica becomes ready
    finished: list[float] = [0.0] * start_replicas  # each replica's completion counter
    waiting = 0.0
    running: list[float] = []  # remaining service time of running requests
    carry = 0.0
    for step in range(trace.seconds):
        t = float(step)
        rate = max(0.0, trace.rate(t))
        carry += rate
        arrivals = int(carry)
        carry -= arrivals
        waiting += arrivals
        schedulable = min(replicas, trace.capacity)
        ready = sum(1 for i, r in enumerate(ready_at) if i < schedulable and r <= t)
        slots = ready * model.concurrency
        done = sum(1 for r in running if r <= 1)
        running = [r - 1 for r in running if r > 1]
        for k in range(done):  # completions spread over the ready pods
            if ready:
                finished[k % ready] += 1
        while waiting >= 1 and len(running) < slots:
            waiting -= 1
            running.append(model.service_seconds * rng.uniform(0.8, 1.2))
        if len(running) > slots:  # replicas removed: their requests go back to the queue
            waiting += len(running) - slots
            running = running[:slots]
        per_pod_wait = waiting / ready if ready else 0.0
        per_pod_run = len(running) / ready if ready else 0.0
        loads = [PodLoad(f"p{i}", per_pod_wait, per_pod_run, finished[i]) for i in range(ready)]
        gateway_waiting = waiting if ready == 0 and (
            trace.gateway_waiting_from is not None and t >= trace.gateway_waiting_from) else 0.0
        state = RoleState(current=replicas, ready=ready, unschedulable=max(0, replicas - trace.capacity),
                          gpus_per_replica=trace.gpus_per_replica, gpu_budget=trace.gpu_budget,
                          gateway_waiting=gateway_waiting)
        decision = policy_fn(t, loads, state)
        if decision is not None and decision.desired != replicas:
            if decision.desired > replicas:
                ready_at += [t + model.load_seconds] * (decision.desired - replicas)
                finished += [0.0] * (decision.desired - replicas)
            else:
                ready_at = ready_at[:decision.desired]
                finished = finished[:decision.desired]
            replicas = decision.desired
            run.decisions.append((step, replicas, decision.reason))
        run.replicas.append(replicas)
        run.ready.append(ready)
        run.needed.append(needed_replicas(rate, model))
        run.allowed.append(min(run.needed[-1], allowed_replicas(trace, max_replicas)))
        run.waiting.append(waiting)
    return run


# ----------------------------------------------------------------------------- traces


def step(at: int = 300, low: float = 0.5, high: float = 4.0, seconds: int = 1800) -> Trace:
    return Trace("step", lambda t: high if t >= at else low, seconds)


def ramp(seconds: int = 1800, low: float = 0.25, high: float = 5.0) -> Trace:
    return Trace("ramp", lambda t: low + (high - low) * min(1.0, t / (seconds * 0.6)), seconds)


def burst(seconds: int = 2400, base: float = 0.75, peak: float = 4.0, every: int = 600, length: int = 45) -> Trace:
    return Trace("burst", lambda t: peak if (t % every) < length and t >= every else base, seconds)


def sawtooth_noise(seconds: int = 2400, mean: float = 2.0, amplitude: float = 0.6, period: int = 40,
                   seed: int = 3) -> Trace:
    rng = random.Random(seed)
    jitter = [rng.uniform(-0.25, 0.25) for _ in range(seconds)]
    return Trace("sawtooth-noise",
                 lambda t: mean * (1 + amplitude * (2 * ((t % period) / period) - 1) + jitter[int(t) % seconds]),
                 seconds)


def pool_exhausted(seconds: int = 1200) -> Trace:
    return Trace("pool-exhausted", lambda t: 4.0 if t >= 120 else 0.5, seconds, capacity=3)


def budget_exhausted(seconds: int = 1200) -> Trace:
    return Trace("budget-exhausted", lambda t: 5.0 if t >= 120 else 0.5, seconds, gpu_budget=4,
                 gpus_per_replica=2)


def zero_and_back(seconds: int = 1800) -> Trace:
    return Trace("zero-and-back", lambda t: 0.0 if 60 <= t < 1200 else 0.5, seconds, gateway_waiting_from=1200)


def diurnal(seconds: int = 7200, low: float = 0.4, high: float = 4.5, seed: int = 11) -> Trace:
    """A day compressed to two hours: a smooth daily curve, minute-scale drift and per-second noise."""
    rng = random.Random(seed)
    drift = [rng.gauss(0, 0.12) for _ in range(seconds // 60 + 2)]
    noise = [rng.uniform(-0.2, 0.2) for _ in range(seconds)]

    def rate(t: float) -> float:
        day = 0.5 - 0.5 * math.cos(2 * math.pi * t / seconds)
        minute = drift[int(t) // 60] + (drift[int(t) // 60 + 1] - drift[int(t) // 60]) * ((t % 60) / 60)
        return max(0.0, (low + (high - low) * day) * (1 + minute + noise[int(t) % seconds]))

    return Trace("diurnal", rate, seconds)


def spikes(seconds: int = 2400, base: float = 1.5, peak: float = 6.0, seed: int = 5) -> Trace:
    """A steady base with spikes of 3-8 s at random times (a retry storm, a batch job's fan-out)."""
    rng = random.Random(seed)
    starts, t = [], 60
    while t < seconds:
        t += rng.randint(45, 240)
        starts.append((t, rng.randint(3, 8)))
    return Trace("spikes", lambda x: peak if any(a <= x < a + n for a, n in starts) else base, seconds)


ALL_TRACES = (step, ramp, burst, sawtooth_noise, diurnal, spikes, pool_exhausted, budget_exhausted, zero_and_back)


# ----------------------------------------------------------------------------- figures


def direction_changes(series: list[int]) -> int:
    """How often the replica count turned from rising to falling or back (flaps)."""
    moves = [b - a for a, b in zip(series, series[1:]) if b != a]
    return sum(1 for x, y in zip(moves, moves[1:]) if (x > 0) != (y > 0))


def over_provisioned(run: Run) -> float:
    return float(sum(max(0, r - n) for r, n in zip(run.replicas, run.needed)))


def under_provisioned(run: Run) -> float:
    """Replica-seconds short of the need, counting only what the pool, the GPU budget and
    maxReplicas allow (replicas past the budget are not a way to serve better)."""
    return float(sum(max(0, n - r) for r, n in zip(run.ready, run.allowed)))


def stuck_pending(run: Run, trace: Trace) -> float:
    """Replica-seconds asked for that no node could take (Pending pods)."""
    return float(sum(max(0, r - trace.capacity) for r in run.replicas))


def gpu_seconds_over_budget(run: Run, trace: Trace) -> float:
    if trace.gpu_budget is None:
        return 0.0
    return float(sum(max(0, r * trace.gpus_per_replica - trace.gpu_budget) for r in run.replicas))


def reach_after(run: Run, at: int) -> tuple[int | None, int]:
    """(seconds until enough replicas are *asked for* after `at`, decisions made until then)."""
    for t in range(at, len(run.replicas)):
        if run.replicas[t] >= run.needed[t] > 0:
            return t - at, sum(1 for d in run.decisions if at <= d[0] <= t)
    return None, sum(1 for d in run.decisions if d[0] >= at)
