"""Tier 1: status is built through the typed models, so a misspelled or malformed field is
an error in the operator instead of a key the apiserver silently prunes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from omni_operator.api.status import Condition, OmniDeploymentStatus, RoleStatus, ScaleDecision
from omni_operator.controller.conditions import RoleObservation, compute_conditions, condition, condition_events

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("build", [
    lambda: RoleStatus(desired_replica=2),
    lambda: Condition(type="Ready", status="True", reason="AllReplicasReady", mesage="typo"),
    lambda: ScaleDecision(time="t", role="thinker", from_replicas=1, to_replicas=2, reason="r", arrivalrate=1.0),
    lambda: OmniDeploymentStatus(observed_generation=1, lastScaleDecision=[]),
])
def test_misspelled_status_fields_are_refused(build):
    with pytest.raises(ValidationError):
        build()


def test_a_condition_the_apiserver_would_refuse_fails_where_it_is_made():
    with pytest.raises(ValidationError):  # metav1.Condition reasons are CamelCase identifiers
        condition("Ready", True, "all replicas ready", "", 1)
    with pytest.raises(ValidationError):
        condition("Ready", "Maybe", "Unsure", "", 1)


def test_what_the_reconciler_computes_round_trips_through_the_model():
    roles = {"thinker": RoleObservation(desired=2, current=2, ready=1, up_to_date=False)}
    conditions = compute_conditions(generation=3, sizing_error=None, sizing_reason="sized", invalid_spec=False,
                                    apply_failure=None, roles=roles)
    status = OmniDeploymentStatus(observed_generation=3, conditions=[Condition.model_validate(c) for c in conditions],
                                  thinker=roles["thinker"].as_status())
    patch = status.patch()
    assert patch["thinker"] == {"desiredReplicas": 2, "replicas": 2, "readyReplicas": 1, "ready": "1/2"}
    assert "lastScaleDecisions" not in patch, "a merge patch must leave the autoscaler's decisions alone"
    assert OmniDeploymentStatus.model_validate(patch) == status


def test_status_sizing_carries_the_memory_breakdown_and_fits_the_crd():
    from omni_operator.rendering.plan import plan_offline
    from omni_operator.sizing.replicas import sizing_status

    from .helpers import crd_schema, example, validate_against_crd

    resource = example()  # Instruct, 30 s video + 10 min audio: 29696 tokens, 8 sequences, talker batch unset
    plan = plan_offline(resource)
    sizing = sizing_status(plan.sizing, plan.gpus).patch()
    thinker, talker = sizing["thinker"], sizing["talker"]
    assert thinker["tableGB"] == 77.79
    assert thinker["kvCacheBytesPerToken"] == 2 * 48 * 4 * 128 * 2
    assert (thinker["concurrentSequences"], thinker["contextTokens"]) == (8, 29696)
    assert thinker["concurrentKvTokens"] == 7 * 29696
    assert thinker["estimatedGB"] == round(thinker["tableGB"] + thinker["concurrentKvGB"], 2)
    assert thinker["kvCacheBytesPerGPU"] == 8 * 29696 * 2 * 48 * 2 * 128 * 2  # TP 2: half the heads each
    assert (thinker["gpusPerReplica"], thinker["tensorParallelSize"]) == (2, 2)
    assert talker["tableGB"] == 10.73 and talker["kvCacheBytesPerToken"] == 2 * 20 * 2 * 128 * 2
    # talker.maxInflight unset: the streams its 24 GiB GPU holds beside the table and the CUDA graphs
    assert talker["graphsGB"] == 2.0 and talker["concurrentSequences"] == 18
    assert talker["concurrentKvTokens"] == 17 * 29696
    assert talker["estimatedGB"] == round(talker["tableGB"] + talker["graphsGB"] + talker["concurrentKvGB"], 2)
    assert "kvCacheBytesPerGPU" not in talker and "tensorParallelSize" not in talker  # not served by vLLM
    assert sizing["maxModelLen"] == 29696 and sizing["gpusTotal"] == plan.gpus
    # Every key is one the CRD's status schema keeps (the apiserver would prune others silently).
    status = OmniDeploymentStatus(sizing=sizing_status(plan.sizing, plan.gpus))
    assert OmniDeploymentStatus.model_validate(status.patch()) == status
    validate_against_crd({**resource, "status": status.patch()})
    role_schema = crd_schema()["properties"]["status"]["properties"]["sizing"]["properties"]["thinker"]["properties"]
    assert set(thinker) <= set(role_schema) and role_schema["kvCacheBytesPerGPU"]["type"] == "integer"


def _cond(type_: str, status: str, reason: str) -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": "m"}


def test_a_new_object_reports_its_first_conditions_without_events():
    """Its first status says SizingValid=True and Ready=False while pods start: no Event each."""
    first = [_cond("SizingValid", "True", "Sized"), _cond("Ready", "False", "ReplicasNotReady"),
             _cond("Degraded", "False", "AsExpected"), _cond("Progressing", "True", "Rollout"),
             _cond("WeightsReady", "True", "OnUserVolume")]
    assert condition_events([], first) == []


def test_changes_and_first_warnings_are_events():
    before = [_cond("Ready", "False", "ReplicasNotReady"), _cond("Degraded", "False", "AsExpected"),
              _cond("Progressing", "True", "Rollout")]
    after = [_cond("Ready", "True", "AllReplicasReady"), _cond("Degraded", "False", "AsExpected"),
             _cond("Progressing", "False", "Done"), _cond("SizingValid", "False", "DoesNotFit"),
             _cond("WeightsReady", "False", "LoaderFailed")]
    events = condition_events(before, after, ("LoaderFailed",))
    assert [(t, c["type"], c["reason"]) for t, c in events] == [
        ("Normal", "Ready", "AllReplicasReady"), ("Warning", "SizingValid", "DoesNotFit"),
        ("Warning", "WeightsReady", "LoaderFailed")]
    # the same reason again is no news
    assert condition_events(after, after, ("LoaderFailed",)) == []
    # a change of reason with the same status is
    degraded = [_cond("Degraded", "True", "ApplyFailed")]
    assert [(t, c["reason"]) for t, c in condition_events(degraded, [_cond("Degraded", "True", "MissingSecret")])] \
        == [("Warning", "MissingSecret")]
