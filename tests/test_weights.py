"""Tier 1: the weight cache's pure logic — keys, objects, what live objects say, what roles mount."""

from __future__ import annotations

import copy
import json

import pytest

from omni_operator.api.spec import parse_spec
from omni_operator.controller.conditions import compute_conditions
from omni_operator.rendering import weight_cache
from omni_operator.rendering.plan import PlanError, make_plan

from .helpers import example, validate_k8s

pytestmark = pytest.mark.pure

NAME = "omni"


def spec_dict(**model) -> dict:
    raw = example()["spec"]
    raw["model"] = {"repo": "Qwen/Qwen3-Omni-30B-A3B-Instruct", **model}
    return raw


def cache_objects(raw: dict) -> tuple[dict, dict]:
    plan = make_plan(NAME, "ns", "uid-1", raw, live_weights=weight_cache.LiveWeights())
    pvc = next(o for o in plan.objects if o["kind"] == "PersistentVolumeClaim")
    job = next(o for o in plan.objects if o["kind"] == "Job")
    return copy.deepcopy(pvc), copy.deepcopy(job)


def with_status(obj: dict, status: dict) -> dict:
    return {**obj, "status": status}


def complete(job: dict) -> dict:
    return with_status(job, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})


def bound(pvc: dict) -> dict:
    return with_status(pvc, {"phase": "Bound"})


def live_of(*objects: dict) -> dict:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def loader_pod(job: dict, phase: str, *, name: str = "loader-a", created: str = "2026-01-01T00:00:00Z",
               terminated: dict | None = None, waiting: dict | None = None, ip: str | None = None) -> dict:
    template = job["spec"]["template"]
    state = {"terminated": terminated} if terminated else {"waiting": waiting} if waiting else {"running": {}}
    status = {"phase": phase, "containerStatuses": [{"name": "loader", "state": state}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": {"name": name, "labels": template["metadata"]["labels"], "creationTimestamp": created},
            "spec": template["spec"], "status": status}


def role_pod(claim: str, phase: str = "Running") -> dict:
    return {"metadata": {"name": "omni-talker-0", "labels": {"app.kubernetes.io/component": "talker"}},
            "spec": {"volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]},
            "status": {"phase": phase}}


def plan_for(raw: dict, live: dict, pods: list | None = None, progress: dict | None = None):
    observed = weight_cache.observe(live, pods or [], progress)
    roles = frozenset(k for k, o in live.items() if k[0] == "StatefulSet")
    return make_plan(NAME, "ns", "uid-1", raw, live_weights=observed, live_roles=roles, generation=3)


def kinds(plan) -> set[str]:
    return {o["kind"] for o in plan.objects}


def talker_of(plan) -> dict:
    return next(o for o in plan.objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "omni-talker")


# ----------------------------------------------------------------------------- keys and objects


def test_cache_key_follows_revision_and_volume_kind_only():
    base = parse_spec(spec_dict())
    assert weight_cache.cache_key(base) == weight_cache.cache_key(parse_spec(spec_dict(revision="main")))
    assert weight_cache.cache_key(base) != weight_cache.cache_key(parse_spec(spec_dict(revision="abc123")))
    assert weight_cache.cache_key(base) != weight_cache.cache_key(parse_spec(spec_dict(cache={"storageClassName": "fast"})))
    other = spec_dict()
    other["thinker"]["maxReplicas"] = 9
    assert weight_cache.cache_key(base) == weight_cache.cache_key(parse_spec(other))


def test_cache_size_defaults_to_the_checkpoint_plus_headroom_and_unknown_repos_must_say():
    assert weight_cache.cache_size(parse_spec(spec_dict())) == "76Gi"  # 70.6 GB x 1.15
    assert weight_cache.cache_size(parse_spec(spec_dict(cache={"size": "2Ti"}))) == "2Ti"
    with pytest.raises(ValueError, match="model.cache.size is required"):
        parse_spec(spec_dict(repo="someone/finetune"))
    assert weight_cache.cache_size(parse_spec(spec_dict(repo="someone/finetune", cache={"size": "90Gi"}))) == "90Gi"
    with pytest.raises(ValueError, match="model.cache applies to model.repo only"):
        parse_spec({"model": {"pvc": {"claimName": "w"}, "cache": {"size": "1Gi"}}})


def test_cache_objects_are_valid_and_say_how_to_fill_the_volume():
    pvc, job = cache_objects(spec_dict(revision="v2", cache={"storageClassName": "nfs", "endpoint": "https://mirror.example"},
                                       tokenSecretRef={"name": "hf"}))
    validate_k8s(pvc)
    validate_k8s(job)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert container["command"] == ["omni-runtime", "fetch-weights"]
    assert env["OMNI_MODEL"] == "Qwen/Qwen3-Omni-30B-A3B-Instruct" and env["OMNI_MODEL_REVISION"] == "v2"
    assert env["HF_ENDPOINT"] == "https://mirror.example"
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert {"name": "weights", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}} in pod["volumes"]
    assert pod["restartPolicy"] == "Never" and container["securityContext"]["readOnlyRootFilesystem"] is True
    # A permanent loader error (exit 2) fails the Job at once instead of retrying.
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [weight_cache.EXIT_PERMANENT]
    # The loader runs on the CPU pool: never on a GPU node, never asking for a GPU.
    assert pod["nodeSelector"] == {"omni.qwen.ai/pool": "cpu"}
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])


