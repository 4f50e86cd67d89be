"""Tier 1: what the operator asks kopf to watch."""

from __future__ import annotations

import asyncio

import kopf
import pytest
from kopf import Resource

from omni_operator.api.resource import GROUP, PLURAL, VERSION
from omni_operator.controller.cache import ObjectCache
from omni_operator.controller.watches import MANAGED, WATCHED_CHILDREN, NoDiffBase, register, watch_only_managed

pytestmark = pytest.mark.pure


def test_child_and_pod_watches_are_filtered_by_the_apiserver_and_omnideployments_are_not():
    settings = kopf.OperatorSettings()
    watch_only_managed(settings)
    selector = ",".join(f"{k}={v}" for k, v in MANAGED.items())
    watched = [Resource(group=group, version=version, plural=plural) for _, group, version, plural in WATCHED_CHILDREN]
    for resource in [*watched, Resource(group="", version="v1", plural="pods")]:
        assert settings.watching.label_selectors.collect(resource) == [selector], resource
    for resource in [Resource(group=GROUP, version=VERSION, plural=PLURAL),
                     Resource(group="metrics.k8s.io", version="v1beta1", plural="pods"),
                     Resource(group="", version="v1", plural="namespaces")]:
        assert settings.watching.label_selectors.collect(resource) == [], resource


def test_event_handlers_keep_no_diff_base():
    """Only change handlers read a diff; the event handlers' diff base neither copies the body nor
    recalls a previous state, so kopf has nothing to diff."""
    storage = NoDiffBase()
    body = kopf.Body({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s", "annotations": {
        "kopf.zalando.org/last-handled-configuration": '{"spec": {"replicas": 2}}'}}, "spec": {"replicas": 3}})
    assert storage.build(body=body) == {} and storage.fetch(body=body) is None
    assert kopf.AnnotationsDiffBaseStorage().fetch(body=body) == {"spec": {"replicas": 2}}  # what the default reads


def _omni_handler(enqueued: list, cache: ObjectCache):
    """The registered OmniDeployment event handler, as kopf would call it."""
    registry = kopf.OperatorRegistry()
    register(registry, lambda ns, name, first=False: enqueued.append((name, first)), lambda *a: None, cache)
    omni = Resource(group=GROUP, version=VERSION, plural=PLURAL)
    [handler] = [h for h in registry._watching.get_all_handlers() if h.selector.check(omni)]
    assert asyncio.iscoroutinefunction(handler.fn)  # run on kopf's loop, not handed to a thread

    def deliver(rv: str, generation: int, type_: str = "MODIFIED") -> None:
        body = {"metadata": {"name": "o", "namespace": "ns", "resourceVersion": rv, "generation": generation}}
        asyncio.run(handler.fn(event={"type": type_}, body=body, name="o", namespace="ns"))
    return deliver


def test_the_echo_of_the_operators_own_status_write_enqueues_nothing():
    enqueued: list = []
    cache = ObjectCache(("StatefulSet",))
    deliver = _omni_handler(enqueued, cache)
    deliver("10", 1, "ADDED")
    assert enqueued == [("o", True)]  # a new object: the first lane
    # A reconcile wrote status and the cache took the response: its echo brings nothing.
    cache.observe_omni({"metadata": {"name": "o", "namespace": "ns", "resourceVersion": "11", "generation": 1}})
    deliver("11", 1)
    assert enqueued == [("o", True)]
    deliver("12", 1)  # the autoscaler's status write (not taken by the cache)
    deliver("13", 2)  # a new spec
    deliver("13", 2, "DELETED")
    assert enqueued == [("o", True), ("o", False), ("o", True), ("o", False)]
