"""kopf wiring: every watch event only enqueues the owning OmniDeployment.

The reconciler (omni_operator.reconcile) does the work on its own worker
threads, so handlers stay trivial and events for one OmniDeployment coalesce.
Event handlers write nothing to the watched objects (no finalizers, no
annotations): deleting an OmniDeployment never waits for the operator.
"""

from __future__ import annotations

import logging
import threading

import kopf

from .api import GROUP, KIND, PLURAL, VERSION
from .render import MANAGER

log = logging.getLogger(__name__)

MANAGED = {"app.kubernetes.io/managed-by": MANAGER}


class ResourceIndex:
    """The latest OmniDeployments seen on the watch, so periodic loops need no LIST calls."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], dict] = {}

    def observe(self, body: dict, deleted: bool) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            if deleted:
                self._items.pop(key, None)
            else:
                self._items[key] = body

    def items(self) -> list[dict]:
        with self._lock:
            return list(self._items.values())


def register(registry: kopf.OperatorRegistry, enqueue, index: ResourceIndex | None = None) -> None:
    """Attach the handlers to `registry`; `enqueue(namespace, name)` schedules a reconcile,
    and `index` (if given) keeps the latest version of every OmniDeployment."""

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        # Same credentials as the reconciler: in-cluster service account or KUBECONFIG.
        return kopf.login_via_client(**kwargs)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def omni_changed(event, body, name, namespace, **_):
        if index is not None:
            index.observe(dict(body), deleted=event.get("type") == "DELETED")
        enqueue(namespace, name)

    def child_changed(event, body, namespace, **_):
        for ref in body.get("metadata", {}).get("ownerReferences", []):
            if ref.get("kind") == KIND and ref.get("controller"):
                enqueue(namespace, ref["name"])

    for group, version, plural in (("apps", "v1", "statefulsets"), ("apps", "v1", "deployments"),
                                   ("", "v1", "services"), ("policy", "v1", "poddisruptionbudgets"),
                                   ("batch", "v1", "jobs"), ("", "v1", "persistentvolumeclaims")):
        kopf.on.event(group, version, plural, labels=MANAGED, registry=registry,
                      id=f"child-{plural}")(child_changed)
