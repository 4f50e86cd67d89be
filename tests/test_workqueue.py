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


def test_waiting_keys_share_one_delay_thread(make_queue):
    """A thousand objects waiting on their pods cost no thread each; all of them still come back."""
    calls = Calls()
    queue = make_queue(calls)
    before = set(threading.enumerate())  # threads of earlier tests may still be ending: count only new ones
    for i in range(1000):
        queue.add_after("ns", f"o{i}", 0.3 + (i % 7) / 100)
        queue.add_soon("ns", f"s{i}", 0.3)
    assert set(threading.enumerate()) - before == set()
    deadline = time.monotonic() + 10
    while len(calls.times) < 2000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(calls.times) == 2000


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


def test_a_new_spec_goes_ahead_of_follow_ups_and_runs_once(make_queue):
    order: list[str] = []
    gate = threading.Event()

    def handler(namespace: str, name: str) -> None:
        if name.startswith("busy"):
            gate.wait(5)
        else:
            order.append(name)
    queue = make_queue(handler)
    queue.add("ns", "busy1")
    queue.add("ns", "busy2")  # both workers held
    time.sleep(0.2)
    queue.add("ns", "follow-up-1")
    queue.add("ns", "follow-up-2")
    queue.add("ns", "new", first=True)
    queue.add("ns", "follow-up-2", first=True)  # its spec changed meanwhile: moved ahead, not doubled
    assert queue.depth() == 3
    gate.set()
    deadline = time.monotonic() + 5
    while len(order) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    # the two freed workers take the first lane's keys, in order, before the rest
    assert order[:2] in (["new", "follow-up-2"], ["follow-up-2", "new"]) and order[2:] == ["follow-up-1"]
