"""Queue-depth autoscaling: the pure decision function.

The raw recommendation comes from the flow when the pods export their completion
counters (load_flow.py): ``ceil(arrival rate x service time / target)`` replicas
hold the arrivals at the target depth, and a backlog adds only the replicas it
needs to clear within ``drain_seconds``, counting replicas already starting as
capacity (so a backlog built while the first replica loads does not ask for
more). Without the counters, or until the estimate covers a whole window, it is
``ceil(load / target)`` with the load the requests in the system on the ready
pods (``omni_queue_depth`` waiting + ``omni_requests_running``). Then, in this
order:

1. Stabilisation: from the flow, the rate is already averaged over the
   scale-up window, so the recommendation is taken as it is to go up, and down
   only to the highest of the scale-down window (what the recent peak rate
   needs). From the queue (like the HPA's behaviour windows): up to the
   *lowest* recommendation seen over the scale-up window, down to the
   *highest* seen over the scale-down window, so short spikes and dips are
   ignored.
2. Capacity still coming: pods that are loading weights or Pending are not
   counted as capacity (the load is summed over ready pods and the
   recommendation is absolute, so they neither dilute the signal nor get
   asked for twice), and no further scale-up is made while earlier replicas
   are Pending because no node has room: that is reported as an exhausted
   GPU pool.
3. Bounds: min/max replicas, the GPU budget shared by thinker and talker, at
   most ``max_step`` replicas per decision, and zero only when allowed (and
   back from zero as soon as the gateway holds a request for the role).

No I/O: the loop in ``omni_operator.autoscaling.loop`` scrapes, calls ``decide`` and
writes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from prometheus_client.parser import text_string_to_metric_families

from omni_operator.autoscaling.load_flow import Flow, FlowHistory

QUEUE_METRIC = "omni_queue_depth"
RUNNING_METRIC = "omni_requests_running"
FINISHED_METRIC = "omni_requests_finished_total"
GATEWAY_WAITING_METRIC = "omni_gateway_waiting_requests"


@dataclass(frozen=True)
class PodLoad:
    """One scrape of one ready pod."""

    pod: str
    waiting: float
    running: float
    finished: float | None = None  # requests finished since the pod started (a counter)

    @property
    def total(self) -> float:
        return self.waiting + self.running


@dataclass(frozen=True)
class Policy:
    target_per_replica: float
    min_replicas: int
    max_replicas: int
    scale_up_window: float = 15.0
    scale_down_window: float = 300.0
    max_step: int = 2
    scale_to_zero: bool = False
    drain_seconds: float = 120.0  # a backlog that clears within this needs no extra replica
    startup_seconds: float = 90.0  # a new replica's time to serve (weights, warm-up): what a trend is projected over


@dataclass(frozen=True)
class RoleState:
    """What the cluster looks like for one role right now."""

    current: int  # replicas asked of the workload
    ready: int  # replicas serving
    unschedulable: int = 0  # pods Pending because no node has room (GPU pool exhausted)
    gpus_per_replica: int = 0
    other_roles_gpus: int = 0  # GPUs the other GPU role holds (for the shared budget)
    gpu_budget: int | None = None
    gateway_waiting: float = 0.0  # requests the gateway holds for this role (scale from zero)


@dataclass
class History:
    """Raw recommendations over time (the stabilisation windows read it)."""

    points: list[tuple[float, int]] = field(default_factory=list)
    flow: FlowHistory = field(default_factory=FlowHistory)

    def add(self, now: float, value: int, keep: float) -> None:
        self.points.append((now, value))
        self.points = [(t, v) for t, v in self.points if now - t <= keep]

    def within(self, now: float, window: float) -> list[int]:
        return [v for t, v in self.points if now - t <= window]

    def covers(self, now: float, window: float) -> bool:
        """True once recommendations reach back a whole window (not after a restart)."""
        return bool(self.points) and now - self.points[0][0] >= window


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    recommendation: int  # before stabilisation and bounds
    load: float
    blocked: str | None = None  # "GPUPoolExhausted" / "GPUBudgetExhausted" when more was wanted than allowed
    arrival_rate: float | None = None  # the flow estimate behind it, when the pods export completions
    service_seconds: float | None = None

    def changed(self, current: int) -> bool:
        return self.desired != current


def recommend(loads: Iterable[PodLoad], target: float) -> tuple[int, float]:
    """Raw replicas for the load of the ready pods."""
    total = sum(p.total for p in loads)
    return (math.ceil(total / target - 1e-9) if total > 0 else 0), total


@dataclass(frozen=True)
class FlowNeed:
    """What the flow asks of a role: `up` to scale up to now, `hold` to keep (the need of
    the latest arrival rate, never below `up`), and why."""
    up: int
    hold: int
    why: str


def from_flow(flow: Flow, current: int, policy: Policy) -> FlowNeed:
    """Replicas for the arrivals at the target depth, plus what a backlog needs to clear in
    time; the replicas asked for (`current`, loading ones included) count as capacity."""
    target, service = policy.target_per_replica, flow.service_seconds

    def replicas(rate: float) -> int:
        return math.ceil(rate * service / target - 1e-9) if rate > 0 else 0

    # what a replica started now will meet once it serves: the sustained rate, plus a rise
    # projected over its startup
    rate = flow.sustained_rate + max(0.0, flow.trend) * policy.startup_seconds
    up = replicas(rate)
    why = f"{rate:.2f} req/s x {service:.1f}s service / target {target:g} needs {up}"
    if flow.backlog >= 1:
        full = max(target, flow.concurrency or 0.0) / service  # what one replica finishes per second at most
        surplus = current * full - flow.arrival_rate
        clears_in = flow.backlog / surplus if surplus > 0 else math.inf
        if clears_in > policy.drain_seconds:
            clear = replicas(flow.arrival_rate + flow.backlog / policy.drain_seconds)
            if clear > up:
                up = clear
                why += f"; backlog {flow.backlog:g} needs {clear} to clear within {policy.drain_seconds:g}s"
        else:
            why += f"; backlog {flow.backlog:g} clears in {clears_in:.0f}s"
    return FlowNeed(up=up, hold=max(up, replicas(flow.arrival_rate)), why=why)


def decide(now: float, loads: list[PodLoad], state: RoleState, policy: Policy, history: History) -> Decision:
    raw, load = recommend(loads, policy.target_per_replica)
    # while no replica is ready the gateway holds the requests: they are arrivals too
    flow = history.flow.observe(now, [(p.pod, p.waiting, p.running, p.finished) for p in loads],
                                state.gateway_waiting if state.ready == 0 else 0.0)
    need = from_flow(flow, state.current, policy) if flow is not None else None
    if need is not None:
        raw = need.up
    if state.current > 0 and not loads:
        # Nothing ready to measure (all loading, or metrics missing): no data is not zero load.
        return Decision(state.current, f"no ready replica reports load yet; holding {state.current}", raw, load)
    # Keep more than the longest window so that `covers` can tell a full window from a fresh start.
    history.add(now, raw if need is None else need.hold,
                keep=2 * max(policy.scale_up_window, policy.scale_down_window) + 1)
    # Zero only when configured: otherwise a role keeps at least one replica.
    floor = policy.min_replicas if policy.scale_to_zero else max(policy.min_replicas, 1)
    ceiling = policy.max_replicas
    notes: list[str] = []

    if state.gpu_budget is not None and state.gpus_per_replica > 0:
        affordable = max(0, (state.gpu_budget - state.other_roles_gpus) // state.gpus_per_replica)
        if affordable < ceiling:
            ceiling = affordable
            notes.append(f"GPU budget {state.gpu_budget} allows {affordable} replica(s)")

    def bounded(value: int, why: str, blocked: str | None = None) -> Decision:
        lo = min(floor, ceiling)
        clamped = max(lo, min(ceiling, value))
        if clamped != value:
            why += f"; bounded to {clamped} (min {floor}, max {ceiling})"
            if notes and value > clamped:
                blocked = blocked or "GPUBudgetExhausted"
        step = max(-policy.max_step, min(policy.max_step, clamped - state.current))
        target = state.current + step
        if target != clamped:
            why += f"; stepping by at most {policy.max_step}"
        return Decision(target, "; ".join([why, *notes]) if notes else why, raw, load, blocked,
                        flow.arrival_rate if flow else None, flow.service_seconds if flow else None)

    # From zero there are no pods to measure: the gateway's waiting requests are the signal.
    if state.current == 0:
        if state.gateway_waiting > 0 or floor > 0:
            return bounded(max(1, floor), f"scaling from zero: gateway holds {state.gateway_waiting:g} request(s)")
        return bounded(0, "idle at zero")

    if need is not None:
        # The rates are averaged already: up as the flow says. Ready replicas go down only to
        # the highest need of the scale-down window; replicas still loading (serving nothing
        # yet) only as long as the last sustain window's need wants them.
        stable_up = need.up
        recent = max(history.within(now, history.flow.sustain_window))
        stable_down = max(recent, min(max(history.within(now, policy.scale_down_window)), state.ready))
    else:
        # A direction is taken only when every recommendation over its whole window agrees.
        stable_up = min(history.within(now, policy.scale_up_window)) \
            if history.covers(now, policy.scale_up_window) else state.current
        stable_down = max(history.within(now, policy.scale_down_window)) \
            if history.covers(now, policy.scale_down_window) else state.current
    loading = max(0, state.current - state.ready - state.unschedulable)

    if stable_up > state.current:
        if state.unschedulable:
            return bounded(state.current, f"load {load:g} wants {stable_up} replicas but {state.unschedulable} "
                                          "pending pod(s) cannot be scheduled: GPU pool exhausted",
                           blocked="GPUPoolExhausted")
        why = need.why if need else (f"load {load:g} over {state.ready} ready replica(s) "
                           f"(target {policy.target_per_replica:g} each) for {policy.scale_up_window:g}s")
        return bounded(stable_up, why + (f", {loading} more loading" if loading else ""))
    if stable_down < state.current:
        return bounded(stable_down, (need.why + "; " if need else f"load {load:g} ")
                       + f"needs {stable_down} replica(s) for the last {policy.scale_down_window:g}s")
    return bounded(state.current, need.why if need else f"load {load:g} fits {state.current} replica(s)")


# ----------------------------------------------------------------------------- metrics parsing


def parse_pod_metrics(pod: str, text: str, role: str) -> PodLoad | None:
    """The role's queue depth and running requests from a /metrics page; None if absent."""
    waiting = running = finished = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("role") not in (None, role):
                continue
            if sample.name == QUEUE_METRIC:
                waiting = (waiting or 0.0) + sample.value
            elif sample.name == RUNNING_METRIC:
                running = (running or 0.0) + sample.value
            elif sample.name == FINISHED_METRIC:
                finished = (finished or 0.0) + sample.value
    if waiting is None and running is None:
        return None
    return PodLoad(pod=pod, waiting=waiting or 0.0, running=running or 0.0, finished=finished)


def parse_gateway_waiting(text: str) -> dict[str, float]:
    """Requests a gateway holds per upstream role (``omni_gateway_waiting_requests{role}``)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == GATEWAY_WAITING_METRIC and "role" in sample.labels:
                out[sample.labels["role"]] = out.get(sample.labels["role"], 0.0) + sample.value
    return out
