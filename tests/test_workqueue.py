"""The reconciler's work queue (omni_operator.workqueue), with real threads and timers."""

from __future__ import annotations

import threading
import time

import pytest

from omni_operator.workqueue import WorkQueue


class Calls:
    def __init__(self, hold: float = 0.0, fail: int = 0):
        self.times: list[float] = []
        self.hold, self.fail = hold, fail
        self.lock = threading.Lock()

    def __call__(self, namespace: str, name: str) -> None:
        with self.lock:
            self.times.append(time.monotonic())
            failing = len(self.times) <= self.fail
        time.sleep(self.hold)
        if failing:
            raise RuntimeError("provoked")


@pytest.fixture
def make_queue():
    queues = []

    def make(handler):
        queues.append(WorkQueue(handler, workers=2))
        return queues[-1]
    yield make
    for q in queues:
        q.stop()


def test_requeues_of_a_waiting_key_fold_into_one_timer(make_queue):
    """Each reconcile of an object that waits asks to be requeued; however many asked, one reconcile follows."""
    calls = Calls()
    queue = make_queue(calls)
    for _ in range(20):
        queue.add_after("ns", "a", 0.3)
    time.sleep(1.0)
    assert len(calls.times) == 1


def test_a_sooner_requeue_replaces_a_later_one(make_queue):
    calls = Calls()
    queue = make_queue(calls)
    start = time.monotonic()
    queue.add_after("ns", "a", 1.2)
    queue.add_after("ns", "a", 0.2)
    time.sleep(1.8)
    assert len(calls.times) == 1 and calls.times[0] - start < 1.0


def test_a_later_requeue_after_the_timer_fired_is_kept(make_queue):
    calls = Calls()
    queue = make_queue(calls)
    queue.add_after("ns", "a", 0.1)
    time.sleep(0.5)
    queue.add_after("ns", "a", 0.1)
    time.sleep(0.5)
    assert len(calls.times) == 2


def test_keys_have_timers_of_their_own(make_queue):
    calls = Calls()
    queue = make_queue(calls)
    queue.add_after("ns", "a", 0.2)
    queue.add_after("ns", "b", 0.2)
    time.sleep(0.7)
    assert len(calls.times) == 2


def test_a_key_added_while_it_runs_runs_once_more_afterwards(make_queue):
    calls = Calls(hold=0.3)
    queue = make_queue(calls)
    queue.add("ns", "a")
    time.sleep(0.1)
    for _ in range(5):
        queue.add("ns", "a")
    time.sleep(1.0)
    assert len(calls.times) == 2 and calls.times[1] - calls.times[0] >= 0.3


def test_a_failing_reconcile_is_retried_with_backoff(make_queue):
    calls = Calls(fail=2)
    queue = make_queue(calls)
    queue.add("ns", "a")
    time.sleep(2.5)
    assert len(calls.times) == 3
    assert calls.times[1] - calls.times[0] >= 0.45 and calls.times[2] - calls.times[1] >= 0.95
