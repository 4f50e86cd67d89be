"""Tier 3: the reconciler's reads and writes against a real kube-apiserver, with no
operator process beside it, so every request counted is the reconciler's own."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import config as kube_config

from e2e.operator_process import install_crd
from omni_operator.controller.cache import ObjectCache
from omni_operator.controller.reconciler import COSTLY_POD_KINDS, POD_STARTING_KINDS, Reconciler
from omni_operator.controller.watches import WATCHED_CHILDREN
from omni_operator.kube import Kube
from omni_operator.rendering.meta import MANAGER

from .helpers import watch_cache
from .test_operator_cluster import apply, condition, kget, omni

pytestmark = pytest.mark.cluster


@pytest.fixture
def kube(cluster) -> Kube:
    install_crd(cluster)
    return Kube(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))


def owned_children(cluster, namespace: str, name: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={MANAGER}"
    items = kget(cluster, "statefulsets,deployments,services,poddisruptionbudgets,jobs,persistentvolumeclaims",
                 "-n", namespace, "-l", selector)["items"]
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in items)


def _count(kube: Kube, method: str, *, dry_run: bool) -> int:
    """Requests of one method to children, dry runs or not (Events are not children)."""
    return sum(n for k, n in kube.writes.items()
               if k.startswith(method) and k.endswith("dryRun") == dry_run and not k.endswith("/events"))


def _on_a_user_volume(resource: dict) -> dict:
    """Weights on the user's volume: the thinker and talker are planned at once (no loader first)."""
    resource["spec"]["model"] = {"pvc": {"claimName": "weights"}}
    return resource


def test_a_new_object_reads_nothing_before_creating_its_children(cluster, namespace, kube):
    apply(cluster, _on_a_user_volume(omni("fresh", namespace)))
    reconciler = Reconciler(kube, watch_cache(kube, namespace))
    kube.reads.clear()
    kube.writes.clear()
    outcome = reconciler.reconcile(namespace, "fresh")
    assert outcome.error is None and "Service/fresh-gateway" in outcome.applied
    # Whether a name is free is its create's answer, not a read of each child.
    assert sum(kube.reads.values()) == 0, kube.reads
    assert _count(kube, "POST", dry_run=False) == len(outcome.applied), kube.writes
    assert not [k for k in kube.writes if k.startswith("PATCH") and not k.endswith("/status")], kube.writes
    # Only the creates of costly pods (loader, GPU workloads) after the first are checked first.
    costly = [a for a in outcome.applied if a.split("/")[0] in COSTLY_POD_KINDS]
    assert len(costly) > 1 and _count(kube, "POST", dry_run=True) == len(costly) - 1, kube.writes
    assert set(outcome.applied) <= set(owned_children(cluster, namespace, "fresh"))
    # Creates come first, those that start pods last, and of those the gateway's cheap ones first.
    kinds = [a.split("/")[0] for a in outcome.applied]
    assert kinds.index("PodDisruptionBudget") < kinds.index("Deployment") < kinds.index("StatefulSet")
    assert [k for k in kinds if k in POD_STARTING_KINDS][1:] == [k for k in kinds if k in COSTLY_POD_KINDS]


def _versions(cluster, namespace: str, name: str) -> dict[str, tuple]:
    """Each owned child's generation and labels (controllers write status, so not its resourceVersion)."""
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={MANAGER}"
    items = kget(cluster, "statefulsets,deployments,services,poddisruptionbudgets,jobs,persistentvolumeclaims",
                 "-n", namespace, "-l", selector)["items"]
    return {f"{o['kind']}/{o['metadata']['name']}": (o["metadata"].get("generation"), o["metadata"]["labels"])
            for o in items}


def test_a_child_a_previous_leader_wrote_that_the_watch_has_not_shown_is_read_not_rewritten(cluster, namespace,
                                                                                               kube):
    """The cache is primed before another reconciler (a previous leader) writes the children, so
    they are not in it: each one's create finds the name taken, the read shows it is ours and as
    planned, and nothing is written again."""
    apply(cluster, omni("handover", namespace))
    stale = watch_cache(kube, namespace)
    first = Reconciler(kube, watch_cache(kube, namespace)).reconcile(namespace, "handover")
    assert first.error is None and first.applied
    before = _versions(cluster, namespace, "handover")
    kube.reads.clear()
    kube.writes.clear()
    outcome = Reconciler(kube, stale).reconcile(namespace, "handover")
    assert (outcome.error, outcome.applied, outcome.pruned) == (None, [], [])
    assert not [k for k in kube.writes if not k.startswith("POST") and not k.endswith("/status")], kube.writes
    assert _versions(cluster, namespace, "handover") == before, "no child was written"
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


