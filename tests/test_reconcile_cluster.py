"""Tier 3: the reconciler's reads and writes against a real kube-apiserver, with no
operator process beside it, so every request counted is the reconciler's own."""

from __future__ import annotations

import time

import pytest
from kubernetes import config as kube_config

from e2e.operator_process import install_crd
from omni_operator.cache import ObjectCache, prime_from_api
from omni_operator.handlers import MANAGED, WATCHED_CHILDREN
from omni_operator.kube import Kube
from omni_operator.reconcile import Reconciler
from omni_operator.render import MANAGER

from .test_operator_cluster import apply, condition, kget, omni

pytestmark = pytest.mark.cluster


@pytest.fixture
def kube(cluster) -> Kube:
    install_crd(cluster)
    return Kube(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))


def primed_cache(kube: Kube, namespace: str, pods: bool = False) -> ObjectCache:
    cache = ObjectCache(tuple(kind for kind, *_ in WATCHED_CHILDREN), pods=pods)
    prime_from_api(cache, kube, "OmniDeployment", [namespace], ",".join(f"{k}={v}" for k, v in MANAGED.items()))
    return cache


def owned_children(cluster, namespace: str, name: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={MANAGER}"
    items = kget(cluster, "statefulsets,deployments,services,poddisruptionbudgets,jobs,persistentvolumeclaims",
                 "-n", namespace, "-l", selector)["items"]
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in items)


def test_a_new_object_reads_nothing_before_creating_its_children(cluster, namespace, kube):
    apply(cluster, omni("fresh", namespace))
    reconciler = Reconciler(kube, cache=primed_cache(kube, namespace))
    kube.reads.clear()
    kube.writes.clear()
    outcome = reconciler.reconcile(namespace, "fresh")
    assert outcome.error is None and "Service/fresh-gateway" in outcome.applied
    # Whether a name is free is the dry run's answer (201), not a read of each child.
    assert sum(kube.reads.values()) == 0, kube.reads
    assert sum(n for k, n in kube.writes.items() if k.endswith("dryRun")) == len(outcome.applied), kube.writes
    assert set(outcome.applied) <= set(owned_children(cluster, namespace, "fresh"))


def test_a_child_a_previous_leader_wrote_that_the_watch_has_not_shown_is_read_not_rewritten(cluster, namespace,
                                                                                               kube):
    """The cache is primed before another reconciler (a previous leader) writes the children, so
    they are not in it: each one's dry run answers 200, the read shows it is ours and as planned,
    and nothing is written again."""
    apply(cluster, omni("handover", namespace))
    stale = primed_cache(kube, namespace)
    first = Reconciler(kube).reconcile(namespace, "handover")
    assert first.error is None and first.applied
    kube.reads.clear()
    kube.writes.clear()
    outcome = Reconciler(kube, cache=stale).reconcile(namespace, "handover")
    assert (outcome.error, outcome.applied, outcome.pruned) == (None, [], [])
    assert not [k for k in kube.writes if not k.endswith(("dryRun", "/status"))], kube.writes
    # One read per child (the stale cache's OmniDeployment is read again for its status write).
    assert sum(n for k, n in kube.reads.items() if "/omnideployments/" not in k) == len(first.applied), kube.reads


def _their_service(kube: Kube, cluster, namespace: str, name: str) -> dict:
    """Someone else's Service under the name the plan gives the gateway's (created by kubectl's field
    manager, with a selector of its own)."""
    ours = next(o for o in _plan_objects(kube, namespace, name) if o["metadata"]["name"] == f"{name}-gateway"
                and o["kind"] == "Service")
    theirs = {"apiVersion": "v1", "kind": "Service",
              "metadata": {"name": f"{name}-gateway", "namespace": namespace, "labels": {"team": "theirs"}},
              "spec": {"selector": {"app": "theirs"}, "ports": [dict(ours["spec"]["ports"][0])]}}
    kube.request("POST", f"/api/v1/namespaces/{namespace}/services", body=theirs, query={"fieldManager": "kubectl"})
    return kget(cluster, "service", f"{name}-gateway", "-n", namespace)


def _untouched(cluster, namespace: str, before: dict) -> None:
    after = kget(cluster, "service", before["metadata"]["name"], "-n", namespace)
    assert "ownerReferences" not in after["metadata"]
    assert after["metadata"]["labels"] == {"team": "theirs"}
    assert (after["spec"]["ports"], after["spec"]["selector"]) == (before["spec"]["ports"], before["spec"]["selector"])


