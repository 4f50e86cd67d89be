"""Why a role is not running, from pod statuses as the scheduler and kubelets write them (pure)."""

from __future__ import annotations

import pytest

from omni_operator.controller.conditions import RoleObservation, compute_conditions
from omni_operator.controller.pod_problems import (MESSAGE_CHARS, PodProblem, failed_create, missing_pods, pod_problem,
                                                   role_problems)

pytestmark = pytest.mark.pure


def pod(name, role="thinker", ready=False, waiting=None, last=None, scheduled=None, phase="Running"):
    conditions = [{"type": "Ready", "status": str(ready)}]
    if scheduled is not None:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": scheduled})
    ctr = {"name": role, "ready": ready, "state": {"waiting": waiting} if waiting else {"running": {}}}
    if last:
        ctr["lastState"] = {"terminated": last}
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/component": role}},
            "status": {"phase": phase, "conditions": conditions, "containerStatuses": [ctr]}}


def test_each_kind_of_failure_gets_its_reason_and_names_the_pod():
    assert pod_problem(pod("a-0", waiting={"reason": "CreateContainerConfigError",
                                           "message": 'secret "keys" not found'})) == \
        PodProblem("MissingSecret", 'pod a-0 container thinker: secret "keys" not found')
    assert pod_problem(pod("a-0", waiting={"reason": "CreateContainerConfigError",
                                           "message": 'configmap "c" not found'})).reason == "CreateContainerConfigError"
    for kubelet_reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
        got = pod_problem(pod("a-0", waiting={"reason": kubelet_reason, "message": "pull access denied for x"}))
        assert got.reason == "ImagePullBackOff" and got.message.endswith("pull access denied for x")
    crash = pod_problem(pod("a-0", waiting={"reason": "CrashLoopBackOff", "message": "back-off 10s"},
                            last={"exitCode": 1, "message": "Traceback ...\nOSError: no weights in /models\n"}))
    assert crash == PodProblem("CrashLoopBackOff", "pod a-0 container thinker: exited with 1: OSError: no weights in /models")
    assert pod_problem(pod("a-0", scheduled="0/8 nodes are available: 8 Insufficient nvidia.com/gpu.",
                           phase="Pending")) == \
        PodProblem("Unschedulable", "pod a-0: 0/8 nodes are available: 8 Insufficient nvidia.com/gpu.")


def test_ready_finished_starting_and_deleted_pods_have_no_problem():
    assert pod_problem(pod("a-0", ready=True)) is None
    assert pod_problem(pod("a-0", phase="Succeeded", waiting={"reason": "CrashLoopBackOff"})) is None
    assert pod_problem(pod("a-0", waiting={"reason": "ContainerCreating"})) is None  # still starting
    gone = pod("a-0", waiting={"reason": "CrashLoopBackOff"})
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_problem(gone) is None


