"""How a gateway stops without losing a request, and the hooks other parts of it join.

SIGTERM comes when the pod is deleted; at the same moment its address starts leaving the
Service's endpoints, but that removal reaches kube-proxy on every node, ingress controllers and
load balancers only over the next seconds, and they keep opening connections to the pod
meanwhile. So the gateway goes through three phases:

1. ``ANNOUNCED`` (for ``shutdown_delay`` seconds, ``OMNI_SHUTDOWN_DELAY_SECONDS``): readiness
   fails at once, and every request, new ones included, is served as before. Responses carry
   ``Connection: close``: a keep-alive client reconnects, through a proxy that by then routes
   elsewhere.
2. ``CLOSING`` (up to ``drain_seconds``, ``OMNI_DRAIN_SECONDS``): new requests are answered 503 with
   ``Retry-After`` and ``Connection: close``; what is in flight (streams, speech, requests held
   for a replica) finishes.
3. ``EXPIRED``: at that deadline, what still runs is ended by whoever joined for it (held requests
   get a 503 with ``Retry-After``), then the process exits. The pod's grace period
   (``shutdown_delay + drain_seconds + 30``, rendered by the operator) covers all three.

Joining: a unit of in-flight work (a request; a realtime session) runs inside ``track()``, so the
drain waits for it; ``on_closing(hook)`` is awaited when new work stops being accepted (a
long-lived session can tell its client to reconnect, and finish its current turn);
``on_deadline(hook)`` when the time is up (end what is left, cleanly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable, Iterator

from omni_runtime.server import DrainTimes, Phase

log = logging.getLogger("omni.gateway.drain")

Hook = Callable[[], Awaitable[None]]
POLL_SECONDS = 0.05
HOOK_SECONDS = 2.0  # how long the deadline's hooks get to answer what they ended


class Drain:
    """One gateway's stop sequence (module docstring): the phase, the work in flight, the hooks."""

    def __init__(self, times: DrainTimes, clock: Callable[[], float] = time.monotonic):
        self.times = times
        self.clock = clock
        self.sigterm_at: float | None = None
        self.in_flight = 0
        self._closing: list[Hook] = []
        self._deadline: list[Hook] = []

    @property
    def phase(self) -> Phase:
        return self.times.phase(None if self.sigterm_at is None else self.clock() - self.sigterm_at)

    @property
    def ready(self) -> bool:
        """What readiness answers: false from SIGTERM on."""
        return self.phase is Phase.SERVING

    @property
    def accepting(self) -> bool:
        """New work is taken (until the shutdown delay is over)."""
        return self.phase in (Phase.SERVING, Phase.ANNOUNCED)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """One unit of in-flight work: the drain waits for it to leave."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def on_closing(self, hook: Hook) -> None:
        self._closing.append(hook)

    def on_deadline(self, hook: Hook) -> None:
        self._deadline.append(hook)

    def begin(self) -> None:
        """SIGTERM: not ready from now on."""
        if self.sigterm_at is None:
            self.sigterm_at = self.clock()

    async def run(self) -> None:
        """From SIGTERM to the moment the listeners may close."""
        self.begin()
        began = self.sigterm_at
        log.info("SIGTERM: not ready; serving new requests for %g s while endpoints propagate (%d in flight)",
                 self.times.shutdown_delay, self.in_flight)
        await self._until(began + self.times.closing_at)
        log.info("refusing new requests; waiting up to %g s for %d in flight", self.times.drain_seconds,
                 self.in_flight)
        await _run_hooks(self._closing)
        deadline = began + self.times.expires_at
        while self.in_flight and self.clock() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        if self.in_flight:
            log.warning("drain deadline reached with %d in flight: ending them", self.in_flight)
            await _run_hooks(self._deadline)
            end = self.clock() + HOOK_SECONDS
            while self.in_flight and self.clock() < end:
                await asyncio.sleep(POLL_SECONDS)
        log.info("drained (%d left)", self.in_flight)

    async def _until(self, at: float) -> None:
        while (left := at - self.clock()) > 0:
            await asyncio.sleep(min(left, 0.5))


async def _run_hooks(hooks: list[Hook]) -> None:
    for outcome in await asyncio.gather(*(hook() for hook in hooks), return_exceptions=True):
        if isinstance(outcome, BaseException):
            log.error("a drain hook failed: %s: %s", type(outcome).__name__, outcome)