def test_someone_elses_object_of_a_childs_name_stops_the_plan_and_nothing_is_kept(cluster, namespace, kube):
    """The gateway's Service comes after four other Services in the plan: they are created, the
    gateway's create finds its name taken, and they are deleted again."""
    apply(cluster, omni("taken", namespace))
    cache = watch_cache(kube, namespace)
    before = _their_service(kube, cluster, namespace, "taken")
    kube.reads.clear()
    kube.writes.clear()
    outcome = Reconciler(kube, cache).reconcile(namespace, "taken")

    assert f"Service {namespace}/taken-gateway already exists and is not owned" in (outcome.error or "")
    assert outcome.applied == [], outcome.applied
    assert _count(kube, "DELETE", dry_run=False) == 4, kube.writes
    assert not [k for k in kube.writes if k.startswith("PATCH") and not k.endswith("/status")], kube.writes
    assert sum(kube.reads.values()) == 1, kube.reads  # the one child that exists, read to see whose it is
    _untouched(cluster, namespace, before)
    assert owned_children(cluster, namespace, "taken") == [], "nothing half-applied"


def test_someone_elses_workload_of_a_childs_name_is_found_before_any_write(cluster, namespace, kube):
    """A create of costly pods after the first is checked by a dry-run create before anything is
    written: a StatefulSet of someone else under the talker's name stops the plan unwritten."""
    apply(cluster, _on_a_user_volume(omni("held", namespace)))
    theirs = {"apiVersion": "apps/v1", "kind": "StatefulSet",
              "metadata": {"name": "held-talker", "namespace": namespace, "labels": {"team": "theirs"}},
              "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "theirs"}},
                       "template": {"metadata": {"labels": {"app": "theirs"}},
                                    "spec": {"containers": [{"name": "c", "image": "example.com/theirs:1"}]}}}}
    kube.request("POST", f"/apis/apps/v1/namespaces/{namespace}/statefulsets", body=theirs,
                 query={"fieldManager": "kubectl"})
    kube.writes.clear()
    outcome = Reconciler(kube, watch_cache(kube, namespace)).reconcile(namespace, "held")

    assert f"StatefulSet {namespace}/held-talker already exists and is not owned" in (outcome.error or "")
    assert _count(kube, "POST", dry_run=False) == 0 and _count(kube, "DELETE", dry_run=False) == 0, kube.writes
    after = kget(cluster, "statefulset", "held-talker", "-n", namespace)
    assert after["metadata"]["labels"] == {"team": "theirs"} and "ownerReferences" not in after["metadata"]
    assert owned_children(cluster, namespace, "held") == []


def test_the_first_pod_starting_child_refused_at_its_create_leaves_nothing(cluster, namespace, kube):
    """The thinker's StatefulSet is the first child of costly pods (weights on the user's volume,
    so no loader Job): it is not dry-run, and its own create is refused after the Services, the
    PodDisruptionBudgets and the gateway's Deployment were created. They are deleted again."""
    resource = _on_a_user_volume(omni("first", namespace))
    resource["spec"]["thinker"]["resources"] = {"requests": {"example.com/nic": 1}, "limits": {"example.com/nic": 2}}
    apply(cluster, resource)
    kube.writes.clear()
    reconciler = Reconciler(kube, watch_cache(kube, namespace))
    outcome = reconciler.reconcile(namespace, "first")

    assert outcome.applied == [] and owned_children(cluster, namespace, "first") == [], "nothing half-applied"
    assert _count(kube, "DELETE", dry_run=False) == _count(kube, "POST", dry_run=False) - 1 > 0, kube.writes
    assert f"DELETE /apis/apps/v1/namespaces/{namespace}/deployments/first-gateway" in kube.writes, kube.writes
    message = condition(kget(cluster, "omni", "first", "-n", namespace), "Degraded")["message"]
    assert message.startswith("the apiserver refused StatefulSet first-thinker, so nothing was applied: "), message

    # The refusal stays: the next try of the same spec checks every child first and writes nothing
    # (no create and delete of children each time their events bring the object back).
    kube.writes.clear()
    again = reconciler.reconcile(namespace, "first")
    assert again.error is not None and again.error.startswith("the apiserver refused StatefulSet first-thinker")
    assert _count(kube, "POST", dry_run=False) == 0 and _count(kube, "DELETE", dry_run=False) == 0, kube.writes
    assert _count(kube, "POST", dry_run=True) > 0, kube.writes


