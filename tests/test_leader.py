"""Leader election without a cluster: expiry arithmetic on a fake clock, the renew-deadline
watchdog against a request that never returns, and write fencing."""

from __future__ import annotations

import copy
import threading
import time

import pytest

from omni_operator.controller import metrics
from omni_operator.controller.leader import LeaderElector, NotLeader, micro_time
from omni_operator.kube import Kube, KubeError

pytestmark = pytest.mark.pure

NS = "ops"
HOUR = 3600.0


class FakeApi:
    """One Lease in memory, with resourceVersion conflicts (409) like the apiserver."""

    path = staticmethod(Kube.path)

    def __init__(self):
        self.lease: dict | None = None
        self.version = 0
        self.timeouts: list[float] = []
        self.block = threading.Event()  # set: requests hang until `unblock` is set
        self.unblock = threading.Event()
        self.requests = 0
        self.before_put = lambda: None

    def request(self, method, path, *, body=None, retries=4, timeout=None, **_):
        self.requests += 1
        self.timeouts.append(timeout)
        if self.block.is_set():
            self.unblock.wait()  # ignores `timeout`, like a stuck connection the client cannot see
        if method == "GET":
            if self.lease is None:
                raise KubeError(404, "NotFound")
            return copy.deepcopy(self.lease)
        if method == "POST":
            if self.lease is not None:
                raise KubeError(409, "AlreadyExists")
        elif method == "PUT":
            self.before_put()
            if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
                raise KubeError(409, "Conflict")
        else:
            return {}
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    def hold(self, holder: str, renew_time: str = "2000-01-01T00:00:00.000000Z", duration: int = 15):
        """Another process writes the lease."""
        spec = {"holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": renew_time,
                "acquireTime": renew_time, "leaseTransitions": 3}
        if self.lease is None:
            self.lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                          "metadata": {"name": "omni-operator-leader", "namespace": NS}}
        self.lease["spec"] = spec
        self.version += 1
        self.lease["metadata"]["resourceVersion"] = str(self.version)


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def elector(api, identity="b", clock=None, wall=None, **kw) -> LeaderElector:
    return LeaderElector(api, NS, identity=identity, clock=clock or time.monotonic,
                         wall_clock=wall or time.time, on_lost=kw.pop("on_lost", lambda: None), **kw)


