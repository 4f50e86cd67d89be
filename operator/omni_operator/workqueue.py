"""The reconciler's work queue: one reconcile per key at a time, bursts coalesced, retries
backed off, and one requeue timer per key."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class WorkQueue:
    """Deduplicating work queue: a key is never reconciled twice at once, and a key added
    while it is being reconciled is reconciled once more afterwards (nothing is lost).
    A key whose reconcile raises is retried with exponential backoff."""

    MAX_BACKOFF = 60.0

    def __init__(self, handler, workers: int = 4):
        self._handler = handler
        self._failures: dict[tuple[str, str], int] = {}
        self._cond = threading.Condition()
        self._pending: list[tuple[str, str]] = []
        self._queued: set[tuple[str, str]] = set()
        self._active: set[tuple[str, str]] = set()
        self._dirty: set[tuple[str, str]] = set()
        self._soon: set[tuple[str, str]] = set()
        self._after: dict[tuple[str, str], float] = {}  # key -> when its one timer fires (monotonic)
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def add(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._cond:
            if key in self._active:
                self._dirty.add(key)
            else:
                self._enqueue_locked(key)

    def add_after(self, namespace: str, name: str, seconds: float) -> None:
        """Reconcile again within `seconds` (a loader's progress, a pod check, a retry). One timer
        per key: while one is due sooner, a later request is folded into it (that reconcile asks
        again for what it still needs); a sooner one replaces it. Otherwise every reconcile of a
        waiting object (child events, the resync) would start a timer chain of its own."""
        key = (namespace, name)
        due = time.monotonic() + seconds
        with self._cond:
            pending = self._after.get(key)
            if pending is not None and pending <= due:
                return
            self._after[key] = due

        def fire():
            with self._cond:
                if self._after.get(key) != due:
                    return  # replaced by a sooner one
                del self._after[key]
            self.add(namespace, name)

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()

    def add_soon(self, namespace: str, name: str, seconds: float) -> None:
        """Reconcile once after `seconds`, however many times this is called meanwhile: a
        burst of child events (a rollout touches a StatefulSet many times) is one reconcile."""
        key = (namespace, name)
        with self._cond:
            if key in self._soon:
                return
            self._soon.add(key)

        def fire():
            with self._cond:
                self._soon.discard(key)
            self.add(namespace, name)

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()

    def _enqueue_locked(self, key: tuple[str, str]) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._pending.append(key)
            self._cond.notify()

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                key = self._pending.pop(0)
                self._queued.discard(key)
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
                        self._dirty.discard(key)
                        self._enqueue_locked(key)
