"""The reconciler's work queue (omni_operator.controller.workqueue): real worker threads, a clock
the tests advance by hand, so every delay is released exactly when it is due."""

from __future__ import annotations

import threading

import pytest

from e2e.procs import wait_until
from omni_operator.controller.workqueue import WorkQueue

from .helpers import FakeClock

pytestmark = pytest.mark.pure


class Calls:
    """The reconciles a queue made: when (on the queue's clock) and of what."""

    def __init__(self, clock: FakeClock, fail: int = 0):
        self.clock, self.fail = clock, fail
        self.log: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, namespace: str, name: str) -> None:
        with self.lock:
            self.log.append((self.clock.now(), name))
            failing = len(self.log) <= self.fail
        if failing:
            raise RuntimeError("provoked")

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.log)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_queue(clock):
    queues = []

    def make(handler) -> WorkQueue:
        queues.append(WorkQueue(handler, workers=2, clock=clock))
        return queues[-1]
    yield make
    for q in queues:
        q.stop()


def settle(queue: WorkQueue, calls: Calls, count: int) -> None:
    """Wait (real time, bounded) until `count` reconciles ran and no worker is busy."""
    wait_until(f"{count} reconciles", lambda: calls.count >= count and not queue.depth() and not queue.running(),
               timeout=10, interval=0.01)
    assert calls.count == count


def test_requeues_of_a_waiting_key_fold_into_one(clock, make_queue):
    """Each reconcile of an object that waits asks to be requeued; however many asked, one reconcile follows."""
    calls = Calls(clock)
    queue = make_queue(calls)
    for _ in range(20):
        queue.add_after("ns", "a", 0.3)
    assert queue.scheduled() == 1
    clock.advance(0.29)
    assert queue.scheduled() == 1 and calls.count == 0
    clock.advance(0.01)
    settle(queue, calls, 1)
    assert queue.scheduled() == 0  # nothing else will come


def test_a_sooner_requeue_replaces_a_later_one(clock, make_queue):
    calls = Calls(clock)
    queue = make_queue(calls)
    queue.add_after("ns", "a", 1.2)
    queue.add_after("ns", "a", 0.2)
    clock.advance(0.2)
    settle(queue, calls, 1)
    assert calls.log[0][0] == pytest.approx(1000.2) and queue.scheduled() == 0
    clock.advance(1.0)  # the later one's time: it was replaced, not kept beside
    assert queue.scheduled() == 0 and calls.count == 1


def test_a_later_requeue_after_the_first_fired_is_kept(clock, make_queue):
    calls = Calls(clock)
    queue = make_queue(calls)
    queue.add_after("ns", "a", 0.1)
    clock.advance(0.1)
    settle(queue, calls, 1)
    queue.add_after("ns", "a", 0.1)
    clock.advance(0.1)
    settle(queue, calls, 2)


def test_keys_have_delays_of_their_own(clock, make_queue):
    calls = Calls(clock)
    queue = make_queue(calls)
    queue.add_after("ns", "a", 0.2)
    queue.add_after("ns", "b", 0.5)
    clock.advance(0.2)
    settle(queue, calls, 1)
    clock.advance(0.3)
    settle(queue, calls, 2)
    assert [name for _, name in calls.log] == ["a", "b"]


def test_a_burst_of_soon_adds_is_one_reconcile(clock, make_queue):
    calls = Calls(clock)
    queue = make_queue(calls)
    for _ in range(50):
        queue.add_soon("ns", "a", 0.5)
    clock.advance(0.5)
    settle(queue, calls, 1)
    queue.add_soon("ns", "a", 0.5)  # a burst after the reconcile is another one
    clock.advance(0.5)
    settle(queue, calls, 2)


def test_waiting_keys_share_one_delay_thread(clock, make_queue):
    """A thousand objects waiting on their pods cost no thread each; all of them still come back."""
    calls = Calls(clock)
    queue = make_queue(calls)
    before = set(threading.enumerate())  # threads of earlier tests may still be ending: count only new ones
    for i in range(1000):
        queue.add_after("ns", f"o{i}", 0.3 + (i % 7) / 100)
        queue.add_soon("ns", f"s{i}", 0.3)
    assert set(threading.enumerate()) - before == set()
    assert queue.scheduled() == 2000
    clock.advance(0.4)
    settle(queue, calls, 2000)


def test_a_key_added_while_it_runs_runs_once_more_afterwards(make_queue, clock):
    started, release = threading.Event(), threading.Event()
    runs = []

    def handler(namespace: str, name: str) -> None:
        runs.append(name)
        started.set()
        release.wait(10)
    queue = make_queue(handler)
    queue.add("ns", "a")
    assert started.wait(10)
    for _ in range(5):
        queue.add("ns", "a")
    assert queue.depth() == 0 and queue.running() == 1  # held back, never run twice at once
    release.set()
    wait_until("the second run", lambda: len(runs) == 2 and not queue.running(), timeout=10, interval=0.01)
    assert runs == ["a", "a"]


def test_a_failing_reconcile_is_retried_with_backoff(clock, make_queue):
    calls = Calls(clock, fail=2)
    queue = make_queue(calls)
    queue.add("ns", "a")
    settle(queue, calls, 1)
    clock.advance(0.49)
    assert calls.count == 1 and queue.scheduled() == 1
    clock.advance(0.01)  # 0.5 s after the first failure
    settle(queue, calls, 2)
    clock.advance(0.99)
    assert calls.count == 2 and queue.scheduled() == 1
    clock.advance(0.01)  # 1 s after the second
    settle(queue, calls, 3)
    assert queue.scheduled() == 0  # the third succeeded: no more retries
    assert [t - calls.log[0][0] for t, _ in calls.log] == pytest.approx([0.0, 0.5, 1.5])


def test_a_new_spec_goes_ahead_of_follow_ups_and_runs_once(make_queue):
    order: list[str] = []
    gate = threading.Event()
    held = threading.Semaphore(0)

    def handler(namespace: str, name: str) -> None:
        if name.startswith("busy"):
            held.release()
            gate.wait(10)
        else:
            order.append(name)
    queue = make_queue(handler)
    queue.add("ns", "busy1")
    queue.add("ns", "busy2")
    assert held.acquire(timeout=10) and held.acquire(timeout=10)  # both workers held
    queue.add("ns", "follow-up-1")
    queue.add("ns", "follow-up-2")
    queue.add("ns", "new", first=True)
    queue.add("ns", "follow-up-2", first=True)  # its spec changed meanwhile: moved ahead, not doubled
    assert queue.depth() == 3
    gate.set()
    wait_until("three reconciles", lambda: len(order) == 3 and not queue.running(), timeout=10, interval=0.01)
    # the two freed workers take the first lane's keys, in order, before the rest
    assert order[:2] in (["new", "follow-up-2"], ["follow-up-2", "new"]) and order[2:] == ["follow-up-1"]
