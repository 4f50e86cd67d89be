"""Leader election against a real apiserver: clock skew between candidates, and a leader
cut off from the apiserver (the process frozen with SIGSTOP) while another waits."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client
from kubernetes import config as kube_config

from e2e.operator_process import OperatorProcess, install_crd
from omni_operator.controller.leader import LeaderElector, lease_client
from omni_operator.kube import Kube, KubeError

pytestmark = pytest.mark.cluster

HOUR = 3600.0
# Short timings for the skew test, in the production ratios (lease > renew deadline > retry).
FAST = {"lease_seconds": 6, "renew_deadline": 4.0, "retry_seconds": 1.0}


def _kube(cluster) -> Kube:
    cfg = client.Configuration()
    kube_config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
    return Kube(lease_client(cfg))


class Candidate:
    """An in-process elector whose loss is recorded instead of ending the test process."""

    def __init__(self, cluster, namespace: str, identity: str, skew: float = 0.0, **timing):
        self.lost_at: float | None = None
        self.stopped = threading.Event()  # set once lost_at is known
        self.leading_at: float | None = None
        self.acquired = threading.Event()  # set once leading_at is known
        self.elector = LeaderElector(
            _kube(cluster), namespace, identity=identity,
            # Both clocks of this candidate are off by `skew`: only differences of the monotonic
            # one may matter, and the wall clock only stamps what is written.
            clock=lambda: time.monotonic() + skew, wall_clock=lambda: time.time() + skew,
            on_lost=self._on_lost, **timing)

    def _on_lost(self) -> None:
        self.lost_at = time.monotonic()
        self.stopped.set()

    def acquire_in_background(self) -> None:
        def run():
            if self.elector.acquire():
                self.leading_at = time.monotonic()
                self.acquired.set()
        threading.Thread(target=run, name=f"acquire-{self.elector.identity}", daemon=True).start()


def _lease(cluster, namespace: str) -> dict:
    status, body = cluster.api("GET", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/"
                                      "omni-operator-leader")
    assert status == 200, body
    return body["spec"]


@pytest.mark.parametrize("skew", [HOUR, -HOUR], ids=["b-1h-ahead", "b-1h-behind"])
def test_skewed_candidate_never_steals_a_renewed_lease_and_takes_over_after_its_own_lease_duration(
        cluster, namespace, skew):
    a = Candidate(cluster, namespace, "a", **FAST)
    b = Candidate(cluster, namespace, "b", skew=skew, **FAST)
    lease = FAST["lease_seconds"]
    a.elector.acquire()
    assert a.elector.leading.is_set()
    b.acquire_in_background()
    try:
        # A renews every second; B watches three lease durations and must not take the lease.
        assert not b.acquired.wait(3 * lease), "B took a lease that A kept renewing"
        assert _lease(cluster, namespace)["holderIdentity"] == "a"
        assert a.elector.leading.is_set() and a.lost_at is None

        a.elector.stop()  # A stops renewing (hung, partitioned) without releasing
        stopped = time.monotonic()
        assert b.acquired.wait(3 * lease), "B never took over the abandoned lease"
        took = b.leading_at - stopped
        print(f"skew {skew:+.0f}s: B took over {took:.2f}s after A's last renew (lease {lease}s)")
        # B waits one lease duration from when it last saw the record change (A's last renew,
        # up to one retry period before `stopped`), plus at most a retry period of its own.
        assert lease - FAST["retry_seconds"] - 0.5 <= took <= lease + 2 * FAST["retry_seconds"] + 1.5
        spec = _lease(cluster, namespace)
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
        # The skewed wall clock only shows in the timestamps B writes.
        renewed = time.mktime(time.strptime(spec["renewTime"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert abs(renewed - (time.time() + skew)) < 60
    finally:
        b.elector.release()
        a.elector.stop()


def test_leader_cut_off_from_the_apiserver_stops_acting_within_its_renew_deadline(cluster, namespace):
    # Production timings: 15 s lease, 10 s renew deadline, 2 s retry; the client timeout is 30 s.
    a = Candidate(cluster, namespace, "a")
    b = Candidate(cluster, namespace, "b")
    writes = _kube(cluster)
    a.elector.fence(writes)
    renew_deadline = a.elector.renew_deadline
    assert writes.timeout > 2 * renew_deadline  # a request left alone could block this long

    a.elector.acquire()
    assert a.elector.leading.is_set()
    b.acquire_in_background()
    time.sleep(3)  # a renew or so; B has seen the record
    with cluster.paused_apiserver():
        paused = time.monotonic()
        assert a.stopped.wait(renew_deadline + 2), "A still acts as leader past its renew deadline"
        stopped = a.lost_at - paused
        print(f"A stopped acting {stopped:.2f}s after the apiserver froze (renew deadline {renew_deadline}s)")
        assert stopped <= renew_deadline + 0.5
        assert not a.elector.leading.is_set()
        # Its writes are refused at once, before a request could hang on the frozen apiserver.
        started = time.monotonic()
        with pytest.raises(KubeError, match="NotLeader"):
            writes.apply({"apiVersion": "v1", "kind": "Service",
                          "metadata": {"name": "late-write", "namespace": namespace},
                          "spec": {"ports": [{"port": 80}]}})
        assert time.monotonic() - started < 0.5
        assert b.leading_at is None
    try:
        assert b.acquired.wait(60), "B never took over"
        print(f"B took over {b.leading_at - paused:.2f}s after the freeze, "
              f"{b.leading_at - a.lost_at:.2f}s after A stopped acting")
        assert b.leading_at > a.lost_at
        assert _lease(cluster, namespace)["holderIdentity"] == "b"
        assert writes.get("Service", namespace, "late-write") is None
    finally:
        b.elector.release()


def test_operator_process_exits_within_its_renew_deadline_when_the_apiserver_freezes(cluster, namespace, tmp_path):
    install_crd(cluster)
    op = OperatorProcess(cluster, tmp_path / "operator.log", "--namespace", namespace, "--leader-elect",
                         "--leader-election-namespace", namespace).start()
    try:
        cluster.wait_for("the operator to lead", op.ready, timeout=60)
        with cluster.paused_apiserver():
            paused = time.monotonic()
            while op.proc.poll() is None and time.monotonic() < paused + 20:
                time.sleep(0.05)
            exited = time.monotonic() - paused
        print(f"the operator exited {exited:.2f}s after the apiserver froze")
        assert op.proc.returncode == 1, op.log_tail()
        assert exited <= 10.0 + 0.5, op.log_tail()
        assert "lost the leader lease" in op.log_tail()
    finally:
        op.stop()