def test_a_crash_looping_container_running_between_two_back_offs_is_still_crash_looping():
    between = pod("a-0", last={"exitCode": 1, "message": "OSError: no weights in /models"})
    between["status"]["containerStatuses"][0]["restartCount"] = 3
    assert pod_problem(between) == PodProblem("CrashLoopBackOff",
                                              "pod a-0 container thinker: exited with 1: OSError: no weights in /models")
    between["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] = 0  # it was stopped, not failing
    assert pod_problem(between) is None
    first_start = pod("a-0", last={"exitCode": 1})  # no restart yet: still starting
    assert pod_problem(first_start) is None


def test_one_problem_per_role_the_most_telling_then_the_first_pod():
    problems = role_problems([
        pod("t-1", scheduled="0/3 nodes are available.", phase="Pending"),
        pod("t-0", waiting={"reason": "CrashLoopBackOff"}, last={"exitCode": 137}),
        pod("g-0", role="gateway", waiting={"reason": "ImagePullBackOff", "message": "not found"}),
        pod("g-1", role="gateway", waiting={"reason": "ImagePullBackOff", "message": "not found either"}),
        pod("k-0", role="talker", ready=True),
    ])
    assert problems == {"thinker": PodProblem("CrashLoopBackOff", "pod t-0 container thinker: exited with 137"),
                        "gateway": PodProblem("ImagePullBackOff", "pod g-0 container gateway: not found")}


def test_long_causes_are_cut_for_a_condition_message():
    got = pod_problem(pod("a-0", scheduled="x " * 1000, phase="Pending"))
    assert len(got.message) == MESSAGE_CHARS and got.message.endswith("…")


def test_ready_condition_carries_the_first_roles_reason_and_every_cause():
    roles = {"thinker": RoleObservation(1, 1, 0, False), "talker": RoleObservation(1, 1, 1, True),
             "gateway": RoleObservation(1, 1, 0, False)}
    problems = {"gateway": PodProblem("MissingSecret", "pod g-0 container gateway: secret \"k\" not found"),
                "talker": PodProblem("CrashLoopBackOff", "pod k-0: stale")}  # talker is ready: ignored
    ready = next(c for c in compute_conditions(generation=1, sizing_error=None, sizing_reason="", invalid_spec=False,
                                               apply_failure=None, roles=roles, problems=problems)
                 if c["type"] == "Ready")
    assert ready["reason"] == "MissingSecret"
    assert ready["message"] == ('thinker 0/1 ready, gateway 0/1 ready (MissingSecret: pod g-0 container gateway: '
                                'secret "k" not found)')
    assert RoleObservation(1, 1, 0, False).as_status(problems["gateway"]).wire()["reason"] == "MissingSecret"


def statefulset(replicas=1, pods=0, uid="u1"):
    return {"kind": "StatefulSet", "metadata": {"name": "a-thinker", "uid": uid},
            "spec": {"replicas": replicas}, "status": {"replicas": pods}}


def failed_create_event(message, at, uid="u1", reason="FailedCreate", type_="Warning"):
    return {"reason": reason, "type": type_, "message": message, "lastTimestamp": at,
            "involvedObject": {"kind": "StatefulSet", "name": "a-thinker", "uid": uid}}


FORBIDDEN = ('create Pod a-thinker-0 in StatefulSet a-thinker failed error: pods "a-thinker-0" is forbidden: '
             'no PriorityClass with name gpu-high was found')


def test_a_pod_the_statefulset_cannot_create_is_named_by_its_newest_failedcreate_event():
    events = [failed_create_event("an older cause", "2026-01-01T00:00:00Z"),
              failed_create_event(FORBIDDEN, "2026-01-01T00:05:00Z"),
              failed_create_event("a predecessor's", "2026-01-01T00:09:00Z", uid="old"),
              failed_create_event("not a failure", "2026-01-01T00:09:00Z", reason="SuccessfulCreate", type_="Normal")]
    assert failed_create(statefulset(), events) == PodProblem("FailedCreate", FORBIDDEN)
    # Every pod exists (the event is history), or no event says why: nothing to report.
    assert failed_create(statefulset(replicas=2, pods=2), events) is None
    assert failed_create(statefulset(), []) is None
    assert missing_pods(statefulset(replicas=2, pods=1)) and not missing_pods(statefulset(replicas=0))


def test_a_deployment_says_it_in_its_replica_failure_condition():
    deployment = {"kind": "Deployment", "metadata": {"name": "a-gateway", "uid": "u2"}, "spec": {"replicas": 1},
                  "status": {"conditions": [{"type": "Available", "status": "False"},
                                            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                             "message": 'pods "a-gateway-5d9-x" is forbidden: exceeded quota'}]}}
    assert failed_create(deployment, []) == PodProblem("FailedCreate", 'pods "a-gateway-5d9-x" is forbidden: exceeded quota')
    deployment["status"]["conditions"][1]["status"] = "False"
    assert failed_create(deployment, []) is None


def test_a_pod_that_cannot_be_created_comes_before_the_problems_of_those_that_were():
    problems = role_problems([pod("t-0", waiting={"reason": "CrashLoopBackOff"}, last={"exitCode": 1}),
                              pod("g-0", role="gateway", waiting={"reason": "ImagePullBackOff", "message": "x"})],
                             {"thinker": PodProblem("FailedCreate", FORBIDDEN)})
    assert problems["thinker"] == PodProblem("FailedCreate", FORBIDDEN)
    assert problems["gateway"].reason == "ImagePullBackOff"
