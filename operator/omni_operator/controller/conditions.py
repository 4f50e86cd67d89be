"""The OmniDeployment's conditions from what a reconcile observed (pure).

What goes into the status is built through the typed models of omni_operator.api.status;
the reconciler does the I/O around it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omni_operator.api.status import Condition, RoleStatus
from omni_operator.controller.pod_problems import PodProblem

READY, PROGRESSING, DEGRADED, SIZING_VALID = "Ready", "Progressing", "Degraded", "SizingValid"
WEIGHTS_READY = "WeightsReady"


@dataclass(frozen=True)
class RoleObservation:
    desired: int
    current: int
    ready: int
    up_to_date: bool

    def as_status(self, problem: PodProblem | None = None) -> RoleStatus:
        return RoleStatus(desired_replicas=self.desired, replicas=self.current, ready_replicas=self.ready,
                          ready=f"{self.ready}/{self.desired}", reason=problem.reason if problem else None,
                          message=problem.message if problem else None)


def _workload_settled(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    want = (obj.get("spec") or {}).get("replicas", 0)
    return (status.get("observedGeneration", 0) >= obj["metadata"].get("generation", 0)
            and status.get("updatedReplicas", 0) >= want
            and status.get("readyReplicas", 0) >= want)


def observe_role(desired: int, workloads: list[dict[str, Any]], pods_per_replica: int = 1) -> RoleObservation:
    """Replicas of a role from its StatefulSets/Deployment.

    With one workload the replicas are its pods; when a replica spans nodes each
    StatefulSet is one replica, ready only when all its shards are.
    """
    if pods_per_replica > 1:
        current = len(workloads)
        ready = sum(1 for w in workloads if (w.get("status") or {}).get("readyReplicas", 0) >= pods_per_replica)
    else:
        current = sum((w.get("status") or {}).get("replicas", 0) for w in workloads)
        ready = sum((w.get("status") or {}).get("readyReplicas", 0) for w in workloads)
    up_to_date = all(_workload_settled(w) for w in workloads) and current == desired
    return RoleObservation(desired=desired, current=current, ready=ready, up_to_date=up_to_date)


def condition(type_: str, status: bool | str, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    value = status if isinstance(status, str) else ("True" if status else "False")
    return Condition(type=type_, status=value, reason=reason, message=message, observed_generation=generation).wire()


def compute_conditions(*, generation: int | None, sizing_error: str | None, sizing_reason: str,
                       invalid_spec: bool, apply_error: str | None,
                       roles: dict[str, RoleObservation], weights: dict[str, Any] | None = None,
                       weights_failed: bool = False, waiting_for_weights: bool = False,
                       problems: dict[str, PodProblem] | None = None) -> list[dict[str, Any]]:
    """The conditions from what the reconcile saw. `weights`: the WeightsReady condition;
    `waiting_for_weights`: no complete copy exists, so thinker and talker are not running yet;
    `problems`: why a role's pods are not running (Ready then carries the first one's reason)."""
    weights_message = (weights or {}).get("message", "")
    problems = {role: p for role, p in (problems or {}).items() if role in roles and roles[role].ready < roles[role].desired}
    not_ready = [f"{role} {o.ready}/{o.desired} ready" + (f" ({problems[role].reason}: {problems[role].message})"
                                                          if role in problems else "")
                 for role, o in roles.items() if o.ready < o.desired]
    rolling = [role for role, o in roles.items() if not o.up_to_date]
    all_ready = not not_ready and bool(roles)

    if sizing_error:
        sizing = condition(SIZING_VALID, False, "InvalidSpec" if invalid_spec else "InsufficientGPUMemory",
                           sizing_error, generation)
    else:
        sizing = condition(SIZING_VALID, True, "Sized", sizing_reason, generation)

    if sizing_error:
        degraded = condition(DEGRADED, True, "SizingInvalid",
                             "the spec cannot be sized; running replicas are left unchanged: " + sizing_error,
                             generation)
    elif apply_error:
        degraded = condition(DEGRADED, True, "ApplyFailed", apply_error, generation)
    elif weights_failed:
        degraded = condition(DEGRADED, True, "WeightsFailed", weights_message, generation)
    else:
        degraded = condition(DEGRADED, False, "AsExpected", "", generation)

    if sizing_error:
        progressing = condition(PROGRESSING, False, "SizingInvalid", "nothing is rolled out until the spec is fixed",
                                generation)
    elif weights is not None and weights["status"] != "True" and not weights_failed:
        progressing = condition(PROGRESSING, True, "LoadingWeights", weights_message, generation)
    elif rolling or not_ready:
        progressing = condition(PROGRESSING, True, "RollingOut",
                                "waiting for " + ", ".join(not_ready or [f"{r} rollout" for r in rolling]), generation)
    else:
        progressing = condition(PROGRESSING, False, "Complete", "all roles are rolled out", generation)

    if waiting_for_weights and not sizing_error:
        ready = condition(READY, False, "WaitingForWeights",
                          "thinker and talker start once the weights are cached: " + weights_message, generation)
    elif all_ready:
        ready = condition(READY, True, "AllReplicasReady",
                          ", ".join(f"{r} {o.ready}/{o.desired}" for r, o in roles.items()), generation)
    elif not roles:
        ready = condition(READY, False, "NoReplicas", "nothing is deployed yet", generation)
    else:
        reason = next((problems[r].reason for r in roles if r in problems), "ReplicasNotReady")
        ready = condition(READY, False, reason, ", ".join(not_ready), generation)
    return [ready, progressing, degraded, sizing] + ([weights] if weights else [])


def merge_conditions(previous: list[dict[str, Any]], new: list[dict[str, Any]], now: str) -> list[dict[str, Any]]:
    """Keep lastTransitionTime when a condition's status did not change."""
    before = {c.get("type"): c for c in previous or []}
    merged = []
    for cond in new:
        old = before.get(cond["type"])
        changed = old is None or old.get("status") != cond["status"]
        merged.append({**cond, "lastTransitionTime": now if changed else old.get("lastTransitionTime", now)})
    return merged


def condition_events(previous: list[dict[str, Any]], new: list[dict[str, Any]],
                     weights_warnings: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(Event type, condition) for each condition worth an Event: one whose status or reason
    changed, or a warning on its first report. A first report that is fine (SizingValid=True,
    Ready=False while pods start) is in the status already; an Event for each would be four
    writes per new object, most of the operator's writes in a burst."""
    before = {c.get("type"): c for c in previous or []}
    events = []
    for cond in new:
        if cond["type"] not in (READY, SIZING_VALID, DEGRADED, WEIGHTS_READY):
            continue
        warn = (cond["type"] == DEGRADED and cond["status"] == "True") or \
               (cond["type"] == SIZING_VALID and cond["status"] == "False") or \
               (cond["type"] == WEIGHTS_READY and cond["reason"] in weights_warnings)
        was = before.get(cond["type"])
        changed = was is not None and (was.get("status"), was.get("reason")) != (cond["status"], cond["reason"])
        if changed or (was is None and warn):
            events.append(("Warning" if warn else "Normal", cond))
    return events
