"""The flow behind a role's queue: arrival rate and service time, estimated from the
pods' own counters, for the autoscaler (pure; the state lives in `FlowHistory`).

Queue depth is a stock; what replicas must carry is a flow. From successive scrapes:

- arrivals: requests finished (each pod's `omni_requests_finished_total`, counted only
  between two scrapes of the same pod, so pods that come and go do not distort it) plus
  the change of the requests in the system (waiting + running on the ready pods, plus
  those the gateway holds while no replica is ready);
- service time, by Little's law on the running part: requests running integrated over
  time, divided by the requests that went through service in that time (the mean of those
  that finished and those that started, so a window that starts or ends mid-change is not
  biased);
- concurrency of one replica: the most requests a pod ran while it had others waiting.

Without completion counters (pods that do not export them) nothing is known and the
autoscaler keeps to the queue-depth rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_FINISHED = 8  # completions a window needs before its service time replaces the last estimate


@dataclass(frozen=True)
class Flow:
    arrival_rate: float        # requests per second over the rate window (what arrives now)
    sustained_rate: float      # over the longer sustain window (what a new replica will meet)
    trend: float               # requests per second per second, over the trend window (>= 0 rising)
    service_seconds: float     # one request's time in service
    concurrency: float | None  # requests one replica runs at once, when a saturated pod showed it
    backlog: float             # requests waiting (pods' queues and the gateway's hold)


@dataclass
class FlowHistory:
    """Per role: the last scrape of each pod and running totals (the estimator's memory)."""

    rate_window: float = 15.0
    sustain_window: float = 60.0
    trend_window: float = 300.0
    service_window: float = 120.0
    finished: dict[str, float] = field(default_factory=dict)   # pod -> counter at the last scrape
    in_system: float | None = None
    arrivals: list[tuple[float, float]] = field(default_factory=list)   # (t, cumulative arrivals)
    busy: list[tuple[float, float, float, float]] = field(default_factory=list)  # (t, running x s, finished, running)
    rates: list[tuple[float, float]] = field(default_factory=list)  # (t, rate-window average)
    concurrency: float | None = None
    service_seconds: float | None = None

    def observe(self, now: float, pods: list[tuple[str, float, float, float | None]], held: float) -> Flow | None:
        """One scrape: (pod, waiting, running, finished counter or None) per ready pod and the
        requests the gateway holds. The flow once it can be estimated, else None."""
        if any(f is None for _, _, _, f in pods):
            return None  # a pod without the counter: arrivals cannot be told from completions
        done = 0.0
        counters = {}
        for pod, _w, _r, total in pods:
            before = self.finished.get(pod)
            if before is not None and total >= before:  # a lower value is a restarted pod
                done += total - before
            counters[pod] = total
        self.finished = counters
        waiting = sum(w for _, w, _, _ in pods) + held
        running = sum(r for _, _, r, _ in pods)
        system = waiting + running
        for _pod, w, r, _ in pods:
            if w >= 1 and r > 0:  # a pod with a queue runs as many as it can
                self.concurrency = max(self.concurrency or 0.0, r)
        cumulative = self.arrivals[-1][1] if self.arrivals else 0.0
        if self.in_system is not None:
            cumulative += max(0.0, done + system - self.in_system)
        self.in_system = system
        self.arrivals = _trim([*self.arrivals, (now, cumulative)], now, max(self.sustain_window, 1.0) * 2)
        t0, work0, done0, running0 = self.busy[-1] if self.busy else (now, 0.0, 0.0, running)
        self.busy = _trim([*self.busy, (now, work0 + (running0 + running) / 2 * (now - t0), done0 + done, running)],
                          now, self.service_window)
        first, latest = self.busy[0], self.busy[-1]
        finished = latest[2] - first[2]
        served = finished + (latest[3] - first[3]) / 2
        if finished >= MIN_FINISHED and served > 0 and latest[1] > first[1]:
            self.service_seconds = (latest[1] - first[1]) / served
        rate = _rate(self.arrivals, now, self.rate_window)
        if rate is None or self.service_seconds is None:
            return None
        sustained = _rate(self.arrivals, now, self.sustain_window)
        self.rates = _trim([*self.rates, (now, rate)], now, self.trend_window)
        return Flow(arrival_rate=rate, sustained_rate=rate if sustained is None else sustained,
                    trend=_slope(self.rates), service_seconds=self.service_seconds,
                    concurrency=self.concurrency, backlog=waiting)


def _trim(points: list, now: float, keep: float) -> list:
    """Points within `keep` seconds, plus the one just before them (a window's start)."""
    inside = [i for i, p in enumerate(points) if now - p[0] <= keep]
    start = max(0, (inside[0] if inside else len(points)) - 1)
    return points[start:]


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) points; 0 with fewer than three."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var if var > 0 else 0.0


def _rate(points: list[tuple[float, float]], now: float, window: float) -> float | None:
    """Average per second over the last `window` seconds (None until the window is covered)."""
    start = [p for p in points if now - p[0] >= window]
    if not start:
        return None
    t0, a0 = start[-1]
    return (points[-1][1] - a0) / (now - t0) if now > t0 else None