@pytest.mark.parametrize("skew", [0.0, HOUR, -HOUR])
def test_a_held_lease_expires_a_lease_duration_after_its_record_last_changed_on_the_local_clock(skew):
    api, clock = FakeApi(), FakeClock()
    # renewTime says nothing to a candidate: written by a clock an hour off, or long ago.
    api.hold("a", renew_time=micro_time(time.time() - skew))
    b = elector(api, clock=clock, wall=lambda: time.time() + skew)
    assert not b.try_acquire_or_renew()  # first sight of the record: the clock starts now
    clock.advance(14.9)
    assert not b.try_acquire_or_renew()
    api.hold("a", renew_time=micro_time(time.time() - skew))  # A renews: B starts counting again
    clock.advance(0.2)
    assert not b.try_acquire_or_renew()
    assert b.expires_at() == pytest.approx(clock.now + 15)
    clock.advance(14.9)
    assert not b.try_acquire_or_renew()
    clock.advance(0.2)
    assert b.try_acquire_or_renew()
    spec = api.lease["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 4
    assert spec["leaseDurationSeconds"] == 15
    assert spec["acquireTime"] == spec["renewTime"]
    # The written timestamps come from B's wall clock, skew and all.
    written = time.mktime(time.strptime(spec["renewTime"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(written - (time.time() + skew)) < 5


def test_the_records_lease_duration_counts_and_an_empty_holder_is_free_at_once():
    api, clock = FakeApi(), FakeClock()
    api.hold("a", duration=40)
    b = elector(api, clock=clock)
    assert not b.try_acquire_or_renew()
    clock.advance(39)
    assert not b.try_acquire_or_renew()
    clock.advance(1.1)
    assert b.try_acquire_or_renew()
    api.hold("")  # released
    c = elector(api, identity="c", clock=clock)
    assert c.try_acquire_or_renew()
    assert api.lease["spec"]["holderIdentity"] == "c"


def test_first_candidate_creates_the_lease_and_a_racing_writer_makes_the_other_lose():
    api = FakeApi()
    a = elector(api, identity="a")
    assert a.try_acquire_or_renew()
    assert api.lease["spec"]["holderIdentity"] == "a" and api.lease["spec"]["leaseTransitions"] == 0
    acquired = api.lease["spec"]["acquireTime"]
    assert a.try_acquire_or_renew()  # renewing keeps acquireTime and the transition count
    assert api.lease["spec"]["acquireTime"] == acquired and api.lease["spec"]["leaseTransitions"] == 0
    api.before_put = lambda: api.hold("b")  # b writes between a's read and a's write
    assert not a.try_acquire_or_renew()  # 409: a did not win
    assert api.lease["spec"]["holderIdentity"] == "b"


def test_every_request_is_bounded_by_the_time_left_before_the_deadline():
    api, clock = FakeApi(), FakeClock()
    b = elector(api, clock=clock)
    assert b.try_acquire_or_renew(deadline=clock.now + 3.5)
    assert api.timeouts == [3.5, 3.5]  # GET (404), POST
    with pytest.raises(TimeoutError):
        b.try_acquire_or_renew(deadline=clock.now)  # nothing is sent once the deadline passed
    assert len(api.timeouts) == 2


def test_watchdog_stops_the_leader_at_the_renew_deadline_while_a_renew_hangs():
    api = FakeApi()
    lost_at: list[float] = []
    stopped = threading.Event()

    def on_lost():
        lost_at.append(time.monotonic())
        stopped.set()

    a = elector(api, identity="a", lease_seconds=3, renew_deadline=1.0, retry_seconds=0.2, on_lost=on_lost)
    fenced = FakeApi()
    a.fence(fenced)
    try:
        assert a.acquire() and a.leading.is_set()
        assert metrics.IS_LEADER._value.get() == 1
        time.sleep(0.5)  # renewals go through
        assert not a.lost.is_set()
        api.block.set()  # from now on every request hangs, whatever timeout it was given
        blocked = time.monotonic()
        assert stopped.wait(2.0)
        assert a.lost.is_set()
        # The last good renew started at most a retry period before the block.
        assert 0.5 < lost_at[0] - blocked <= 1.0 + 0.3
        assert not a.leading.is_set() and metrics.IS_LEADER._value.get() == 0
        assert not api.unblock.is_set()  # the renew request is still hanging: the watchdog did not wait for it
        before = fenced.requests
        with pytest.raises(NotLeader):
            fenced.request("PATCH", "/apis/apps/v1/namespaces/ops/statefulsets/x/scale", body={})
        assert fenced.requests == before  # refused before anything was sent
        with pytest.raises(KubeError) as err:  # reads are never fenced: this one reaches the API
            fenced.request("GET", "/x")
        assert err.value.status == 404
    finally:
        api.unblock.set()
        a.stop()
    time.sleep(0.5)
    assert len(lost_at) == 1 and not a.leading.is_set()  # a late successful renew brings nothing back


def test_leader_stops_at_once_when_another_holds_the_lease():
    api = FakeApi()
    lost = threading.Event()
    a = elector(api, identity="a", lease_seconds=3, renew_deadline=2.0, retry_seconds=0.2, on_lost=lost.set)
    try:
        assert a.acquire()
        api.hold("b")
        assert lost.wait(1.0)
        assert not a.leading.is_set()
    finally:
        a.stop()


def test_release_hands_the_lease_over_and_fencing_starts_closed():
    api = FakeApi()
    a = elector(api, identity="a", lease_seconds=3, renew_deadline=2.0, retry_seconds=0.2)
    writes = FakeApi()
    a.fence(writes)
    with pytest.raises(NotLeader):  # not leading yet
        writes.request("POST", "/x", body={})
    assert a.acquire()
    writes.request("POST", "/x", body={"metadata": {}})
    a.release()
    assert api.lease["spec"]["holderIdentity"] == ""
    assert not a.leading.is_set() and not a.lost.is_set()
    with pytest.raises(NotLeader):
        writes.request("POST", "/x", body={})
    b = elector(api, identity="b")
    assert b.try_acquire_or_renew()  # a released lease is free at once


def test_timings_must_leave_the_leader_time_to_stop_before_the_lease_expires():
    with pytest.raises(ValueError):
        elector(FakeApi(), lease_seconds=10, renew_deadline=10.0)
    with pytest.raises(ValueError):
        elector(FakeApi(), lease_seconds=15, renew_deadline=2.0, retry_seconds=2.0)