def test_a_child_the_apiserver_refuses_stops_the_plan_before_its_first_write(cluster, namespace, kube):
    """The schema takes an extended resource's request up to its limit; Pod validation wants the
    two equal. The talker comes last in the plan: without the dry run, the Services, the
    PodDisruptionBudgets, the gateway and the thinker would be written before its refusal."""
    resource = _on_a_user_volume(omni("refused", namespace))
    resource["spec"]["talker"]["resources"] = {"requests": {"example.com/nic": 1}, "limits": {"example.com/nic": 2}}
    apply(cluster, resource)  # admitted: 1 <= 2
    reconciler = Reconciler(kube, watch_cache(kube, namespace))
    outcome = reconciler.reconcile(namespace, "refused")

    assert outcome.applied == [] and owned_children(cluster, namespace, "refused") == [], "nothing half-applied"
    assert not [k for k in kube.writes if k.startswith("PATCH") and not k.endswith(("dryRun", "/status"))], kube.writes
    assert _count(kube, "POST", dry_run=False) == 0, kube.writes
    degraded = condition(kget(cluster, "omni", "refused", "-n", namespace), "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyFailed")
    message = degraded["message"]
    assert message.startswith("the apiserver refused StatefulSet refused-talker, so nothing was applied: "), message
    assert ('spec.template.spec.containers[0].resources.requests: Invalid value: "1": '
            "must be equal to example.com/nic limit of 2") in message, message

    # Fixed: the costly creates after the first are checked, then all are created; Degraded clears.
    resource["spec"]["talker"]["resources"]["requests"]["example.com/nic"] = 2
    apply(cluster, resource)
    watch_cache(kube, namespace, reconciler.cache)  # the watch delivers the new spec
    kube.writes.clear()
    outcome = reconciler.reconcile(namespace, "refused")
    assert outcome.error is None and len(outcome.applied) > 1
    costly = [a for a in outcome.applied if a.split("/")[0] in COSTLY_POD_KINDS]
    assert _count(kube, "POST", dry_run=True) == len(costly) - 1, kube.writes
    assert set(outcome.applied) == set(owned_children(cluster, namespace, "refused"))
    assert condition(kget(cluster, "omni", "refused", "-n", namespace), "Degraded")["status"] == "False"

    # A field the plan stops rendering goes, also from a child that was created, not applied:
    # its first change moves the create's fields to the operator's apply first.
    del resource["spec"]["talker"]["resources"]
    apply(cluster, resource)
    watch_cache(kube, namespace, reconciler.cache)
    outcome = reconciler.reconcile(namespace, "refused")
    assert (outcome.error, outcome.applied) == (None, ["StatefulSet/refused-talker"])
    talker = kget(cluster, "statefulset", "refused-talker", "-n", namespace, "--show-managed-fields")
    container = talker["spec"]["template"]["spec"]["containers"][0]
    assert "example.com/nic" not in json.dumps(container.get("resources")), container.get("resources")
    assert [(m["operation"], m.get("subresource")) for m in talker["metadata"]["managedFields"]
            if m["manager"] == MANAGER] == [("Apply", None)]

    # A change of one child is one write, without a dry run.
    resource["spec"]["talker"]["resources"] = {"requests": {"example.com/nic": 3}, "limits": {"example.com/nic": 3}}
    apply(cluster, resource)
    watch_cache(kube, namespace, reconciler.cache)  # the watch delivers the new spec
    kube.writes.clear()
    outcome = reconciler.reconcile(namespace, "refused")
    assert (outcome.error, outcome.applied) == (None, ["StatefulSet/refused-talker"])
    assert [k for k in kube.writes if not k.endswith(("/status", "/events"))] == [
        f"PATCH /apis/apps/v1/namespaces/{namespace}/statefulsets/refused-talker"], kube.writes


def test_replicas_an_autoscaler_decides_never_go_to_the_operators_apply(cluster, namespace, kube):
    """In HPA mode the plan renders no replicas. Created with POST, the StatefulSet's defaulted
    replicas are in the create's field-manager entry; the first change moves the create's fields
    to the operator's apply, which leaves the replicas out and so releases them."""
    resource = omni("scaled", namespace)
    resource["spec"]["model"] = {"pvc": {"claimName": "weights"}}
    resource["spec"]["autoscaling"] = {"mode": "HPA"}
    apply(cluster, resource)
    reconciler = Reconciler(kube, watch_cache(kube, namespace))
    assert reconciler.reconcile(namespace, "scaled").error is None
    resource["spec"]["thinker"]["imagePullPolicy"] = "Always"
    apply(cluster, resource)
    watch_cache(kube, namespace, reconciler.cache)  # the watch delivers the new spec
    outcome = reconciler.reconcile(namespace, "scaled")
    assert outcome.error is None and "StatefulSet/scaled-thinker" in outcome.applied, outcome
    sts = kget(cluster, "statefulset", "scaled-thinker", "-n", namespace, "--show-managed-fields")
    ours = [m for m in sts["metadata"]["managedFields"] if m["manager"] == MANAGER and not m.get("subresource")]
    assert [m["operation"] for m in ours] == ["Apply"], ours
    assert "f:replicas" not in ours[0]["fieldsV1"]["f:spec"], "the operator's apply owns the HPA's replicas"
    assert "f:imagePullPolicy" in json.dumps(ours[0]["fieldsV1"]), "the create's fields were moved"


