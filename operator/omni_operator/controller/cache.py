"""What the watches delivered: every OmniDeployment, and the children and pods of each one by
owner, so a reconcile of an unchanged object, the periodic resync and the autoscaler's passes
cost no API calls.

Fed by the kopf event handlers (handlers.py) and by the responses of the operator's own
writes (write-through), primed once by one LIST per kind at start. An update never
replaces a newer copy: resourceVersions are compared when both are numbers (etcd
revisions, as every apiserver in practice hands out), so a late watch event cannot undo
a write-through. Readers get their own copies: the reconciler mutates what it reads.

Children are kept as compact JSON text, parsed on each read: seven children per
OmniDeployment held as Python dicts cost several times their JSON size, and a reconcile
reads one owner's children only.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import threading
from typing import Any, Iterable, Iterator

from omni_operator.kube import FIELD_MANAGER, api_version, holds_created_fields
from omni_operator.rendering.meta import MANAGER

log = logging.getLogger(__name__)

INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"

Key = tuple[str, str]
POD = "Pod"  # kept beside the children, by the same instance label, read apart from them


def _slim(body: dict[str, Any]) -> dict[str, Any]:
    """What the reconciler reads of an object: all but its field managers (as large as the
    spec itself). Only whether our create still owns fields is kept, as a one-entry list: the
    first apply to such a child takes them over first (Kube.own_created_fields)."""
    meta = body.get("metadata") or {}
    if "managedFields" not in meta:
        return body
    slim = {k: v for k, v in meta.items() if k != "managedFields"}
    if holds_created_fields(body):
        slim["managedFields"] = [{"manager": FIELD_MANAGER, "operation": "Update"}]
    return {**body, "metadata": slim}


def _newer_or_same(have_rv: str | None, new_rv: str) -> bool:
    """True unless the copy at `have_rv` is known to be newer than one at `new_rv`."""
    if have_rv is None:
        return True
    if have_rv.isdigit() and new_rv.isdigit():
        return int(new_rv) >= int(have_rv)
    return True


def _rv(body: dict[str, Any]) -> str:
    return body["metadata"].get("resourceVersion", "")


class Change(enum.Enum):
    """What a watched copy of an OmniDeployment brings."""

    NONE = "none"  # a copy already held (the echo of the operator's own status write) or an older one
    OTHER = "other"  # the same spec: a status or metadata change, or the object's deletion
    SPEC = "spec"  # a new object or a new generation


class ObjectCache:
    """`child_kinds`: the watched kinds of children. `pods`: the operator's pods are watched too
    (the reconciler's pod checks and the autoscaler read them here)."""

    def __init__(self, child_kinds: tuple[str, ...], pods: bool = False):
        self.child_kinds = child_kinds
        self.watches_pods = pods
        self._lock = threading.Lock()
        self._omni: dict[Key, dict[str, Any]] = {}
        # (ns, instance) -> (kind, name) -> (resourceVersion, the body as compact JSON)
        self._children: dict[Key, dict[Key, tuple[str, str]]] = {}
        self.primed = threading.Event()

    # -- feeding ---------------------------------------------------------------------
    def observe_omni(self, body: dict[str, Any], deleted: bool = False) -> Change:
        """Keep the newer copy, and say what it brings."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            had = self._omni.get(key)
            if deleted:
                self._omni.pop(key, None)
                return Change.OTHER
            held_rv = _rv(had) if had is not None else None
            if held_rv == _rv(body) or not _newer_or_same(held_rv, _rv(body)):
                return Change.NONE
            self._omni[key] = _slim(body)
            new_spec = had is None or had["metadata"].get("generation") != meta.get("generation")
            return Change.SPEC if new_spec else Change.OTHER

    def observe_child(self, kind: str, body: dict[str, Any], deleted: bool = False) -> bool:
        """A child kind's object (or a pod, kind POD), kept only when it is labelled as managed
        by this operator (the label selector the children are read by). True when it changes
        what the cache holds; False for a copy already held, such as the watch's echo of the
        operator's own write, whose response the cache took already."""
        meta = body["metadata"]
        labels = meta.get("labels") or {}
        instance = labels.get(INSTANCE_LABEL)
        if instance is None or labels.get(MANAGED_BY_LABEL) != MANAGER:
            return False
        owner = (meta["namespace"], instance)
        key = (kind, meta["name"])
        rv = _rv(body)
        with self._lock:
            held = (self._children.get(owner) or {}).get(key)
        if not deleted and held is not None and (held[0] == rv or not _newer_or_same(held[0], rv)):
            return False
        text = None if deleted else json.dumps(_slim(body), separators=(",", ":"))
        with self._lock:
            children = self._children.setdefault(owner, {})
            if deleted:
                had = children.pop(key, None) is not None
                if not children:
                    self._children.pop(owner, None)
                return had
            if _newer_or_same(children[key][0] if key in children else None, rv):
                children[key] = (rv, text)
                return True
            return False

    def prime(self, omnis: Iterable[dict[str, Any]], children: dict[str, Iterable[dict[str, Any]]]) -> None:
        """Seed from one LIST of each kind, taking each item as it comes (the iterables may read
        page after page); from then on the cache answers reads."""
        for body in omnis:
            self.observe_omni(body)
        for kind, items in children.items():
            for body in items:
                self.observe_child(kind, body)
        self.primed.set()

    def answers_pods(self) -> bool:
        return self.watches_pods and self.primed.is_set()

    # -- reading ---------------------------------------------------------------------
    def omni(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            body = self._omni.get((namespace, name))
        return copy.deepcopy(body) if body is not None else None

    def items(self) -> list[dict[str, Any]]:
        """Every OmniDeployment (the latest seen); not copied: callers only read."""
        with self._lock:
            return list(self._omni.values())

    def children(self, namespace: str, instance: str) -> dict[Key, dict[str, Any]]:
        return {key: json.loads(text) for key, text in self._owned(namespace, instance, pods=False)}

    def pods(self, namespace: str, instance: str) -> list[dict[str, Any]]:
        """One OmniDeployment's pods (its workloads' and its loaders'), as a LIST by its
        instance label would return them."""
        return [json.loads(text) for _, text in self._owned(namespace, instance, pods=True)]

    def _owned(self, namespace: str, instance: str, pods: bool) -> list[tuple[Key, str]]:
        """(key, JSON text) of one owner's pods, or of its other children."""
        with self._lock:
            owned = self._children.get((namespace, instance)) or {}
            return [(key, text) for key, (_, text) in owned.items() if (key[0] == POD) == pods]


def prime_from_api(cache: ObjectCache, kube, kind: str, namespaces: list[str], selector: str) -> None:
    """One LIST of the OmniDeployments and of each child kind (per watched namespace, or
    cluster-wide), read in pages, each taken into the cache before the next is read (the cache
    keeps compact text; whole lists of a large cluster would be held at once as objects). Then
    the cache answers reads."""
    scopes = namespaces or [None]

    def listed(of: str, label_selector: str | None = None) -> Iterator[dict[str, Any]]:
        for ns in scopes:
            for page in kube.list_pages(of, ns, label_selector):
                for obj in page:  # list items carry no kind of their own
                    obj.setdefault("kind", of)
                    obj.setdefault("apiVersion", api_version(of))
                    yield obj

    cache.prime(listed(kind), {child: listed(child, selector)
                               for child in cache.child_kinds + ((POD,) if cache.watches_pods else ())})
