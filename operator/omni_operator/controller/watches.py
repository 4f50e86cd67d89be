"""kopf wiring: every watch event only enqueues the owning OmniDeployment.

The reconciler (omni_operator.controller.reconciler) does the work on its own worker
threads, so handlers stay trivial and events for one OmniDeployment coalesce.
The handlers are coroutines: they do no I/O (a cache update under a short lock,
an enqueue), so kopf runs them on its event loop instead of handing each watch
event to a thread and back. Event handlers write nothing to the watched objects
(no finalizers, no annotations): deleting an OmniDeployment never waits for the
operator.
"""

from __future__ import annotations

import logging

import kopf

from omni_operator.api.resource import GROUP, KIND, PLURAL, VERSION
from omni_operator.controller.cache import MANAGED_BY_LABEL, POD, Change, ObjectCache
from omni_operator.rendering.meta import MANAGER

log = logging.getLogger(__name__)

MANAGED = {MANAGED_BY_LABEL: MANAGER}


# The child kinds the reconciler reads from the cache: (kind, group, version, plural).
WATCHED_CHILDREN = (("StatefulSet", "apps", "v1", "statefulsets"), ("Deployment", "apps", "v1", "deployments"),
                    ("Service", "", "v1", "services"), ("PodDisruptionBudget", "policy", "v1", "poddisruptionbudgets"),
                    ("Job", "batch", "v1", "jobs"), ("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims"),
                    ("HorizontalPodAutoscaler", "autoscaling", "v2", "horizontalpodautoscalers"))
COALESCE_SECONDS = 0.5  # child events of one owner within this become one reconcile


def watch_only_managed(settings: kopf.OperatorSettings) -> None:
    """Have the apiserver filter the child and pod watches to the operator's own objects: a
    handler's `labels=` filters on the client, after every Service and pod of the cluster has
    been sent, decoded and remembered per object by kopf."""
    selector = ",".join(f"{k}={v}" for k, v in MANAGED.items())
    for _, group, version, plural in WATCHED_CHILDREN:
        settings.watching.label_selectors[group, version, plural] = selector
    settings.watching.label_selectors["", "v1", "pods"] = selector


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's diff base for event handlers alone, which take no diff: the default one deep-copies
    every body of every watch event and diffs it against the last handled state, which only
    change handlers (on.create/update) read. At a few hundred objects that was most of the
    operator's CPU during a burst."""

    def build(self, *, body, extra_fields=None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body, patch, essence) -> None:
        pass


def register(registry: kopf.OperatorRegistry, enqueue, enqueue_soon, cache: ObjectCache) -> None:
    """Attach the handlers to `registry`: `enqueue(namespace, name, first=)` schedules a reconcile
    now (`first`: ahead of the rest, for a new or changed spec),
    `enqueue_soon(namespace, name, seconds)` once after a short delay (bursts coalesce), and
    `cache` keeps what the watches deliver (the operator's pods too, when it watches them)."""

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        # Same credentials as the reconciler: in-cluster service account or KUBECONFIG.
        return kopf.login_via_client(**kwargs)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def omni_changed(event, body, name, namespace, **_):
        change = cache.observe_omni(dict(body), deleted=event.get("type") == "DELETED")
        # The echo of the operator's own status write brings nothing (the cache took the write's
        # response); the autoscaler's writes are not taken, so their copies do start a reconcile.
        # A new or changed spec goes ahead of follow-ups (status changes, child events, resyncs).
        if change is not Change.NONE:
            enqueue(namespace, name, first=change is Change.SPEC)

    def child_handler(kind: str):
        async def child_changed(event, body, namespace, **_):
            # The echo of the operator's own write (the cache took its response) brings nothing
            # to reconcile; nor does a child's deletion by a reconcile, which forgot it at once.
            if not cache.observe_child(kind, dict(body), deleted=event.get("type") == "DELETED"):
                return
            for ref in body.get("metadata", {}).get("ownerReferences", []):
                if ref.get("kind") == KIND and ref.get("controller"):
                    enqueue_soon(namespace, ref["name"], COALESCE_SECONDS)
        return child_changed

    for kind, group, version, plural in WATCHED_CHILDREN:
        kopf.on.event(group, version, plural, labels=MANAGED, registry=registry,
                      id=f"child-{plural}")(child_handler(kind))

    if cache.watches_pods:
        # Pods only feed the cache (their status reasons, the autoscaler's inputs): what a
        # reconcile needs of them it reads when it runs, so their events enqueue nothing.
        @kopf.on.event("", "v1", "pods", labels=MANAGED, registry=registry)
        async def pod_changed(event, body, **_):
            cache.observe_child(POD, dict(body), deleted=event.get("type") == "DELETED")
