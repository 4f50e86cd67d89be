"""Tier 3: the reconciler's reads and writes against a real kube-apiserver, with no
operator process beside it, so every request counted is the reconciler's own."""

from __future__ import annotations

import pytest
from kubernetes import config as kube_config

from e2e.operator_process import install_crd
from omni_operator.cache import ObjectCache, prime_from_api
from omni_operator.handlers import MANAGED, WATCHED_CHILDREN
from omni_operator.kube import Kube
from omni_operator.reconcile import Reconciler
from omni_operator.render import MANAGER

from .test_operator_cluster import apply, kget, omni

pytestmark = pytest.mark.cluster


@pytest.fixture
def kube(cluster) -> Kube:
    install_crd(cluster)
    return Kube(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))


def primed_cache(kube: Kube, namespace: str) -> ObjectCache:
    cache = ObjectCache(tuple(kind for kind, *_ in WATCHED_CHILDREN))
    prime_from_api(cache, kube, "OmniDeployment", [namespace], ",".join(f"{k}={v}" for k, v in MANAGED.items()))
    return cache


def owned_children(cluster, namespace: str, name: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={MANAGER}"
    items = kget(cluster, "statefulsets,deployments,services,poddisruptionbudgets,jobs,persistentvolumeclaims",
                 "-n", namespace, "-l", selector)["items"]
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in items)


def test_a_new_object_reads_only_the_children_it_is_about_to_create(cluster, namespace, kube):
    apply(cluster, omni("fresh", namespace))
    reconciler = Reconciler(kube, cache=primed_cache(kube, namespace))
    kube.reads.clear()
    outcome = reconciler.reconcile(namespace, "fresh")
    assert outcome.error is None and "Service/fresh-gateway" in outcome.applied
    # One lookup per child it creates (whose name may be someone else's), nothing else.
    assert sum(kube.reads.values()) == len(outcome.applied), (kube.reads, outcome.applied)
    assert set(outcome.applied) <= set(owned_children(cluster, namespace, "fresh"))


def test_a_name_taken_between_the_lookup_and_the_create_is_never_taken_over(cluster, namespace, kube):
    """Someone else's Service appears between the lookup and the create: the create, applied
    without force, conflicts on the selector, writes nothing, and what this reconcile had
    already created is removed. The window is a few milliseconds, too short to hit for real, so the lookup is made to miss
    the Service (the one stand-in in this test); everything else is the real apiserver."""
    apply(cluster, omni("late", namespace))
    cache = primed_cache(kube, namespace)
    ours = next(o for o in _plan_objects(kube, namespace, "late") if o["metadata"]["name"] == "late-gateway"
                and o["kind"] == "Service")
    theirs = {"apiVersion": "v1", "kind": "Service",
              "metadata": {"name": "late-gateway", "namespace": namespace, "labels": {"team": "theirs"}},
              "spec": {"selector": {"app": "theirs"},
                       "ports": [dict(ours["spec"]["ports"][0])]}}
    kube.request("POST", f"/api/v1/namespaces/{namespace}/services", body=theirs, query={"fieldManager": "kubectl"})
    before = kget(cluster, "service", "late-gateway", "-n", namespace)

    original_get = kube.get
    kube.get = lambda kind, ns, name: None if (kind, name) == ("Service", "late-gateway") else original_get(kind, ns, name)
    applied = []
    original_apply = kube.apply
    kube.apply = lambda obj, **kw: (applied.append(f"{obj['kind']}/{obj['metadata']['name']}"),
                                    original_apply(obj, **kw))[1]
    outcome = Reconciler(kube, cache=cache).reconcile(namespace, "late")

    assert f"Service {namespace}/late-gateway already exists and is not owned" in (outcome.error or "")
    assert applied.index("Service/late-gateway") > 0, "other children were created before the clash"
    after = kget(cluster, "service", "late-gateway", "-n", namespace)
    assert "ownerReferences" not in after["metadata"]
    assert after["metadata"]["labels"] == {"team": "theirs"}
    assert (after["spec"]["ports"], after["spec"]["selector"]) == (before["spec"]["ports"], before["spec"]["selector"])
    assert owned_children(cluster, namespace, "late") == [], "nothing half-applied"


def _plan_objects(kube: Kube, namespace: str, name: str) -> list[dict]:
    from omni_operator.plan import make_plan

    resource = kube.get("OmniDeployment", namespace, name)
    return make_plan(name, namespace, resource["metadata"]["uid"], resource["spec"], None).objects
