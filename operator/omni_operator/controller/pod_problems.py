"""Why a role's pods are not running, from what the scheduler and the kubelet wrote in their
status (pure): the reason the Ready condition and the role's status then carry.

Only pods that are not Ready are looked at. One problem per role: the first pod's (by name)
of the most telling kind, since one bad Secret or image makes every pod of the role fail alike.
A pod that could not even be created (a missing PriorityClass, a quota) has no status to read:
the workload controller says why, in a StatefulSet's `FailedCreate` events and a Deployment's
`ReplicaFailure` condition (`FailedCreate`, the first reason of all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COMPONENT_LABEL = "app.kubernetes.io/component"
MESSAGE_CHARS = 300  # a condition message is read in `kubectl get`/Argo CD: the cause, not a log

# A kubelet's waiting reasons -> the role's reason, most telling first.
_WAITING = {
    "CreateContainerConfigError": "CreateContainerConfigError",  # MissingSecret when a Secret is missing
    "InvalidImageName": "ImagePullBackOff",
    "ErrImagePull": "ImagePullBackOff",
    "ImagePullBackOff": "ImagePullBackOff",
    "CreateContainerError": "CreateContainerError",
    "CrashLoopBackOff": "CrashLoopBackOff",
}
_ORDER = ("FailedCreate", "MissingSecret", "CreateContainerConfigError", "ImagePullBackOff", "CreateContainerError",
          "CrashLoopBackOff", "Unschedulable")
# The problems that stay until someone changes the spec or the cluster (a Secret, a PriorityClass,
# an image, the program): kstatus' Stalled. Unschedulable is not among them: a cluster autoscaler
# may be bringing the node.
NEEDS_A_CHANGE = frozenset(_ORDER) - {"Unschedulable"}


@dataclass(frozen=True)
class PodProblem:
    reason: str
    message: str


def _short(text: str) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


def pod_ready(pod: dict[str, Any]) -> bool:
    """Ready and not being deleted."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def unschedulable(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The scheduler's PodScheduled=False condition of a Pending pod no node can take."""
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return None
    return next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"
                 and c.get("status") == "False" and c.get("reason") == "Unschedulable"), None)


def pod_problem(pod: dict[str, Any]) -> PodProblem | None:
    """What keeps one pod from running, if its status says."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or pod_ready(pod) or status.get("phase") in ("Succeeded", "Failed"):
        return None
    found: list[PodProblem] = []
    for ctr in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (ctr.get("state") or {}).get("waiting") or {}
        reason = _WAITING.get(waiting.get("reason", ""))
        if reason is None and _restarting_after_failure(ctr):
            # Between two back-offs a crash-looping container runs for a moment, not yet ready:
            # still the same crash loop, not a role without a reason.
            reason = "CrashLoopBackOff"
        if reason is None:
            continue
        cause = waiting.get("message", "")
        if reason == "CreateContainerConfigError" and "secret" in cause.lower():
            reason = "MissingSecret"
        if reason == "CrashLoopBackOff":
            last = (ctr.get("lastState") or {}).get("terminated") or {}
            cause = f"exited with {last.get('exitCode', '?')}"
            if last.get("message"):
                cause += f": {last['message'].strip().splitlines()[-1]}"
        found.append(PodProblem(reason, _short(f"pod {name} container {ctr.get('name')}: {cause or waiting['reason']}")))
    scheduled = unschedulable(pod)
    if scheduled is not None:
        found.append(PodProblem("Unschedulable", _short(f"pod {name}: {scheduled.get('message', '')}")))
    return min(found, key=lambda p: _ORDER.index(p.reason)) if found else None


def _restarting_after_failure(ctr: dict[str, Any]) -> bool:
    """A container started again after it failed, and not ready yet."""
    last = (ctr.get("lastState") or {}).get("terminated") or {}
    return not ctr.get("ready") and (ctr.get("restartCount") or 0) > 0 and last.get("exitCode", 0) != 0


def missing_pods(workload: dict[str, Any]) -> bool:
    """A StatefulSet with fewer pods than its replicas (the ones it could not create)."""
    return (workload.get("status") or {}).get("replicas", 0) < (workload.get("spec") or {}).get("replicas", 1)


def _stamp(event: dict[str, Any]) -> str:
    # core/v1 Events of the legacy recorder carry lastTimestamp; events.k8s.io ones a series or eventTime.
    return (event.get("lastTimestamp") or (event.get("series") or {}).get("lastObservedTime")
            or event.get("eventTime") or "")


def failed_create(workload: dict[str, Any], events: list[dict[str, Any]]) -> PodProblem | None:
    """Why the workload controller could not create a pod: a Deployment's ReplicaFailure condition,
    or the newest FailedCreate Warning event of a StatefulSet short of pods."""
    if workload.get("kind") == "Deployment":
        cond = next((c for c in (workload.get("status") or {}).get("conditions") or []
                     if c.get("type") == "ReplicaFailure" and c.get("status") == "True"), None)
        return PodProblem("FailedCreate", _short(cond.get("message", ""))) if cond else None
    uid = workload["metadata"].get("uid")
    mine = [e for e in events if e.get("reason") == "FailedCreate" and e.get("type") == "Warning"
            and (e.get("involvedObject") or {}).get("uid") in (None, uid)]  # not a same-named predecessor's
    if not mine or not missing_pods(workload):
        return None
    return PodProblem("FailedCreate", _short(max(mine, key=_stamp).get("message", "")))


def role_problems(pods: list[dict[str, Any]],
                  failures: dict[str, PodProblem] | None = None) -> dict[str, PodProblem]:
    """role -> the problem of its pods, for roles that have one. `failures`: role -> why its
    workload could not create pods (`failed_create`)."""
    out: dict[str, PodProblem] = dict(failures or {})
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        role = (pod["metadata"].get("labels") or {}).get(COMPONENT_LABEL)
        problem = pod_problem(pod)
        if role is None or problem is None:
            continue
        if role not in out or _ORDER.index(problem.reason) < _ORDER.index(out[role].reason):
            out[role] = problem
    return out
