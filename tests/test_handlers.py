"""Tier 1: what the operator asks kopf to watch."""

from __future__ import annotations

import kopf
from kopf import Resource

from omni_operator.api import GROUP, PLURAL, VERSION
from omni_operator.handlers import MANAGED, WATCHED_CHILDREN, NoDiffBase, watch_only_managed


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
