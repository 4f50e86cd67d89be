"""Tier 3 (+4): the weight cache on the real control plane.

The loader Job's pods run the real `omni-runtime fetch-weights` (the cluster's node agent
plays their kubelet and provisions hostPath volumes for the PVCs); it downloads from a
stand-in hub on loopback (e2e/hub.py) because the public hub is unreachable from tests.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from e2e.hub import HubStandIn, write_placeholder_checkpoint

from .test_operator_cluster import apply, condition, crd, kget, omni, operator, wait, wait_ready  # noqa: F401

pytestmark = pytest.mark.cluster

REPO = "Qwen/Qwen3-Omni-30B-A3B-Instruct"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    with HubStandIn() as server:
        server.add(REPO, {"main": write_placeholder_checkpoint(root / "main", seed=1),
                          "v2": write_placeholder_checkpoint(root / "v2", seed=2)})
        server.add("acme/gated-omni", {"main": write_placeholder_checkpoint(root / "gated", seed=3)},
                   token="hf_open_sesame")
        yield server


def from_hub(name: str, namespace: str, hub_url: str, **model) -> dict:
    resource = omni(name, namespace)
    resource["spec"]["model"] = {"repo": REPO, "cache": {"endpoint": hub_url}, **model}
    return resource


def gated(name: str, namespace: str, hub_url: str, **model) -> dict:
    """The stand-in hub's gated repository (the operator cannot know its size: it is given)."""
    resource = from_hub(name, namespace, hub_url, **model)
    resource["spec"]["model"].update(repo="acme/gated-omni", cache={"endpoint": hub_url, "size": "1Gi"})
    return resource


def wait_weights_reason(cluster, namespace: str, name: str, reason: str, operator) -> dict:
    def reached():
        r = kget(cluster, "omni", name, "-n", namespace)
        return condition(r, "WeightsReady").get("reason") == reason and r

    return wait(f"WeightsReady reason {reason}", reached, operator=operator)


def weights_of(cluster, namespace: str, name: str) -> dict:
    return ((kget(cluster, "omni", name, "-n", namespace) or {}).get("status") or {}).get("weights") or {}


def role_claims(cluster, namespace: str) -> set[str]:
    claims = set()
    for sts in kget(cluster, "statefulsets", "-n", namespace)["items"]:
        for vol in sts["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"].get("readOnly") is True
                claims.add(vol["persistentVolumeClaim"]["claimName"])
    return claims


def hub_commit(hub: HubStandIn, repo: str, revision: str) -> str:
    with urllib.request.urlopen(f"{hub.url}/api/models/{repo}/revision/{revision}") as r:
        return json.load(r)["sha"]


# ----------------------------------------------------------------------------- the default path


def test_default_example_fetches_once_then_starts_the_roles_on_the_cache(cluster, namespace, operator):
    """examples/omni.yaml as users apply it: the node's hub mirror stands in for the hub."""
    apply(cluster, omni("qwen3-omni", namespace))
    ready = wait_ready(cluster, namespace, "qwen3-omni", operator)
    weights = ready["status"]["weights"]
    assert weights["phase"] == "Complete" and weights["source"] == "Cache"
    assert len(weights["commit"]) == 40 and weights["bytesTotal"] > 0 and weights["bytesDone"] == weights["bytesTotal"]
    assert condition(ready, "WeightsReady")["status"] == "True"
    claim = weights["claimName"]
    assert role_claims(cluster, namespace) == {claim}

    # What the loader left on the volume: the complete directory and its manifest, no staging area.
    volume = cluster.pvc_host_dir(namespace, claim)
    manifest = json.loads((volume / "model" / ".omni-weights.json").read_text())
    assert manifest["commit"] == weights["commit"] and not (volume / ".partial").exists()
    assert sum(f["size"] for f in manifest["files"]) == weights["bytesTotal"]

    # No GPU pod existed before the cache was complete.
    job = kget(cluster, "job", claim, "-n", namespace)
    done = job["status"]["completionTime"]
    for sts in kget(cluster, "statefulsets", "-n", namespace)["items"]:
        assert sts["metadata"]["creationTimestamp"] >= done, sts["metadata"]["name"]


# ----------------------------------------------------------------------------- revisions


def test_a_revision_change_fills_a_new_cache_and_rolls_the_roles_onto_it(cluster, namespace, operator, hub):
    apply(cluster, from_hub("rev", namespace, hub.url))
    first = wait_ready(cluster, namespace, "rev", operator)["status"]["weights"]
    assert first["commit"] == hub_commit(hub, REPO, "main")
    old_claim = first["claimName"]

    apply(cluster, from_hub("rev", namespace, hub.url, revision="v2"))

    def rolled():
        weights = weights_of(cluster, namespace, "rev")
        return (weights.get("revision") == "v2" and weights.get("phase") == "Complete"
                and role_claims(cluster, namespace) == {weights["claimName"]} and weights)

    second = wait("the roles on the v2 cache", rolled, operator=operator)
    assert second["claimName"] != old_claim and second["commit"] == hub_commit(hub, REPO, "v2")
    assert second["servingClaimName"] == second["claimName"]
    # The old cache goes once no pod mounts it (kwok pods of the old template are replaced).
    wait("the old cache to be deleted", lambda: kget(cluster, "pvc", old_claim, "-n", namespace) is None
         and kget(cluster, "job", old_claim, "-n", namespace) is None, operator=operator)
    assert wait_ready(cluster, namespace, "rev", operator)


# ----------------------------------------------------------------------------- failures


def test_a_gated_repository_without_a_token_is_reported_and_nothing_starts(cluster, namespace, operator, hub):
    apply(cluster, gated("gated", namespace, hub.url))
    r = wait_weights_reason(cluster, namespace, "gated", "LoaderFailed", operator)
    message = condition(r, "WeightsReady")["message"]
    assert "gated" in message and "tokenSecretRef" in message, message
    assert condition(r, "Degraded")["reason"] == "WeightsFailed"
    assert condition(r, "Ready")["reason"] == "WaitingForWeights"
    assert (condition(r, "Stalled")["status"], condition(r, "Stalled")["reason"]) == ("True", "WeightsFailed")
    assert r["status"]["weights"]["phase"] == "Failed"
    assert kget(cluster, "statefulsets", "-n", namespace)["items"] == []
    job = kget(cluster, "job", r["status"]["weights"]["claimName"], "-n", namespace)
    assert job["status"].get("failed") == 1  # a permanent error is not retried
    events = kget(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=gated")["items"]
    assert any(e["type"] == "Warning" and e["reason"] == "LoaderFailed" for e in events)


def test_a_missing_token_secret_is_named_and_the_right_token_loads(cluster, namespace, operator, hub):
    apply(cluster, gated("token", namespace, hub.url, tokenSecretRef={"name": "hf", "key": "token"}))
    r = wait_weights_reason(cluster, namespace, "token", "LoaderBlocked", operator)
    assert 'secret "hf" not found' in condition(r, "WeightsReady")["message"]

    cluster.kubectl("create", "secret", "generic", "hf", "-n", namespace, "--from-literal=token=hf_open_sesame")
    ready = wait_ready(cluster, namespace, "token", operator)
    assert ready["status"]["weights"]["commit"] == hub_commit(hub, "acme/gated-omni", "main")
