"""The OmniDeployment's conditions from what a reconcile observed (pure).

Ready, Progressing, Degraded, SizingValid and WeightsReady say what the operator sees; Reconciling
and Stalled say the same in the kstatus conventions (sigs.k8s.io/cli-utils), which Flux's `wait` and
`healthChecks`, kpt and Config Sync read instead: Reconciling=True while the operator still
converges, Stalled=True when it cannot get further without a change (docs/gitops.md has the table).

What goes into the status is built through the typed models of omni_operator.api.status;
the reconciler does the I/O around it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omni_operator.api.status import Condition, RoleStatus
from omni_operator.controller.pod_problems import NEEDS_A_CHANGE, PodProblem

READY, PROGRESSING, DEGRADED, SIZING_VALID = "Ready", "Progressing", "Degraded", "SizingValid"
WEIGHTS_READY = "WeightsReady"
RECONCILING, STALLED = "Reconciling", "Stalled"  # kstatus


@dataclass(frozen=True)
class ApplyFailure:
    """Why a plan was not applied. `lasting`: the apiserver refused it (validation, admission, a name
    someone else holds, an API it does not serve), so the same plan fails again until something
    changes; otherwise (a write conflict, a child still being deleted, a server error) a retry may pass."""

    message: str
    lasting: bool


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
                       invalid_spec: bool, apply_failure: ApplyFailure | None,
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
    elif apply_failure:
        degraded = condition(DEGRADED, True, "ApplyFailed", apply_failure.message, generation)
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

    pods_stuck = next((problems[r].reason for r in roles if r in problems and problems[r].reason in NEEDS_A_CHANGE),
                      None)
    stuck = _stalled_by(sizing, apply_failure, weights_failed, weights_message, pods_stuck, not_ready)
    kstatus = kstatus_conditions(ready, progressing, degraded, stuck, generation)
    return [ready, progressing, degraded, sizing, *kstatus] + ([weights] if weights else [])


def kstatus_conditions(ready: dict[str, Any], progressing: dict[str, Any], degraded: dict[str, Any],
                       stuck: tuple[str, str] | None, generation: int | None) -> list[dict[str, Any]]:
    """Reconciling and Stalled, never both True (kstatus reads Reconciling first): Stalled=True with
    `stuck` (reason, message); else Reconciling=True with whatever keeps the object from Ready, or the
    rollout, scaling or weights still under way; both False once it is Ready and settled."""
    if stuck is not None:
        return [condition(RECONCILING, False, "Stalled",
                          "the operator cannot get further without a change (see Stalled)", generation),
                condition(STALLED, True, *stuck, generation)]
    if progressing["status"] == "True":
        busy = progressing
    elif ready["status"] != "True":
        busy = ready
    elif degraded["status"] == "True":  # a write that may pass on the next try
        busy = degraded
    else:
        return [condition(RECONCILING, False, "Reconciled", "every role is rolled out and ready", generation),
                condition(STALLED, False, "AsExpected", "", generation)]
    return [condition(RECONCILING, True, busy["reason"], busy["message"], generation),
            condition(STALLED, False, "AsExpected", "", generation)]


def _stalled_by(sizing: dict[str, Any], apply_failure: ApplyFailure | None, weights_failed: bool,
                weights_message: str, pods_stuck: str | None, not_ready: list[str]) -> tuple[str, str] | None:
    """(reason, message) when the operator cannot get further without a change to the spec or to
    the cluster: retrying the same plan fails the same way. A transient apply failure, pods waiting
    for a node (a cluster autoscaler may bring one) and pods starting are not stalled."""
    if sizing["status"] == "False":
        return sizing["reason"], sizing["message"]
    if apply_failure is not None and apply_failure.lasting:
        return "ApplyFailed", apply_failure.message
    if weights_failed:
        return "WeightsFailed", weights_message
    if pods_stuck is not None:
        return pods_stuck, ", ".join(not_ready)
    return None


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
