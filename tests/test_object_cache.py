"""Tier 1: the watch cache the reconciler reads from."""

from __future__ import annotations

import pytest

from omni_operator.controller.cache import Change, ObjectCache

pytestmark = pytest.mark.pure

MANAGED = {"app.kubernetes.io/managed-by": "omni-operator"}


def sts(name: str, rv: str, replicas: int = 1, labels: dict | None = None) -> dict:
    return {"kind": "StatefulSet", "metadata": {
        "name": name, "namespace": "ns", "resourceVersion": rv,
        "labels": labels if labels is not None else {"app.kubernetes.io/instance": "omni", **MANAGED}},
        "spec": {"replicas": replicas}}


def test_a_late_watch_event_never_replaces_a_newer_copy():
    cache = ObjectCache(("StatefulSet",))
    assert cache.observe_child("StatefulSet", sts("omni-thinker", "120", replicas=2))  # our write
    assert not cache.observe_child("StatefulSet", sts("omni-thinker", "95", replicas=1))  # older event
    assert cache.children("ns", "omni")[("StatefulSet", "omni-thinker")]["spec"]["replicas"] == 2
    assert cache.observe_child("StatefulSet", sts("omni-thinker", "121"), deleted=True)
    assert cache.children("ns", "omni") == {}


def test_a_child_copy_says_whether_it_brings_anything_to_reconcile():
    """The watch's echo of the operator's own write, and the deletion of a child the operator
    deleted (and forgot) itself, enqueue no reconcile; a controller's change or someone else's
    delete does."""
    cache = ObjectCache(("StatefulSet",))
    assert cache.observe_child("StatefulSet", sts("omni-thinker", "10"))  # the write's response
    assert not cache.observe_child("StatefulSet", sts("omni-thinker", "10"))  # its watch echo
    assert cache.observe_child("StatefulSet", sts("omni-thinker", "11", replicas=2))  # a controller's change
    assert cache.observe_child("StatefulSet", sts("omni-thinker", "12"), deleted=True)  # someone deleted it
    assert not cache.observe_child("StatefulSet", sts("omni-thinker", "12"), deleted=True)  # already forgotten
    assert not cache.observe_child("StatefulSet", sts("db", "13", labels={}))  # not ours


def test_readers_get_copies():
    cache = ObjectCache(("StatefulSet",))
    cache.prime([], {"StatefulSet": [sts("omni-thinker", "1")]})
    assert cache.primed.is_set()
    mine = cache.children("ns", "omni")
    mine[("StatefulSet", "omni-thinker")]["spec"]["replicas"] = 99
    assert cache.children("ns", "omni")[("StatefulSet", "omni-thinker")]["spec"]["replicas"] == 1


def test_only_our_children_are_kept():
    cache = ObjectCache(("StatefulSet",))
    helm = sts("web", "7", labels={"app.kubernetes.io/instance": "omni", "app.kubernetes.io/managed-by": "Helm"})
    cache.prime([], {"StatefulSet": [sts("omni-thinker", "1"), sts("db", "3", labels={}), helm]})
    # Another tool's object that happens to carry the same instance label is not a child.
    assert list(cache.children("ns", "omni")) == [("StatefulSet", "omni-thinker")]


def test_an_omni_copy_says_what_it_brings():
    """A new object or a new generation goes to the work queue's first lane; a status change to
    the other; the echo of a status write whose response the cache took, or a late copy, to none."""
    def omni(rv: str, generation: int) -> dict:
        return {"metadata": {"name": "o", "namespace": "ns", "resourceVersion": rv, "generation": generation}}
    cache = ObjectCache(("StatefulSet",))
    assert cache.observe_omni(omni("10", 1)) is Change.SPEC
    assert cache.observe_omni(omni("11", 1)) is Change.OTHER  # someone's status write (the autoscaler's)
    assert cache.observe_omni(omni("11", 1)) is Change.NONE  # its echo, once the write's response was taken
    assert cache.observe_omni(omni("12", 2)) is Change.SPEC
    assert cache.observe_omni(omni("9", 3)) is Change.NONE  # older than what is held
    assert cache.omni("ns", "o")["metadata"]["resourceVersion"] == "12"
    assert cache.observe_omni(omni("13", 2), deleted=True) is Change.OTHER  # its reconcile forgets it
    assert cache.omni("ns", "o") is None


def test_a_child_keeps_only_whether_our_create_still_owns_fields():
    """Field managers are dropped (as large as the spec), except the one fact the reconciler
    needs: a child created, not yet applied, must have its create's fields taken over first."""
    def entry(manager: str, operation: str, subresource: str | None = None) -> dict:
        return {"manager": manager, "operation": operation, "fieldsV1": {"f:spec": {"f:replicas": {}}},
                **({"subresource": subresource} if subresource else {})}
    cache = ObjectCache(("StatefulSet",))
    created, applied = sts("created", "1"), sts("applied", "2")
    created["metadata"]["managedFields"] = [entry("omni-operator", "Update"), entry("kcm", "Update", "status")]
    applied["metadata"]["managedFields"] = [entry("omni-operator", "Apply"), entry("omni-operator", "Update", "scale"),
                                            entry("kubectl", "Update")]
    cache.prime([], {"StatefulSet": [created, applied]})
    children = cache.children("ns", "omni")
    assert children[("StatefulSet", "created")]["metadata"]["managedFields"] == [
        {"manager": "omni-operator", "operation": "Update"}]
    assert "managedFields" not in children[("StatefulSet", "applied")]["metadata"]
