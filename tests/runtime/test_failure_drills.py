"""Failure drills on a serving cluster, each counting what clients lose.

One OmniDeployment with two pods of every role runs the tiny model on a private local cluster
whose node agent runs the pods' real processes, Ready only from their probes
(e2e/serving_deployment.py). Three clients send small chat requests back to back (of every four
one streamed and one asking for speech), each on a new connection to a gateway pod that is Ready
and not terminating as re-read every second, the way kube-proxy routes a Service
(e2e/gateway_clients.py). The drills share the deployment and run in this order:

1. a rollout of the gateway and of the talker (a spec change): nothing lost;
2. a rollout of the thinker with the operator killed and restarted in the middle: nothing lost,
   the rollout completes, no pod or workload is recreated beyond the rollout's own;
3. ``kubectl delete pod`` of a gateway, a thinker and a talker pod: nothing lost among requests sent
   after a deletion; what was in flight at one fails, if at all, cleanly (Retry-After);
4. SIGKILL of a thinker's and a talker's process mid-stream: the stream ends with an error event,
   the next requests go elsewhere, the pod restarts and rejoins.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import pytest

from e2e.gateway_clients import Clients, Outcome, failures, pod_serves, request_body, send
from e2e.serving_deployment import Stand, rolled_out, serving_deployment
from omni_runtime.metrics import parse_prometheus_text

pytestmark = pytest.mark.runtime

CLIENTS = 3
SETTLE = 2.0  # seconds of load before and after each change, so each change happens under load


@pytest.fixture(scope="module")
def stand(tmp_path_factory, tiny_model):
    with serving_deployment(tmp_path_factory.mktemp("drills"), tiny_model, say=print) as s:
        yield s


def pod_uids(stand: Stand, role: str, *, terminating: bool = True) -> set[str]:
    return {p["metadata"]["uid"] for p in stand.pods(role) if terminating or not p["metadata"].get("deletionTimestamp")}


def serving(stand: Stand, role: str) -> list[dict]:
    return [p for p in stand.pods(role) if pod_serves(p)]


def scrape(pod: dict) -> dict[str, float]:
    """A pod's process's metrics, read from the pod itself."""
    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:9400/metrics", timeout=2) as r:
        return parse_prometheus_text(r.read().decode())


def answers_begun(pod: dict) -> tuple[float, bool]:
    """(How many answers the pod's process has begun streaming, whether it holds a request now).
    A talker sends its response head with its first audio; before that, a lost talker is one the
    gateway retries on another replica, unseen by the client (test_gateway_drain.py). A thinker's
    answer begins as it takes the request."""
    metrics = scrape(pod)
    running = metrics.get("omni_requests_running", 0.0)
    begun = metrics.get("omni_talker_time_to_first_audio_seconds_count",
                        metrics.get("omni_requests_finished_total", 0.0) + running)
    return begun, running >= 1


def streaming(pod: dict, begun_before: float) -> bool:
    begun, holding = answers_begun(pod)
    return holding and begun > begun_before


def under_load(stand: Stand, change) -> list[Outcome]:
    """Run `change()` with the clients sending; every request's outcome."""
    with stand.gateway_pods() as pods:
        clients = Clients(pods, stand.model, CLIENTS)
        with clients:
            time.sleep(SETTLE)
            change(clients)
            time.sleep(SETTLE)
    return clients.outcomes


@pytest.mark.timeout(1200)
def test_a_rollout_of_the_gateway_and_of_the_talker_under_load_loses_no_request(stand):
    windows = {}

    def roll(clients):
        for role in ("gateway", "talker"):
            before, generation = pod_uids(stand, role), stand.workload(role)["metadata"]["generation"]
            began = time.monotonic()
            stand.roll(role)
            stand.wait_rolled_out(role, since_generation=generation)
            windows[role] = (began, time.monotonic())
            # (the old gateway pods may still drain: a Deployment does not wait for them)
            assert not before & pod_uids(stand, role, terminating=False), f"every {role} pod was replaced"

    outcomes = under_load(stand, roll)
    assert not failures(outcomes), failures(outcomes)
    for role, (began, ended) in windows.items():
        # under load: every client had requests going during the rollout (a gateway's takes seconds)
        during = [o for o in outcomes if o.sent < ended and o.done > began]
        assert len(during) >= CLIENTS + 1, f"only {len(during)} requests during the {role} rollout"
    print(f"{len(outcomes)} requests, 0 failed; rollouts took "
          + ", ".join(f"{r} {e - b:.0f}s" for r, (b, e) in windows.items()))


@pytest.mark.timeout(1200)
def test_the_operator_restarted_mid_rollout_lets_the_thinker_rollout_complete_and_recreates_nothing(stand):
    others = {role: pod_uids(stand, role) for role in ("gateway", "talker")}
    workloads = {role: stand.workload(role) for role in ("gateway", "thinker", "talker")}
    seen: set[str] = set(pod_uids(stand, "thinker"))
    old = set(seen)

    def roll_with_restart(clients):
        stand.roll("thinker")

        def begun():  # the StatefulSet controller has taken an old pod down
            seen.update(pod_uids(stand, "thinker"))
            pods = stand.pods("thinker")
            return any(p["metadata"].get("deletionTimestamp") for p in pods) or not old <= {
                p["metadata"]["uid"] for p in pods}
        stand.cluster.wait_for("the thinker rollout to begin", begun, timeout=120, interval=0.3)
        stand.restart_operator()

        def done():
            seen.update(pod_uids(stand, "thinker"))
            return rolled_out(stand.workload("thinker"))
        stand.cluster.wait_for("the thinker rollout to complete", done, timeout=600, interval=0.5)

    outcomes = under_load(stand, roll_with_restart)
    assert not failures(outcomes), failures(outcomes)
    after = {role: stand.workload(role) for role in workloads}
    for role, w in after.items():
        assert w["metadata"]["uid"] == workloads[role]["metadata"]["uid"], f"the {role} workload was recreated"
    # one spec change, one new generation of the StatefulSet; the others untouched
    assert after["thinker"]["metadata"]["generation"] == workloads["thinker"]["metadata"]["generation"] + 1
    for role in ("gateway", "talker"):
        assert after[role]["metadata"]["generation"] == workloads[role]["metadata"]["generation"]
        assert pod_uids(stand, role) == others[role], f"a {role} pod was recreated"
    new = pod_uids(stand, "thinker")
    assert not new & old and seen == old | new, "each thinker pod was replaced exactly once"
    omni = stand.cluster.get_json("omnideployment", stand.name, "-n", stand.namespace)
    assert omni["status"]["observedGeneration"] == omni["metadata"]["generation"]


@pytest.mark.timeout(1200)
def test_deleting_a_pod_of_each_role_under_load_loses_no_request_that_had_not_reached_it(stand):
    deleted_at = {}

    def delete(clients):
        for role in ("gateway", "thinker", "talker"):
            victim = min(serving(stand, role), key=lambda p: p["metadata"]["name"])["metadata"]
            deleted_at[role] = time.monotonic()
            stand.cluster.kubectl("delete", "pod", victim["name"], "-n", stand.namespace, "--wait=false")
            # gone (after its drain), and two pods serve again (a StatefulSet's under the same name)
            stand.cluster.wait_for(f"{victim['name']} replaced", lambda: victim["uid"] not in pod_uids(stand, role)
                                   and len(serving(stand, role)) == 2, timeout=300, interval=0.5)
            time.sleep(SETTLE)

    outcomes = under_load(stand, delete)
    moments = list(deleted_at.values())
    in_flight = [o for o in outcomes if any(o.sent < m < o.done for m in moments)]
    not_reached = [o for o in outcomes if o not in in_flight]
    assert not failures(not_reached), failures(not_reached)
    assert all(o.clean for o in in_flight), failures(in_flight)
    assert in_flight, "no request was in flight at a deletion: the drill proved nothing"
    print(f"{len(outcomes)} requests, {len(in_flight)} in flight at a deletion, "
          f"{sum(not o.ok for o in in_flight)} of those failed (cleanly), 0 others failed")


def _kill_mid_stream(stand: Stand, pods, role: str, body: dict, attempts: int) -> tuple[Outcome, str]:
    """Send a stream; once a pod of `role` has begun answering it, SIGKILL that pod's process.
    Tries again (up to `attempts`) when the answer ended before the kill landed. The pods are
    listed before the request and only their metrics are read while it runs: a tiny talker's
    whole answer may last a few tenths of a second, not much more than a pod listing takes on a
    loaded machine."""
    for attempt in range(attempts):
        candidates = serving(stand, role)
        before = {p["metadata"]["name"]: answers_begun(p)[0] for p in candidates}
        result: list[Outcome] = []
        sender = threading.Thread(target=lambda: result.append(send(pods, "stream", stand.model, body=body)))
        sender.start()
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and sender.is_alive() and time.monotonic() < deadline:
            victim = next((p for p in candidates if streaming(p, before[p["metadata"]["name"]])), None)
            time.sleep(0.01)
        if victim is not None:
            os.kill(stand.cluster.container_pid(stand.namespace, victim["metadata"]["name"]), signal.SIGKILL)
        sender.join(90)
        assert not sender.is_alive(), "the stream hangs after its upstream was killed"
        if victim is not None and result[0].error_event:
            return result[0], victim["metadata"]["name"]
        print(f"attempt {attempt + 1}: the {role} finished before the kill ({result[0].error or 'ok'}, "
              + (f"{victim['metadata']['name']} killed)" if victim else "none killed)"))
        if victim is not None:  # it had finished: let it come back first
            _wait_rejoined(stand, role, victim["metadata"]["name"])
    raise AssertionError(f"no {role} process was killed mid-stream in {attempts} attempts")


def _wait_rejoined(stand: Stand, role: str, name: str) -> dict:
    def back():
        pod = next((p for p in stand.pods(role) if p["metadata"]["name"] == name), None)
        restarts = ((pod or {}).get("status", {}).get("containerStatuses") or [{}])[0].get("restartCount", 0)
        return pod if pod and pod_serves(pod) and restarts >= 1 else None
    return stand.cluster.wait_for(f"{name} restarted and Ready", back, timeout=300, interval=0.5)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("role, body, attempts", [
    ("thinker", {**request_body("stream", ""), "max_tokens": 2000, "ignore_eos": True}, 1),
    ("talker", {**request_body("speech", ""), "stream": True, "max_tokens": 64}, 8),
])
def test_a_process_killed_mid_stream_ends_the_stream_with_an_error_event_and_its_pod_rejoins(stand, role, body,
                                                                                             attempts):
    with stand.gateway_pods() as pods:
        outcome, victim = _kill_mid_stream(stand, pods, role, {**body, "model": stand.model}, attempts)
        assert outcome.status == 200 and outcome.error_event and outcome.clean, outcome
        # the gateway sends the next requests to the other replica
        nxt = [send(pods, kind, stand.model) for kind in ("text", "stream", "speech", "text", "stream", "speech")]
        assert not failures(nxt), failures(nxt)
        pod = _wait_rejoined(stand, role, victim)
        assert pod["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGKILL
        later = [send(pods, kind, stand.model) for kind in ("text", "speech")]
        assert not failures(later), failures(later)
