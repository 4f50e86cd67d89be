"""Tier 1: what the operator asks kopf to watch."""

from __future__ import annotations

import kopf
from kopf import Resource

from omni_operator.api import GROUP, PLURAL, VERSION
from omni_operator.handlers import MANAGED, WATCHED_CHILDREN, watch_only_managed


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