def test_someone_elses_object_of_a_childs_name_stops_the_plan_unwritten(cluster, namespace, kube):
    apply(cluster, omni("taken", namespace))
    cache = primed_cache(kube, namespace)
    before = _their_service(kube, cluster, namespace, "taken")
    kube.reads.clear()
    kube.writes.clear()
    outcome = Reconciler(kube, cache=cache).reconcile(namespace, "taken")

    assert f"Service {namespace}/taken-gateway already exists and is not owned" in (outcome.error or "")
    assert not [k for k in kube.writes if not k.endswith(("dryRun", "/status", "/events"))], "nothing was written"
    assert sum(kube.reads.values()) == 1, kube.reads  # the one child that exists, read to see whose it is
    _untouched(cluster, namespace, before)
    assert owned_children(cluster, namespace, "taken") == [], "nothing half-applied"


def test_a_name_taken_between_the_dry_run_and_the_create_is_never_taken_over(cluster, namespace, kube):
    """Someone else's Service appears between the dry run and the create: the create, applied
    without force, conflicts on the selector, and what this reconcile created before it is
    deleted again. The window is a few milliseconds, too short to hit for real, so the dry run
    is made to miss the Service (the one stand-in in this test); everything else is the real
    apiserver."""
    apply(cluster, omni("late", namespace))
    cache = primed_cache(kube, namespace)
    before = _their_service(kube, cluster, namespace, "late")
    original = kube.exists_by_dry_run
    kube.exists_by_dry_run = lambda obj, **kw: False if (obj["kind"], obj["metadata"]["name"]) == (
        "Service", "late-gateway") else original(obj, **kw)
    kube.writes.clear()
    outcome = Reconciler(kube, cache=cache).reconcile(namespace, "late")

    assert f"Service {namespace}/late-gateway already exists and is not owned" in (outcome.error or "")
    assert any(k.startswith("DELETE") for k in kube.writes), "children created before the clash were undone"
    _untouched(cluster, namespace, before)
    assert owned_children(cluster, namespace, "late") == [], "nothing half-applied"


def test_a_child_the_apiserver_refuses_stops_the_plan_before_its_first_write(cluster, namespace, kube):
    """The schema takes an extended resource's request up to its limit; Pod validation wants the
    two equal. The gateway comes late in the plan: without the dry run, the Services, the weight
    cache and the thinker and talker would be written before its refusal."""
    resource = omni("refused", namespace)
    resource["spec"]["gateway"]["resources"] = {"requests": {"example.com/nic": 1}, "limits": {"example.com/nic": 2}}
    apply(cluster, resource)  # admitted: 1 <= 2
    reconciler = Reconciler(kube)
    outcome = reconciler.reconcile(namespace, "refused")

    assert outcome.applied == [] and owned_children(cluster, namespace, "refused") == [], "nothing half-applied"
    assert not [k for k in kube.writes if k.startswith("PATCH") and not k.endswith(("dryRun", "/status"))], kube.writes
    degraded = condition(kget(cluster, "omni", "refused", "-n", namespace), "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyFailed")
    message = degraded["message"]
    assert message.startswith("the apiserver refused Deployment refused-gateway, so nothing was applied: "), message
    assert ('spec.template.spec.containers[0].resources.requests: Invalid value: "1": '
            "must be equal to example.com/nic limit of 2") in message, message

    # Fixed: every child is checked once, then written; Degraded clears.
    resource["spec"]["gateway"]["resources"]["requests"]["example.com/nic"] = 2
    apply(cluster, resource)
    kube.writes.clear()
    outcome = reconciler.reconcile(namespace, "refused")
    assert outcome.error is None and len(outcome.applied) > 1
    assert sum(n for k, n in kube.writes.items() if k.endswith("dryRun")) == len(outcome.applied), kube.writes
    assert set(outcome.applied) == set(owned_children(cluster, namespace, "refused"))
    assert condition(kget(cluster, "omni", "refused", "-n", namespace), "Degraded")["status"] == "False"

    # A change of one child is one write, without a dry run.
    resource["spec"]["gateway"]["resources"] = {"requests": {"example.com/nic": 3}, "limits": {"example.com/nic": 3}}
    apply(cluster, resource)
    kube.writes.clear()
    outcome = reconciler.reconcile(namespace, "refused")
    assert (outcome.error, outcome.applied) == (None, ["Deployment/refused-gateway"])
    assert not [k for k in kube.writes if k.endswith("dryRun")], kube.writes


