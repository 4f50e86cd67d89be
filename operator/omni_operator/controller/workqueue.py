"""The reconciler's work queue: one reconcile per key at a time, bursts coalesced, retries
backed off, one pending delay per key (all delays kept by one thread), and a first lane for
what users changed."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque

log = logging.getLogger(__name__)

Key = tuple[str, str]


class Clock:
    """The queue's only notion of time: monotonic seconds, and waiting on a condition for some
    of them (a test gives a clock it advances by hand)."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, seconds: float | None) -> None:
        condition.wait(seconds)


class WorkQueue:
    """Deduplicating work queue: a key is never reconciled twice at once, and a key added
    while it is being reconciled is reconciled once more afterwards (nothing is lost).
    A key whose reconcile raises is retried with exponential backoff.

    Two lanes: `add(..., first=True)` (a new or changed spec) goes ahead of everything else
    (child events, requeues, the resync), as controller-runtime's priority queue does; in a
    burst of new objects, each one's children are created before earlier ones' follow-ups.

    Delayed adds wait in one heap served by one thread (as client-go's delaying queue): a
    timer thread per waiting object would cost a thread start per requeue and a stack per
    object, thousands of them when many objects wait on their pods."""

    MAX_BACKOFF = 60.0

    def __init__(self, handler, workers: int = 4, clock: Clock | None = None):
        self._handler = handler
        self._clock = clock or Clock()
        self._failures: dict[Key, int] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # workers wait here for keys
        self._delay_changed = threading.Condition(self._lock)  # the delay thread waits here
        # Each queued key is in one lane per `_queued` (True: the first lane). A key moved to the
        # first lane leaves a stale entry in the other, skipped when it comes up.
        self._first: deque[Key] = deque()
        self._rest: deque[Key] = deque()
        self._queued: dict[Key, bool] = {}
        self._active: set[Key] = set()
        self._dirty: dict[Key, bool] = {}  # added while being reconciled (and whether first)
        self._soon: set[Key] = set()
        self._after: dict[Key, float] = {}  # key -> when its one requeue is due (monotonic)
        # (due, seq, key, is_soon); entries replaced in _after are skipped when they come up
        self._delayed: list[tuple[float, int, Key, bool]] = []
        self._seq = 0
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
                         for i in range(workers)]
        self._threads.append(threading.Thread(target=self._release_due, name="reconcile-delays", daemon=True))
        for t in self._threads:
            t.start()

    def add(self, namespace: str, name: str, first: bool = False) -> None:
        with self._lock:
            self._add_locked((namespace, name), first)

    def add_after(self, namespace: str, name: str, seconds: float) -> None:
        """Reconcile again within `seconds` (a loader's progress, a pod check, a retry). One pending
        requeue per key: while one is due sooner, a later request is folded into it (that
        reconcile asks again for what it still needs); a sooner one replaces it. Otherwise every
        reconcile of a waiting object (child events, the resync) would start a chain of its own."""
        key = (namespace, name)
        due = self._clock.now() + seconds
        with self._lock:
            pending = self._after.get(key)
            if pending is not None and pending <= due:
                return
            self._after[key] = due
            self._delay_locked(due, key, is_soon=False)

    def add_soon(self, namespace: str, name: str, seconds: float) -> None:
        """Reconcile once after `seconds`, however many times this is called meanwhile: a
        burst of child events (a rollout touches a StatefulSet many times) is one reconcile."""
        key = (namespace, name)
        with self._lock:
            if key in self._soon:
                return
            self._soon.add(key)
            self._delay_locked(self._clock.now() + seconds, key, is_soon=True)

    def _add_locked(self, key: Key, first: bool = False) -> None:
        if key in self._active:
            self._dirty[key] = first or self._dirty.get(key, False)
        else:
            self._enqueue_locked(key, first)

    def _delay_locked(self, due: float, key: Key, is_soon: bool) -> None:
        self._seq += 1
        heapq.heappush(self._delayed, (due, self._seq, key, is_soon))
        if self._delayed[0][1] == self._seq:  # due before everything else: wake the delay thread
            self._delay_changed.notify()

    def _release_due(self) -> None:
        with self._lock:
            while not self._stopped:
                if not self._delayed:
                    self._delay_changed.wait()
                    continue
                due, _, key, is_soon = self._delayed[0]
                wait = due - self._clock.now()
                if wait > 0:
                    self._clock.wait(self._delay_changed, wait)
                    continue
                heapq.heappop(self._delayed)
                if is_soon:
                    self._soon.discard(key)
                elif self._after.get(key) == due:
                    del self._after[key]
                else:
                    continue  # replaced by a sooner one
                self._add_locked(key)

    def _enqueue_locked(self, key: Key, first: bool = False) -> None:
        queued_first = self._queued.get(key)
        if queued_first is None or (first and not queued_first):
            self._queued[key] = first
            (self._first if first else self._rest).append(key)
            self._cond.notify()

    def _next_locked(self) -> Key | None:
        for lane, is_first in ((self._first, True), (self._rest, False)):
            while lane:
                key = lane.popleft()
                if self._queued.get(key) is is_first:
                    del self._queued[key]
                    return key
        return None

    def depth(self) -> int:
        """Keys waiting for a worker."""
        with self._lock:
            return len(self._queued)

    def running(self) -> int:
        """Keys being reconciled now."""
        with self._lock:
            return len(self._active)

    def scheduled(self) -> int:
        """Keys with a delayed reconcile still to come (a requeue, a retry, a coalesced burst)."""
        with self._lock:
            return len(self._after) + len(self._soon)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._cond.notify_all()
            self._delay_changed.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                key = self._next_locked()
                self._active.add(key)
            try:
                self._handler(*key)
                self._failures.pop(key, None)
            except Exception:  # never let one object take the worker down
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                delay = min(self.MAX_BACKOFF, 0.5 * 2 ** (failures - 1))
                log.exception("reconcile of %s/%s failed (%d in a row); retrying in %.1fs", *key, failures, delay)
                self.add_after(*key, delay)
            finally:
                with self._cond:
                    self._active.discard(key)
                    if key in self._dirty:
                        self._enqueue_locked(key, self._dirty.pop(key))
