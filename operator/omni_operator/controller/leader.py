"""Lease-based leader election (coordination.k8s.io/v1), so several operator replicas
can run and exactly one reconciles. The semantics are client-go's leaderelection:

* Expiry is judged on each candidate's own monotonic clock: the local time at which it last
  saw the Lease record change, plus leaseDurationSeconds. The holder's renewTime is written
  for people to read and never compared with the local wall clock, so skew between the
  nodes' clocks cannot make two leaders (only a difference in clock *rate* of more than
  lease duration / renew deadline could).
* The leader renews every retry period. Every request is bounded by the time left before
  the renew deadline (counted from the start of its last successful renew, and shorter than
  the lease duration). A watchdog thread, which no blocked request can hold up, declares the
  lease lost the moment that deadline passes: `leading` is cleared, so fenced writes are
  refused, and `on_lost` runs, by default ending the process so the kubelet restarts it as
  a follower.

Why that is safe: another candidate takes over only after a full lease duration without
seeing the record change, counted from no earlier than the leader's last successful write,
which itself started no earlier than the leader's deadline base. So the old leader has
stopped at least lease duration - renew deadline (5 s by default) before a new one starts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from kubernetes import client

from omni_operator.controller import metrics
from omni_operator.kube import Kube, KubeError

log = logging.getLogger(__name__)

LEASE_SECONDS = 15
RENEW_DEADLINE = 10.0
RETRY_SECONDS = 2.0
WATCHDOG_TICK = 0.25  # the watchdog re-reads the clock at least this often (clocks may be injected)


class NotLeader(KubeError):
    """A write refused because this process no longer holds the lease."""

    def __init__(self) -> None:
        super().__init__(0, "NotLeader", "this operator no longer holds the leader lease")


def micro_time(epoch: float) -> str:
    """A Kubernetes MicroTime."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_client(configuration: client.Configuration | None = None) -> client.ApiClient:
    """An API client for the elector alone: its own connection pool, so renewals never queue
    behind the reconciler's requests, and no transparent urllib3 retries, which would restart
    the timeout of a request and carry it past the renew deadline."""
    cfg = configuration if configuration is not None else client.Configuration.get_default_copy()
    cfg.retries = False
    return client.ApiClient(cfg)