def _plan_objects(kube: Kube, namespace: str, name: str) -> list[dict]:
    from omni_operator.plan import make_plan

    resource = kube.get("OmniDeployment", namespace, name)
    return make_plan(name, namespace, resource["metadata"]["uid"], resource["spec"], None).objects


def test_a_not_ready_objects_pods_are_read_at_most_once_per_check_interval(cluster, namespace, kube):
    """Its reconciles come often (child events, resyncs); its pods are listed for the status'
    reasons once per `pods_checked_after`, and the reasons found are kept in between."""
    resource = omni("slow", namespace)
    resource["spec"]["gateway"]["nodePool"] = {"nodeSelector": {"omni.qwen.ai/pool": "none-such"}}
    resource["spec"]["model"] = {"pvc": {"claimName": "weights-of-their-own"}}  # no loader whose pods are read
    apply(cluster, resource)
    reconciler = Reconciler(kube, pods_checked_after=2.0)
    assert reconciler.reconcile(namespace, "slow").error is None  # children written, Ready=False
    time.sleep(2.5)

    def pod_lists() -> int:
        return sum(n for k, n in kube.reads.items() if k.endswith("/pods"))

    kube.reads.clear()
    first = reconciler.reconcile(namespace, "slow")
    assert pod_lists() == 1 and first.requeue_after <= 2.0
    again = reconciler.reconcile(namespace, "slow")
    assert pod_lists() == 1, "read again within the interval"
    assert 0 < again.requeue_after <= 2.1
    status = kget(cluster, "omni", "slow", "-n", namespace)["status"]
    assert status["gateway"]["reason"] == "Unschedulable", status["gateway"]  # kept, not forgotten
    time.sleep(again.requeue_after)
    second = reconciler.reconcile(namespace, "slow")
    assert pod_lists() == 2
    # the pods show the same as before: the next look waits twice as long, then four times
    assert 3.9 <= second.requeue_after <= 4.1, second.requeue_after
    time.sleep(2.5)
    reconciler.reconcile(namespace, "slow")
    assert pod_lists() == 2, "read again before the stretched interval passed"
    time.sleep(1.6)
    third = reconciler.reconcile(namespace, "slow")
    assert pod_lists() == 3 and 7.9 <= third.requeue_after <= 8.1, third.requeue_after
    time.sleep(0.1)
    assert reconciler.reconcile(namespace, "slow").requeue_after > 7.0
    # a spec change starts over: its pods are read at once and again after the first interval
    resource["spec"]["gateway"]["nodePool"] = {"nodeSelector": {"omni.qwen.ai/pool": "none-either"}}
    apply(cluster, resource)
    changed = reconciler.reconcile(namespace, "slow")
    assert pod_lists() == 4 and changed.requeue_after <= 2.0


def test_a_cache_that_watches_pods_answers_the_pod_checks(cluster, namespace, kube):
    """The operator watches its pods: a not-ready object's reasons come from the cache, with no
    pod LIST (at a thousand stuck objects those lists were most of the operator's reads)."""
    resource = omni("cached-pods", namespace)
    resource["spec"]["gateway"]["nodePool"] = {"nodeSelector": {"omni.qwen.ai/pool": "none-such"}}
    resource["spec"]["model"] = {"pvc": {"claimName": "weights-of-their-own"}}
    apply(cluster, resource)
    assert Reconciler(kube).reconcile(namespace, "cached-pods").error is None

    def gateway_unschedulable() -> bool:
        pods = kget(cluster, "pods", "-n", namespace, "-l",
                    "app.kubernetes.io/instance=cached-pods,app.kubernetes.io/component=gateway")["items"]
        return any(c.get("reason") == "Unschedulable" for p in pods for c in p["status"].get("conditions", []))
    deadline = time.monotonic() + 60
    while not gateway_unschedulable():
        assert time.monotonic() < deadline, "the scheduler never marked the gateway pod"
        time.sleep(0.5)
    time.sleep(1.5)  # Ready has been False for longer than the check interval
    cache = primed_cache(kube, namespace, pods=True)
    assert {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in cache.pods(namespace, "cached-pods")} \
        >= {"gateway"}
    assert ("Pod" not in {kind for kind, _ in cache.children(namespace, "cached-pods")}), "pods are not children"
    kube.reads.clear()
    Reconciler(kube, cache=cache, pods_checked_after=1.0).reconcile(namespace, "cached-pods")
    assert not [k for k in kube.reads if k.endswith("/pods")], kube.reads
    status = kget(cluster, "omni", "cached-pods", "-n", namespace)["status"]
    assert status["gateway"]["reason"] == "Unschedulable", status["gateway"]