def _plan_objects(kube: Kube, namespace: str, name: str) -> list[dict]:
    from omni_operator.rendering.plan import make_plan

    resource = kube.get("OmniDeployment", namespace, name)
    return make_plan(name, namespace, resource["metadata"]["uid"], resource["spec"], None).objects


class PodReadsCounted(ObjectCache):
    """The watch cache, counting the reconciler's reads of an object's pods."""

    def __init__(self) -> None:
        super().__init__(tuple(kind for kind, *_ in WATCHED_CHILDREN), pods=True)
        self.pod_reads = 0

    def pods(self, namespace: str, instance: str) -> list[dict]:
        self.pod_reads += 1
        return super().pods(namespace, instance)


def test_a_not_ready_objects_pods_are_read_at_most_once_per_check_interval(cluster, namespace, kube):
    """Its reconciles come often (child events, resyncs); its pods are read for the status'
    reasons once per `pods_checked_after`, and the reasons found are kept in between."""
    resource = omni("slow", namespace)
    resource["spec"]["gateway"]["nodePool"] = {"nodeSelector": {"omni.qwen.ai/pool": "none-such"}}
    resource["spec"]["model"] = {"pvc": {"claimName": "weights-of-their-own"}}  # no loader whose pods are read
    apply(cluster, resource)
    cache = watch_cache(kube, namespace, PodReadsCounted())
    reconciler = Reconciler(kube, cache, pods_checked_after=2.0)
    assert reconciler.reconcile(namespace, "slow").error is None  # children written, Ready=False
    time.sleep(2.5)
    watch_cache(kube, namespace, cache)  # the watch holds the pods the scheduler marked meanwhile
    before = cache.pod_reads

    def pod_lists() -> int:
        return cache.pod_reads - before

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
    watch_cache(kube, namespace, cache)
    changed = reconciler.reconcile(namespace, "slow")
    assert pod_lists() == 4 and changed.requeue_after <= 2.0


def test_a_cache_that_watches_pods_answers_the_pod_checks(cluster, namespace, kube):
    """The operator watches its pods: a not-ready object's reasons come from the cache, with no
    pod LIST (at a thousand stuck objects those lists were most of the operator's reads)."""
    resource = omni("cached-pods", namespace)
    resource["spec"]["gateway"]["nodePool"] = {"nodeSelector": {"omni.qwen.ai/pool": "none-such"}}
    resource["spec"]["model"] = {"pvc": {"claimName": "weights-of-their-own"}}
    apply(cluster, resource)
    assert Reconciler(kube, watch_cache(kube, namespace)).reconcile(namespace, "cached-pods").error is None

    def gateway_unschedulable() -> bool:
        pods = kget(cluster, "pods", "-n", namespace, "-l",
                    "app.kubernetes.io/instance=cached-pods,app.kubernetes.io/component=gateway")["items"]
        return any(c.get("reason") == "Unschedulable" for p in pods for c in p["status"].get("conditions", []))
    deadline = time.monotonic() + 60
    while not gateway_unschedulable():
        assert time.monotonic() < deadline, "the scheduler never marked the gateway pod"
        time.sleep(0.5)
    time.sleep(1.5)  # Ready has been False for longer than the check interval
    cache = watch_cache(kube, namespace)
    assert {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in cache.pods(namespace, "cached-pods")} \
        >= {"gateway"}
    assert ("Pod" not in {kind for kind, _ in cache.children(namespace, "cached-pods")}), "pods are not children"
    kube.reads.clear()
    Reconciler(kube, cache, pods_checked_after=1.0).reconcile(namespace, "cached-pods")
    assert not [k for k in kube.reads if k.endswith("/pods")], kube.reads
    status = kget(cluster, "omni", "cached-pods", "-n", namespace)["status"]
    assert status["gateway"]["reason"] == "Unschedulable", status["gateway"]


def test_the_lists_that_prime_the_cache_are_read_in_pages(cluster, namespace, kube):
    for i in range(3):
        kube.create({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": f"page-{i}", "namespace": namespace, "labels": {"page": "yes"}},
                     "spec": {"ports": [{"port": 80}]}})
    kube.reads.clear()
    pages = list(kube.list_pages("Service", namespace, "page=yes", limit=2))
    assert [sorted(s["metadata"]["name"] for s in page) for page in pages] == [["page-0", "page-1"], ["page-2"]]
    assert sum(kube.reads.values()) == 2, kube.reads