def _exit_process() -> None:
    os._exit(1)


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str = "omni-operator-leader",
                 identity: str | None = None, *, lease_seconds: int = LEASE_SECONDS,
                 renew_deadline: float = RENEW_DEADLINE, retry_seconds: float = RETRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 on_lost: Callable[[], None] = _exit_process):
        if not 0 < retry_seconds < renew_deadline < lease_seconds:
            raise ValueError("need retry_seconds < renew_deadline < lease_seconds")
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        self.lease_seconds = int(lease_seconds)
        self.renew_deadline = renew_deadline
        self.retry_seconds = retry_seconds
        self.clock = clock  # monotonic: all expiry arithmetic
        self.wall_clock = wall_clock  # epoch seconds: only the timestamps written into the Lease
        self.on_lost = on_lost
        self.leading = threading.Event()  # set while this process may act as the leader
        self.lost = threading.Event()  # set once the lease was lost (never cleared)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._observed: tuple[Any, str] | None = None  # (resourceVersion, spec) last seen
        self._observed_at = 0.0  # self.clock() when the record last changed
        self._observed_duration = lease_seconds  # its leaseDurationSeconds
        self._holder = ""  # holderIdentity last seen
        self._renewed_at = 0.0  # self.clock() at the start of the last successful acquire/renew

    # ------------------------------------------------------------------ one attempt

    def _path(self) -> str:
        return self.kube.path("Lease", self.namespace, self.name)

    def _time_left(self, deadline: float) -> float:
        left = deadline - self.clock()
        if left <= 0:
            raise TimeoutError("the renew deadline passed")
        return left

    def _observe(self, lease: dict[str, Any]) -> dict[str, Any]:
        spec = lease.get("spec") or {}
        record = ((lease.get("metadata") or {}).get("resourceVersion"), json.dumps(spec, sort_keys=True))
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
            self._observed_duration = spec.get("leaseDurationSeconds") or self.lease_seconds
        self._holder = spec.get("holderIdentity") or ""
        return spec

    @property
    def holder(self) -> str:
        """The holder in the record this process saw last ("" when none)."""
        return self._holder

    def expires_at(self) -> float:
        """When (on self.clock()) the lease seen last expires unless its record changes again."""
        return self._observed_at + self._observed_duration

    def try_acquire_or_renew(self, deadline: float | None = None) -> bool:
        """One attempt: True when this process holds the lease afterwards. Each request gets
        the time left before `deadline` (a self.clock() value) as its timeout."""
        if deadline is None:
            deadline = self.clock() + self.renew_deadline
        now = micro_time(self.wall_clock())
        try:
            lease = self.kube.request("GET", self._path(), retries=0, timeout=self._time_left(deadline))
        except KubeError as err:
            if err.status != 404:
                raise
            lease = None
        try:
            if lease is None:
                created = self.kube.request("POST", self.kube.path("Lease", self.namespace), retries=0,
                                            timeout=self._time_left(deadline), body={
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                             "acquireTime": now, "renewTime": now, "leaseTransitions": 0}})
                self._observe(created)
                return True
            current = self._observe(lease)
            holder = current.get("holderIdentity") or ""
            if holder and holder != self.identity and self.clock() < self.expires_at():
                return False
            spec = {**current, "holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                    "renewTime": now}
            if holder != self.identity:
                spec["acquireTime"] = now
                spec["leaseTransitions"] = (current.get("leaseTransitions") or 0) + 1
            lease["spec"] = spec
            # PUT with the resourceVersion we read: if anyone wrote since, 409 and we did not win.
            updated = self.kube.request("PUT", self._path(), body=lease, retries=0,
                                        timeout=self._time_left(deadline))
            self._observe(updated)
            return True
        except KubeError as err:
            if err.status == 409:
                return False
            raise

    # ------------------------------------------------------------------ lifecycle

    def acquire(self) -> bool:
        """Block until this process holds the lease (True), or until stop()/release() (False);
        then renew it in the background and watch the renew deadline."""
        log.info("waiting for leader lease %s/%s as %s", self.namespace, self.name, self.identity)
        while True:
            if self._stop.is_set():
                return False
            started = self.clock()
            try:
                if self.try_acquire_or_renew(started + self.renew_deadline):
                    break
            except Exception as err:  # noqa: BLE001 - an unreachable apiserver: try again
                log.warning("reading the leader lease failed: %s", err)
            self._stop.wait(self.retry_seconds * (1 + 0.2 * random.random()))  # jitter: candidates spread out
        with self._lock:
            if self._stop.is_set():
                return False
            self._renewed_at = started  # the deadline counts from before the write that won
            self.leading.set()
        metrics.IS_LEADER.set(1)
        log.info("acquired leader lease as %s", self.identity)
        threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True).start()
        threading.Thread(target=self._watchdog, name="lease-watchdog", daemon=True).start()
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.retry_seconds):
            started = self.clock()
            with self._lock:
                if self.lost.is_set():
                    return
                deadline = self._renewed_at + self.renew_deadline
            try:
                renewed = self.try_acquire_or_renew(deadline)
            except Exception as err:  # noqa: BLE001 - retried until the deadline; the watchdog decides
                log.warning("renewing the leader lease failed: %s", err)
                continue
            if renewed:
                with self._lock:
                    if self.lost.is_set() or self._stop.is_set():
                        return  # too late: a renewal cannot bring leadership back
                    self._renewed_at = started
            elif self._holder not in ("", self.identity):
                self._lose(f"the lease is held by {self._holder}")
                return
            # otherwise a conflicting write (409): read again next period, until the deadline

    def _watchdog(self) -> None:
        """Ends leadership the moment the renew deadline passes, whatever the renew loop is
        blocked on."""
        while True:
            with self._lock:
                left = self._renewed_at + self.renew_deadline - self.clock()
            if left <= 0:
                self._lose(f"not renewed within the {self.renew_deadline:g}s renew deadline")
                return
            if self._stop.wait(min(left, WATCHDOG_TICK)):
                return

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.lost.is_set() or self._stop.is_set():
                return
            self.lost.set()
            self.leading.clear()
        metrics.IS_LEADER.set(0)
        log.error("lost the leader lease (%s); stopping", reason)
        self.on_lost()

    def stop(self) -> None:
        """Stop renewing and watching, without releasing: others take over once it expires."""
        with self._lock:
            self._stop.set()
            self.leading.clear()
        metrics.IS_LEADER.set(0)

    def release(self) -> None:
        """Clean shutdown: stop, and hand the lease over at once (an empty holder is free)."""
        was_leading = self.leading.is_set()
        self.stop()
        if not was_leading:
            return
        deadline = self.clock() + self.renew_deadline
        try:
            lease = self.kube.request("GET", self._path(), retries=0, timeout=self._time_left(deadline))
            spec = (lease or {}).get("spec") or {}
            if spec.get("holderIdentity") == self.identity:
                lease["spec"] = {**spec, "holderIdentity": "", "renewTime": micro_time(self.wall_clock())}
                self.kube.request("PUT", self._path(), body=lease, retries=0, timeout=self._time_left(deadline))
        except Exception as err:  # noqa: BLE001 - the lease then expires on its own
            log.warning("releasing the leader lease failed: %s", err)

    # ------------------------------------------------------------------ fencing

    def fence(self, kube: Kube) -> None:
        """Make every write through `kube` check first that this process still leads: after the
        lease is lost not one more write leaves, even from a reconcile already under way."""
        request = kube.request

        def fenced(method: str, path: str, **kwargs: Any) -> Any:
            if method != "GET" and not self.leading.is_set():
                raise NotLeader()
            return request(method, path, **kwargs)

        kube.request = fenced  # type: ignore[method-assign]
