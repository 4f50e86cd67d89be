"""Lease-based leader election (coordination.k8s.io/v1), so several operator replicas
can run and exactly one reconciles. Losing the lease ends the process: the
kubelet restarts it as a follower, the simplest way to never have two writers."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone

from . import metrics
from .kube import Kube, KubeError

log = logging.getLogger(__name__)


def _micro_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(ts: str | None) -> float:
    if not ts:
        return 0.0
    return datetime.strptime(ts.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str = "omni-operator-leader",
                 identity: str | None = None, lease_seconds: int = 15, renew_seconds: float = 5.0):
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self._stop = threading.Event()

    def _path(self) -> str:
        return self.kube.path("Lease", self.namespace, self.name)

    def try_acquire(self) -> bool:
        now = _micro_now()
        lease = self.kube.get("Lease", self.namespace, self.name)
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "acquireTime": now, "renewTime": now}
        try:
            if lease is None:
                self.kube.request("POST", self.kube.path("Lease", self.namespace), retries=0, body={
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec})
                return True
            current = lease.get("spec") or {}
            holder = current.get("holderIdentity")
            expired = _parse(current.get("renewTime")) + current.get("leaseDurationSeconds", 0) < time.time()
            if holder not in (None, "", self.identity) and not expired:
                return False
            if holder == self.identity:
                spec["acquireTime"] = current.get("acquireTime", now)
            else:
                spec["leaseTransitions"] = current.get("leaseTransitions", 0) + 1
            lease["spec"] = {**current, **spec}
            # PUT with the resourceVersion we read: a concurrent candidate gets 409 and loses.
            self.kube.request("PUT", self._path(), body=lease, retries=0)
            return True
        except KubeError as err:
            if err.status == 409:
                return False
            raise

    def acquire(self) -> None:
        log.info("waiting for leader lease %s/%s as %s", self.namespace, self.name, self.identity)
        while not self.try_acquire():
            time.sleep(self.renew_seconds / 2)
        log.info("acquired leader lease as %s", self.identity)
        metrics.IS_LEADER.set(1)
        threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True).start()

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.renew_seconds):
            try:
                if self.try_acquire():
                    last_ok = time.monotonic()
                    continue
                log.error("leader lease taken by another operator; exiting")
            except Exception:
                log.exception("renewing the leader lease failed")
                if time.monotonic() - last_ok < self.lease_seconds:
                    continue
            metrics.IS_LEADER.set(0)
            os._exit(1)

    def release(self) -> None:
        self._stop.set()
        try:
            lease = self.kube.get("Lease", self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                self.kube.request("PUT", self._path(), body=lease, retries=0)
        except KubeError:
            pass
