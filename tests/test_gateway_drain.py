"""The gateway's stop sequence (omni_runtime.gateway.drain): when each phase begins, what is
accepted in each, and the hooks another part of the gateway joins. The real process's drain is
in tests/runtime/test_gateway_drain.py."""

from __future__ import annotations

import asyncio

import pytest

from omni_runtime.gateway.drain import Drain
from omni_runtime.server import DrainTimes, Phase

pytestmark = pytest.mark.pure


def test_phases_follow_the_shutdown_delay_then_the_drain_seconds():
    times = DrainTimes(shutdown_delay=10, drain_seconds=300)
    assert times.phase(None) is Phase.SERVING
    assert [times.phase(t) for t in (0, 9.99, 10, 309.99, 310)] == [
        Phase.ANNOUNCED, Phase.ANNOUNCED, Phase.CLOSING, Phase.CLOSING, Phase.EXPIRED]
    # no delay: new requests are refused from SIGTERM on
    assert DrainTimes(0, 5).phase(0) is Phase.CLOSING


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_readiness_fails_at_sigterm_and_new_work_is_taken_until_the_delay_is_over():
    clock = Clock()
    drain = Drain(DrainTimes(10, 300), clock=clock)
    assert drain.ready and drain.accepting
    drain.begin()
    assert not drain.ready and drain.accepting
    clock.now += 10
    assert not drain.accepting and drain.phase is Phase.CLOSING


def test_the_drain_waits_for_tracked_work_and_calls_the_closing_hooks_once_new_work_is_refused():
    events = []

    async def scenario():
        drain = Drain(DrainTimes(0.2, 30))

        async def closing():
            events.append(("closing", drain.accepting, drain.in_flight))

        async def deadline():
            events.append("deadline")

        drain.on_closing(closing)
        drain.on_deadline(deadline)

        async def work(seconds):
            with drain.track():
                await asyncio.sleep(seconds)
            events.append(("finished", seconds))

        loop = asyncio.get_running_loop()
        began = loop.time()
        tasks = [asyncio.ensure_future(work(s)) for s in (0.1, 0.6)]
        await asyncio.sleep(0)
        await drain.run()
        took = loop.time() - began
        await asyncio.gather(*tasks)
        return took, drain.in_flight

    took, left = asyncio.run(scenario())
    # the delay is served whole even after the short request left; the drain ends when the long one does
    assert events == [("finished", 0.1), ("closing", False, 1), ("finished", 0.6)]
    assert 0.6 <= took < 1.5 and left == 0


def test_at_the_deadline_the_deadline_hooks_end_what_is_left():
    async def scenario():
        drain = Drain(DrainTimes(0, 0.3))
        stop = asyncio.Event()

        async def release():
            stop.set()

        drain.on_deadline(release)

        async def held():
            with drain.track():
                await stop.wait()  # as a request held for a replica that never comes

        task = asyncio.ensure_future(held())
        await asyncio.sleep(0)
        await drain.run()
        await task
        return drain.phase, drain.in_flight

    phase, left = asyncio.run(scenario())
    assert phase is Phase.EXPIRED and left == 0