# ----------------------------------------------------------------------------- first fill


def test_nothing_runs_on_gpus_until_the_cache_is_complete():
    raw = spec_dict()
    plan = plan_for(raw, {})
    assert {"PersistentVolumeClaim", "Job", "Deployment"} <= kinds(plan)
    assert "StatefulSet" not in kinds(plan)  # no thinker or talker pod without weights
    assert plan.weights.condition["reason"] == "CreatingCache"
    conditions = {c["type"]: c for c in compute_conditions(
        generation=3, sizing_error=None, sizing_reason="", invalid_spec=False, apply_failure=None, roles={},
        weights=plan.weights.condition, waiting_for_weights=True)}
    assert conditions["Ready"]["status"] == "False" and conditions["Ready"]["reason"] == "WaitingForWeights"
    assert conditions["WeightsReady"]["status"] == "False"


def test_progress_is_reported_while_the_loader_runs():
    raw = spec_dict()
    pvc, job = cache_objects(raw)
    running = with_status(job, {"active": 1})
    pod = loader_pod(job, "Running", ip="127.0.64.9")
    live = live_of(bound(pvc), running)
    assert weight_cache.pods_needed(live)
    observed = weight_cache.observe(live, [pod])
    assert weight_cache.loaders_to_scrape(observed) == {job["metadata"]["labels"][weight_cache.KEY_LABEL]:
                                                   "http://127.0.64.9:9400/metrics"}
    progress = weight_cache.parse_progress("omni_weights_bytes_done 35300000000\nomni_weights_bytes_total 70600000000\n"
                                      "omni_weights_files_done 7\nomni_weights_files_total 17\n")
    key = job["metadata"]["labels"][weight_cache.KEY_LABEL]
    plan = plan_for(raw, live, [pod], {key: progress})
    status = plan.weights.status
    assert (status.phase, status.bytes_done, status.bytes_total) == ("Downloading", 35_300_000_000, 70_600_000_000)
    assert "35.3 GB of 70.6 GB (7/17 files)" in plan.weights.condition["message"]
    assert plan.weights.poll_after and "StatefulSet" not in kinds(plan)


