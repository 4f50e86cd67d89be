"""kopf wiring: every watch event only enqueues the owning OmniDeployment.

The reconciler (omni_operator.reconcile) does the work on its own worker
threads, so handlers stay trivial and events for one OmniDeployment coalesce.
Event handlers write nothing to the watched objects (no finalizers, no
annotations): deleting an OmniDeployment never waits for the operator.
"""

from __future__ import annotations

import logging

import kopf

from .api import GROUP, KIND, PLURAL, VERSION
from .render import MANAGER

log = logging.getLogger(__name__)

MANAGED = {"app.kubernetes.io/managed-by": MANAGER}


def register(registry: kopf.OperatorRegistry, enqueue) -> None:
    """Attach the handlers to `registry`; `enqueue(namespace, name)` schedules a reconcile."""

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        # Same credentials as the reconciler: in-cluster service account or KUBECONFIG.
        return kopf.login_via_client(**kwargs)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def omni_changed(event, name, namespace, **_):
        enqueue(namespace, name)

    def child_changed(event, body, namespace, **_):
        for ref in body.get("metadata", {}).get("ownerReferences", []):
            if ref.get("kind") == KIND and ref.get("controller"):
                enqueue(namespace, ref["name"])

    for group, version, plural in (("apps", "v1", "statefulsets"), ("apps", "v1", "deployments"),
                                   ("", "v1", "services"), ("policy", "v1", "poddisruptionbudgets")):
        kopf.on.event(group, version, plural, labels=MANAGED, registry=registry,
                      id=f"child-{plural}")(child_changed)
