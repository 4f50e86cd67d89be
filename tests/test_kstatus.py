"""Tier 1: the kstatus conditions (Reconciling, Stalled) the operator writes next to its own, read
the way sigs.k8s.io/cli-utils' kstatus reads a custom resource (Flux's `wait`/`healthChecks`, kpt,
Config Sync). The GitOps tier checks the same against Flux itself."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from omni_operator.controller.conditions import ApplyFailure, RoleObservation, compute_conditions
from omni_operator.controller.pod_problems import PodProblem

pytestmark = pytest.mark.pure

GENERATION = 4


def kstatus(conditions: list[dict[str, Any]], observed_generation: int = GENERATION) -> str:
    """kstatus' generic rules for a custom resource (cli-utils pkg/kstatus/status/generic.go):
    the generation first, then Reconciling=True, then Stalled=True, else Current."""
    if observed_generation < GENERATION:
        return "InProgress"
    for cond in conditions:
        if cond["type"] == "Reconciling" and cond["status"] == "True":
            return "InProgress"
        if cond["type"] == "Stalled" and cond["status"] == "True":
            return "Failed"
    return "Current"


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


def conditions(**observed: Any) -> list[dict[str, Any]]:
    args: dict[str, Any] = dict(generation=GENERATION, sizing_error=None, sizing_reason="sized", invalid_spec=False,
                                apply_failure=None, roles={"thinker": RoleObservation(1, 1, 1, True),
                                                           "talker": RoleObservation(1, 1, 1, True)})
    return compute_conditions(**(args | observed))


LOADING = {"type": "WeightsReady", "status": "False", "reason": "Downloading", "message": "12 of 40 GB"}
SHORT = {"thinker": RoleObservation(2, 2, 1, True), "talker": RoleObservation(1, 1, 1, True)}


@pytest.mark.parametrize("observed,status,reason", [
    ({}, "Current", None),
    (dict(weights=LOADING, waiting_for_weights=True, roles={}), "InProgress", "LoadingWeights"),
    (dict(roles={"thinker": RoleObservation(1, 1, 1, False)}), "InProgress", "RollingOut"),
    (dict(roles=SHORT), "InProgress", "RollingOut"),
    (dict(roles={}), "InProgress", "NoReplicas"),
    (dict(roles=SHORT, problems={"thinker": PodProblem("Unschedulable", "pod a-1: 0/3 nodes")}), "InProgress",
     "RollingOut"),
    (dict(apply_failure=ApplyFailure("StatefulSet a-thinker: the object has been modified", lasting=False)),
     "InProgress", "ApplyFailed"),
    (dict(sizing_error="thinker needs 131.65 GB; 4 x 24 GiB hold 96 GiB"), "Failed", "InsufficientGPUMemory"),
    (dict(sizing_error="minReplicas must not exceed maxReplicas", invalid_spec=True), "Failed", "InvalidSpec"),
    (dict(apply_failure=ApplyFailure("Service a-gateway already exists and is not owned", lasting=True)), "Failed",
     "ApplyFailed"),
    (dict(weights={**LOADING, "reason": "LoaderFailed"}, weights_failed=True), "Failed", "WeightsFailed"),
    (dict(roles=SHORT, problems={"thinker": PodProblem("CrashLoopBackOff", "pod a-1: exited with 1")}), "Failed",
     "CrashLoopBackOff"),
    (dict(roles=SHORT, problems={"thinker": PodProblem("MissingSecret", 'secret "hf" not found')}), "Failed",
     "MissingSecret"),
    (dict(roles=SHORT, problems={"thinker": PodProblem("FailedCreate", 'no PriorityClass with name gpu')}), "Failed",
     "FailedCreate"),
])
def test_kstatus_reads_what_the_operator_sees(observed, status, reason):
    conds = conditions(**observed)
    assert kstatus(conds) == status
    got = by_type(conds)
    if status == "Failed":
        assert got["Stalled"]["reason"] == reason and got["Reconciling"]["status"] == "False"
    elif status == "InProgress":
        assert got["Reconciling"]["reason"] == reason and got["Stalled"]["status"] == "False"
    else:
        assert got["Ready"]["status"] == "True"
        assert (got["Reconciling"]["status"], got["Stalled"]["status"]) == ("False", "False")


def test_stalled_carries_the_operators_own_words():
    sizing = "thinker needs 131.65 GB for 120 s of video; 4 x 24 GiB per node hold 96 GiB"
    got = by_type(conditions(sizing_error=sizing))
    assert got["Stalled"]["message"] == got["SizingValid"]["message"] == sizing
    crash = PodProblem("CrashLoopBackOff", "pod a-thinker-1 container thinker: exited with 1: no such file")
    got = by_type(conditions(roles=SHORT, problems={"thinker": crash}))
    expected = f"thinker 1/2 ready (CrashLoopBackOff: {crash.message})"
    assert got["Stalled"]["message"] == got["Ready"]["message"] == expected


def test_an_unsizable_update_stalls_even_with_the_old_replicas_ready():
    """The running replicas stay, but the spec in Git is not what runs: a GitOps tool must not call it healthy."""
    got = by_type(conditions(sizing_error="does not fit"))
    assert got["Ready"]["status"] == "True" and got["Stalled"]["status"] == "True"


def test_every_condition_is_for_the_generation_it_was_computed_for():
    assert {c["observedGeneration"] for c in conditions(roles=SHORT)} == {GENERATION}


roles = st.dictionaries(st.sampled_from(["thinker", "talker", "gateway"]),
                        st.builds(RoleObservation, st.integers(0, 3), st.integers(0, 3), st.integers(0, 3),
                                  st.booleans()))
problem = st.builds(PodProblem, st.sampled_from(["FailedCreate", "MissingSecret", "ImagePullBackOff",
                                                 "CrashLoopBackOff", "Unschedulable"]), st.just("why"))


@given(roles=roles, sizing=st.sampled_from([None, "does not fit"]),
       apply_failure=st.sampled_from([None, ApplyFailure("refused", True), ApplyFailure("conflict", False)]),
       weights=st.sampled_from([None, LOADING, {**LOADING, "status": "True", "reason": "Complete"}]),
       weights_failed=st.booleans(), problems=st.dictionaries(st.sampled_from(["thinker", "talker"]), problem))
def test_reconciling_and_stalled_are_never_both_true_and_only_ready_is_current(roles, sizing, apply_failure, weights,
                                                                             weights_failed, problems):
    conds = by_type(compute_conditions(generation=GENERATION, sizing_error=sizing, sizing_reason="", invalid_spec=False,
                                       apply_failure=apply_failure, roles=roles, weights=weights,
                                       weights_failed=weights_failed and weights is not None, problems=problems))
    assert not (conds["Reconciling"]["status"] == "True" and conds["Stalled"]["status"] == "True")
    current = kstatus(list(conds.values())) == "Current"
    settled = conds["Ready"]["status"] == "True" and conds["Progressing"]["status"] == "False" \
        and conds["Degraded"]["status"] == "False"
    assert current == settled