def test_a_complete_cache_is_mounted_read_only_by_thinker_and_talker():
    raw = spec_dict()
    pvc, job = cache_objects(raw)
    done = loader_pod(job, "Succeeded", terminated={
        "exitCode": 0, "message": json.dumps({"commit": "c0ffee" * 6 + "abcd", "bytes": 123, "files": 4})})
    live = live_of(bound(pvc), complete(job))
    plan = plan_for(raw, live, [done])
    talker = talker_of(plan)
    pod = talker["spec"]["template"]["spec"]
    claim = pvc["metadata"]["name"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}} in pod["volumes"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model"]
    assert mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["OMNI_MODEL"] == "/models/model" and env["HF_HUB_OFFLINE"] == "1"
    assert plan.weights.status.commit.startswith("c0ffee") and plan.weights.status.bytes_total == 123
    assert plan.weights.condition["status"] == "True"


def test_the_loaders_result_is_read_once_then_kept_in_status():
    raw = spec_dict()
    pvc, job = cache_objects(raw)
    live = live_of(bound(pvc), complete(job))
    claim = pvc["metadata"]["name"]
    # Just finished: the status does not hold the commit yet, so the pods are read once...
    assert weight_cache.pods_needed(live, {"phase": "Downloading", "claimName": claim})
    done = loader_pod(job, "Succeeded", terminated={"exitCode": 0, "message": json.dumps(
        {"commit": "ab" * 20, "bytes": 77, "files": 3})})
    plan = plan_for(raw, live, [done])
    recorded = plan.weights.status.wire()
    # ...and never again: the status carries the result from then on.
    assert not weight_cache.pods_needed(live, recorded)
    again = make_plan(NAME, "ns", "uid-1", raw, live_weights=weight_cache.observe(live, [], recorded=recorded))
    assert again.weights.status == plan.weights.status and again.weights.status.commit == "ab" * 20


# ----------------------------------------------------------------------------- failures


def test_a_failed_loader_is_reported_with_its_own_words_and_nothing_starts():
    raw = spec_dict()
    pvc, job = cache_objects(raw)
    failed_job = with_status(job, {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "Container loader ... exit 2"}]})
    why = "repository Qwen/X is gated or private and the hub refused the token (HTTP 401): set spec.model.tokenSecretRef"
    pod = loader_pod(job, "Failed", terminated={"exitCode": 2, "message": why})
    plan = plan_for(raw, live_of(bound(pvc), failed_job), [pod])
    assert plan.weights.failed and plan.weights.status.phase == "Failed"
    assert plan.weights.condition["reason"] == "LoaderFailed" and why in plan.weights.condition["message"]
    assert "StatefulSet" not in kinds(plan)
    assert plan.weights.poll_after is None  # nothing to wait for until the spec changes
    conditions = {c["type"]: c for c in compute_conditions(
        generation=3, sizing_error=None, sizing_reason="", invalid_spec=False, apply_failure=None, roles={},
        weights=plan.weights.condition, weights_failed=True, waiting_for_weights=True)}
    assert conditions["Degraded"]["reason"] == "WeightsFailed" and why in conditions["Degraded"]["message"]


def test_a_retrying_loader_says_what_failed_last():
    raw = spec_dict()
    pvc, job = cache_objects(raw)
    first = loader_pod(job, "Failed", name="a", created="2026-01-01T00:00:00Z",
                       terminated={"exitCode": 1, "message": "the hub answered HTTP 503"})
    second = loader_pod(job, "Running", name="b", created="2026-01-01T00:01:00Z", ip="127.0.64.3")
    plan = plan_for(raw, live_of(bound(pvc), with_status(job, {"active": 1, "failed": 1})), [first, second])
    assert plan.weights.condition["reason"] == "Downloading"
    assert "attempt 2; the last one failed: the hub answered HTTP 503" in plan.weights.condition["message"]


