"""Tier 1: the pure parts of the REST layer (its requests are tested against a real apiserver in
the cluster tiers)."""

from __future__ import annotations

import pytest

from omni_operator.kube import _union, holds_created_fields

pytestmark = pytest.mark.pure


def test_managed_field_sets_are_united_key_by_key():
    created = {"f:metadata": {"f:labels": {".": {}, "f:a": {}}}, "f:spec": {"f:replicas": {}}}
    applied = {"f:metadata": {"f:labels": {"f:b": {}}}, "f:spec": {"f:template": {"f:spec": {}}}}
    assert _union(created, applied) == {
        "f:metadata": {"f:labels": {".": {}, "f:a": {}, "f:b": {}}},
        "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {}}}}
    assert _union({}, applied) == applied and _union(created, {}) == created


def test_only_our_create_on_the_object_itself_holds_created_fields():
    def obj(*entries: dict) -> dict:
        return {"metadata": {"managedFields": list(entries)}}
    assert holds_created_fields(obj({"manager": "omni-operator", "operation": "Update"}))
    assert not holds_created_fields(obj({"manager": "omni-operator", "operation": "Apply"}))
    assert not holds_created_fields(obj({"manager": "omni-operator", "operation": "Update", "subresource": "scale"}))
    assert not holds_created_fields(obj({"manager": "kubectl", "operation": "Update"}))
    assert not holds_created_fields({"metadata": {}})