def test_a_missing_secret_or_an_unbound_volume_is_named():
    raw = spec_dict()
    pvc, job = cache_objects(raw)
    blocked = loader_pod(job, "Pending", waiting={"reason": "CreateContainerConfigError",
                                                  "message": 'secret "hf" not found'})
    plan = plan_for(raw, live_of(bound(pvc), with_status(job, {"active": 1})), [blocked])
    assert plan.weights.condition["reason"] == "LoaderBlocked"
    assert 'CreateContainerConfigError: secret "hf" not found' in plan.weights.condition["message"]

    pending = {"metadata": loader_pod(job, "Pending")["metadata"], "spec": job["spec"]["template"]["spec"],
               "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                               "reason": "Unschedulable"}]}}
    plan = plan_for(raw, live_of(with_status(pvc, {"phase": "Pending"}), with_status(job, {"active": 1})), [pending])
    assert plan.weights.condition["reason"] == "WaitingForVolume"


# ----------------------------------------------------------------------------- revisions


def _roles_on(plan_objects: list[dict]) -> dict:
    return {(o["kind"], o["metadata"]["name"]): o for o in plan_objects if o["kind"] == "StatefulSet"}


def test_a_new_revision_loads_beside_the_old_one_and_the_roles_move_when_it_is_complete():
    old_raw, new_raw = spec_dict(), spec_dict(revision="v2")
    old_pvc, old_job = cache_objects(old_raw)
    new_pvc, new_job = cache_objects(new_raw)
    old_claim, new_claim = old_pvc["metadata"]["name"], new_pvc["metadata"]["name"]
    assert old_claim != new_claim
    serving = plan_for(old_raw, live_of(bound(old_pvc), complete(old_job)))
    roles = _roles_on(serving.objects)

    # v2 is loading: the roles stay on the old cache, which must not be pruned.
    live = live_of(bound(old_pvc), complete(old_job), bound(new_pvc), with_status(new_job, {"active": 1}), *roles.values())
    plan = plan_for(new_raw, live, [role_pod(old_claim)])
    assert plan.weights.serving_claim == old_claim
    assert talker_of(plan)["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == old_claim
    assert ("PersistentVolumeClaim", old_claim) in plan.keep and ("Job", old_claim) in plan.keep
    assert f"the roles keep serving {old_claim}" in plan.weights.condition["message"]

    # v2 complete: the roles roll onto it; the old cache lives while a pod still mounts it...
    live[("Job", new_claim)] = complete(new_job)
    plan = plan_for(new_raw, live, [role_pod(old_claim)])
    assert plan.weights.serving_claim == new_claim
    assert talker_of(plan)["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == new_claim
    assert ("PersistentVolumeClaim", old_claim) in plan.keep
    # ...and is pruned once none does (terminated pods hold no volume).
    plan = plan_for(new_raw, live, [role_pod(new_claim), role_pod(old_claim, phase="Succeeded")])
    assert ("PersistentVolumeClaim", old_claim) not in plan.keep


def test_a_failing_new_revision_leaves_the_roles_on_the_old_one():
    old_raw, new_raw = spec_dict(), spec_dict(revision="broken")
    old_pvc, old_job = cache_objects(old_raw)
    new_pvc, new_job = cache_objects(new_raw)
    roles = _roles_on(plan_for(old_raw, live_of(bound(old_pvc), complete(old_job))).objects)
    failed = with_status(new_job, {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                                                 "message": "revision broken not found"}]})
    live = live_of(bound(old_pvc), complete(old_job), bound(new_pvc), failed, *roles.values())
    plan = plan_for(new_raw, live, [role_pod(old_pvc["metadata"]["name"])])
    assert plan.weights.failed and plan.weights.serving_claim == old_pvc["metadata"]["name"]
    assert "StatefulSet" in kinds(plan)


def test_switching_from_a_user_pvc_to_a_repository_keeps_the_running_roles_until_the_cache_is_filled():
    pvc_raw = example()["spec"]
    pvc_raw["model"] = {"pvc": {"claimName": "mine", "path": "qwen"}}
    roles = _roles_on(make_plan(NAME, "ns", "uid-1", pvc_raw).objects)
    plan = plan_for(spec_dict(), live_of(*roles.values()))
    assert plan.weights.hold_roles and plan.keep >= set(roles)
    assert "StatefulSet" not in kinds(plan)  # not rendered (would mount nothing), not pruned either


def test_a_user_pvc_needs_no_cache():
    raw = example()["spec"]
    raw["model"] = {"pvc": {"claimName": "mine"}}
    plan = make_plan(NAME, "ns", "uid-1", raw, live_weights=weight_cache.LiveWeights())
    assert "Job" not in kinds(plan) and "PersistentVolumeClaim" not in kinds(plan)
    assert plan.weights.condition["reason"] == "UserVolume" and plan.weights.mount is not None


def test_invalid_model_sources_are_plan_errors():
    with pytest.raises(PlanError, match="model.cache.size is required"):
        make_plan(NAME, "ns", "u", {"model": {"repo": "a/b"}})
