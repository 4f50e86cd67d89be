"""Reconcile one OmniDeployment: plan (pure) -> apply the difference -> prune -> status.

Level-triggered and idempotent: it reads the current state every time, writes
only what differs from the plan (so a steady-state reconcile makes no write
calls), never touches objects it does not own, and applies nothing at all when
the spec can't be sized.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from omni_operator.api.resource import KIND
from omni_operator.api.spec import AutoscalingMode
from omni_operator.api.status import Condition, OmniDeploymentStatus
from omni_operator.controller import metrics
from omni_operator.controller.cache import ObjectCache
from omni_operator.controller.conditions import (ApplyFailure, RoleObservation, compute_conditions, condition_events,
                                                 merge_conditions, observe_role)
from omni_operator.controller.drift import is_subset, owned_by, parse_timestamp
from omni_operator.controller.pod_problems import PodProblem, failed_create, missing_pods, role_problems
from omni_operator.kube import BUILTIN_KINDS, Kube, KubeError, api_version, holds_created_fields
from omni_operator.rendering import weight_cache
from omni_operator.rendering.meta import ROLES, gpus_for, instance_selector, role_selector
from omni_operator.rendering.plan import Plan, PlanError, make_plan
from omni_operator.sizing.replicas import sizing_status

log = logging.getLogger(__name__)

CHILD_KINDS = ("Service", "PersistentVolumeClaim", "Job", "StatefulSet", "Deployment", "PodDisruptionBudget",
               "HorizontalPodAutoscaler", "ScaledObject")
# Created once and never updated: a Job's template and most of a PVC's spec are immutable,
# and a loader that ran must not run again because the operator's image changed.
CREATE_ONLY_KINDS = ("Job", "PersistentVolumeClaim")
# Created after every other new child of a plan: a child refused is met before a pod exists.
POD_STARTING_KINDS = ("Job", "StatefulSet", "Deployment")
# Of those, the ones whose pods cost something to start in vain: the weight loader (a download)
# and the GPU workloads. The gateway's Deployment (a few CPU pods) is created before them.
COSTLY_POD_KINDS = ("Job", "StatefulSet")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _age(stamp: str | None) -> float:
    """Seconds since a timestamp this operator wrote (0 when there is none)."""
    at = parse_timestamp(stamp)
    return 0.0 if at is None else max(0.0, time.time() - at)


def _component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def wanted_replicas(resource: dict[str, Any]) -> dict[str, int] | None:
    """Replicas the autoscaler last decided (kept in status), when it is the one deciding."""
    spec = resource.get("spec") or {}
    if (spec.get("autoscaling") or {}).get("mode", AutoscalingMode.OPERATOR.value) != AutoscalingMode.OPERATOR.value:
        return None
    status = resource.get("status") or {}
    wanted = {role: (status.get(role) or {}).get("desiredReplicas") for role in ROLES}
    return {role: n for role, n in wanted.items() if isinstance(n, int)} or None


# Every object is reconciled this often, whatever the watches say (a level-triggered safety net).
RESYNC_SECONDS = 60.0

# A role short of ready replicas this long gets its pods read for the reason (pods starting
# normally are not read: a rollout costs no extra calls).
PODS_CHECKED_AFTER = 30.0
# While what the pods show stays the same, each check waits twice as long as the one before,
# up to this many times PODS_CHECKED_AFTER: a thousand objects stuck on Unschedulable pods
# would otherwise each be reconciled again every interval. A spec change starts over.
PODS_CHECK_STRETCH = 4


@dataclass(frozen=True)
class PodCheck:
    """The last look at one object's pods: when, what it found, how long until the next one."""

    at: float  # monotonic
    problems: dict[str, PodProblem]
    interval: float
    generation: int | None


@dataclass
class Outcome:
    """What one reconcile did (for logs, metrics and tests)."""

    applied: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    status_written: bool = False
    failure: ApplyFailure | None = None  # why the plan was not applied
    skipped: str | None = None
    requeue: bool = False  # the object changed under us; reconcile it again
    requeue_after: float | None = None  # a loader is at work: look at its progress again after this

    @property
    def error(self) -> str | None:
        return self.failure.message if self.failure else None


class Reconciler:
    """`cache`: what the watches delivered, the operator's pods included (primed from LISTs before
    the first reconcile). The OmniDeployment, its children and its pods are read from it, so an
    unchanged object costs no API call; a child that is not in the cache is created, and read only
    if its name is taken, so a same-named object of someone else stops the plan."""

    def __init__(self, kube: Kube, cache: ObjectCache, *, image_repository: str | None = None,
                 image_tag: str | None = None, fetch: Callable[[str, float], str | None] | None = None,
                 pods_checked_after: float = PODS_CHECKED_AFTER):
        if not cache.watches_pods:
            raise ValueError("the reconciler reads the operator's pods from its cache: watch them (pods=True)")
        self.kube = kube
        self.cache = cache
        self.pods_checked_after = pods_checked_after
        # (namespace, name) -> the last look at its pods: read at most once per interval, however
        # often the object is reconciled meanwhile.
        self._pods_checked: dict[tuple[str, str], PodCheck] = {}
        self._pods_checked_lock = threading.Lock()
        # (namespace, name) -> the generation whose plan last failed to apply (one reconcile of a
        # key runs at a time: the work queue's guarantee)
        self._failed_plans: dict[tuple[str, str], int | None] = {}
        self.fetch = fetch  # GET a loader's /metrics page; None: progress is not read
        self.image_repository = image_repository
        self.image_tag = image_tag

    # ------------------------------------------------------------------ entry point

    def reconcile(self, namespace: str, name: str) -> Outcome:
        started = time.monotonic()
        outcome = Outcome()
        if not self.cache.primed.is_set():
            raise RuntimeError("the watch cache is not primed yet")  # the work queue retries
        resource = self.cache.omni(namespace, name)
        if resource is None:
            outcome.skipped = "gone"
            metrics.forget(namespace, name)
            with self._pods_checked_lock:
                self._pods_checked.pop((namespace, name), None)
            self._failed_plans.pop((namespace, name), None)
            return outcome
        if resource["metadata"].get("deletionTimestamp"):
            outcome.skipped = "deleting"  # children go with it (owner references)
            return outcome
        try:
            self._reconcile(resource, outcome)
            metrics.RECONCILES.labels(result="error" if outcome.error else "ok").inc()
        except Exception:
            metrics.RECONCILES.labels(result="exception").inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        return outcome

    # ------------------------------------------------------------------ steps

    def _reconcile(self, resource: dict[str, Any], outcome: Outcome) -> None:
        meta = resource["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        plan: Plan | None = None
        sizing_error: str | None = None
        invalid_spec = False
        live = self._live_children(resource)
        live_roles = frozenset(key for key, obj in live.items()
                               if key[0] == "StatefulSet" and _component(obj) in ("thinker", "talker"))
        try:
            plan = make_plan(name, namespace, uid, resource.get("spec") or {}, wanted_replicas(resource),
                             image_repository=self.image_repository, image_tag=self.image_tag,
                             live_weights=self._observe_weights(resource, live), live_roles=live_roles,
                             generation=meta.get("generation"))
        except PlanError as err:
            sizing_error, invalid_spec = str(err), err.invalid

        if plan is not None:
            outcome.requeue_after = plan.weights.poll_after
            # A plan that failed is checked whole before its next try for the same spec: a refusal
            # that stays (a policy, a name held by someone else) then costs dry runs, not a create
            # and delete of children (whose events would bring the next try at once).
            check_all = self._failed_plans.get((namespace, name)) == meta.get("generation")
            outcome.failure = self._apply(plan, live, uid, namespace, outcome, check_all=check_all)
            if outcome.failure is None:
                self._failed_plans.pop((namespace, name), None)
                self._prune(plan, live, uid, namespace, outcome)
            else:
                self._failed_plans[(namespace, name)] = meta.get("generation")
        self._write_status(resource, plan, live, sizing_error, invalid_spec, outcome)

    def _observe_weights(self, resource: dict[str, Any], live: dict) -> weight_cache.LiveWeights:
        """The caches, their loaders and who mounts them: pods are read only while a loader works
        or more than one cache exists, so a settled OmniDeployment costs no extra reads."""
        meta = resource["metadata"]
        recorded = (resource.get("status") or {}).get("weights")
        pods = self._pods(meta["namespace"], meta["name"]) if weight_cache.pods_needed(live, recorded) else []
        observed = weight_cache.observe(live, pods, recorded=recorded)
        urls = weight_cache.loaders_to_scrape(observed) if self.fetch else {}
        if not urls:
            return observed
        progress = {key: p for key, url in urls.items()
                    if (p := weight_cache.parse_progress(self.fetch(url, 2.0))) is not None}
        return replace(observed, progress=progress)

    def _pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return self.cache.pods(namespace, name)

    def _live_children(self, resource: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        meta = resource["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        live = self.cache.children(namespace, name)
        # KEDA's ScaledObjects are not watched (their CRD may not be installed): read them in
        # KEDA mode, and once after any spec change (a switch away from KEDA prunes them); a
        # first generation outside KEDA mode never had one
        keda = ((resource.get("spec") or {}).get("autoscaling") or {}).get("mode") == AutoscalingMode.KEDA.value
        generation = meta.get("generation") or 1
        settled = generation == 1 or (resource.get("status") or {}).get("observedGeneration") == generation
        kinds = tuple(k for k in CHILD_KINDS if k not in self.cache.child_kinds) if keda or not settled else ()
        for kind in kinds:
            for obj in self.kube.list(kind, namespace, instance_selector(name)):
                # List items carry no apiVersion/kind of their own.
                obj.setdefault("kind", kind)
                obj.setdefault("apiVersion", api_version(kind))
                live[(kind, obj["metadata"]["name"])] = obj
                self.cache.observe_child(kind, obj)
        return live

    def _apply(self, plan: Plan, live: dict, uid: str, namespace: str, outcome: Outcome, *,
               check_all: bool = False) -> ApplyFailure | None:
        """Write what differs from the plan, all or nothing. A new child is created (POST), which
        never writes into an object that exists: a name someone else holds shows as a failed
        create, and whatever this reconcile created before it is deleted again. Creates come
        first and those that start pods last, the gateway's cheap ones before the costly ones,
        so a refusal of any other child is met before a pod exists. Every create of costly pods
        but the first, and every change of an existing child when there are several writes, is
        admitted without being stored (dryRun=All) before the first write (`check_all`: every
        write is). A single write, and the steady state, pay for no check."""
        if plan.weights.rerun_loader:  # its PVC is gone: a new Job must fill the new one
            for key in [("Job", o["metadata"]["name"]) for o in plan.objects if o["kind"] == "Job"]:
                if key in live and owned_by(live[key], uid):
                    self.kube.delete("Job", namespace, key[1], uid=live.pop(key)["metadata"].get("uid"))
        current: dict[tuple[str, str], dict[str, Any] | None] = {_key(o): live.get(_key(o)) for o in plan.objects}
        writes = [o for o in plan.objects if _needs_write(o, current[_key(o)])]
        creates = [o for o in writes if current[_key(o)] is None]
        starting = sorted((o for o in creates if o["kind"] in POD_STARTING_KINDS),
                          key=lambda o: o["kind"] in COSTLY_POD_KINDS)
        costly = [o for o in starting if o["kind"] in COSTLY_POD_KINDS]
        changes = [o for o in writes if current[_key(o)] is not None]
        for obj in writes if check_all else costly[1:] + (changes if len(writes) > 1 else []):
            key = _key(obj)
            try:
                if current[key] is not None:
                    self.kube.apply(obj, dry_run=True)
                elif self.kube.create(obj, dry_run=True) is None and (error := self._taken(key, namespace, uid,
                                                                                            current, live)):
                    return error
            except KubeError as err:
                return _apply_error(obj, err, checked=True)
        created: list[dict[str, Any]] = []
        for obj in [o for o in creates if o not in starting] + starting + changes:
            key = _key(obj)
            if not _needs_write(obj, current[key]):
                continue  # found to be ours and as planned
            try:
                applied = self.kube.create(obj) if current[key] is None else self._change(obj, current[key], namespace)
                if applied is None:  # the name is taken
                    if error := self._taken(key, namespace, uid, current, live):
                        self._undo(created, live, namespace, outcome)
                        return error
                    if not _needs_write(obj, current[key]):
                        continue
                    applied = self._change(obj, current[key], namespace)
                elif current[key] is None:
                    created.append(applied)
            except KubeError as err:
                self._undo(created, live, namespace, outcome)
                return _apply_error(obj, err, checked=current[key] is None)
            live[key] = applied
            self.cache.observe_child(key[0], applied)
            outcome.applied.append(f"{obj['kind']}/{obj['metadata']['name']}")
        return None

    def _taken(self, key: tuple[str, str], namespace: str, uid: str, current: dict, live: dict
               ) -> ApplyFailure | None:
        """A create found the name taken: read whose it is. Ours (written by a previous leader and
        not shown by the watch yet) becomes the live copy; someone else's stops the plan."""
        found = self.kube.get(key[0], namespace, key[1])
        if found is None:
            return ApplyFailure(f"{key[0]} {namespace}/{key[1]} is being deleted; it is created again once it is gone",
                                lasting=False)
        if not owned_by(found, uid):
            return ApplyFailure(_not_owned(key, namespace), lasting=True)
        current[key] = live[key] = found
        return None

    def _change(self, obj: dict[str, Any], found: dict[str, Any], namespace: str) -> dict[str, Any]:
        """Apply a change to a child that exists. The first change of a child we created moves
        its create's fields to our apply first, so that a field the plan dropped goes."""
        if holds_created_fields(found):
            self.kube.own_created_fields(obj["kind"], namespace, obj["metadata"]["name"])
        return self.kube.apply(obj)

    def _undo(self, created: list[dict[str, Any]], live: dict, namespace: str, outcome: Outcome) -> None:
        """Delete what this reconcile created before a write failed: all or nothing."""
        for obj in created:
            self._delete_child(obj["kind"], namespace, obj)
            live.pop(_key(obj), None)
            outcome.applied.remove(f"{obj['kind']}/{obj['metadata']['name']}")

    def _prune(self, plan: Plan, live: dict, uid: str, namespace: str, outcome: Outcome) -> None:
        planned = {(o["kind"], o["metadata"]["name"]) for o in plan.objects}
        for key, obj in list(live.items()):
            if key in planned or key in plan.keep or not owned_by(obj, uid):
                continue
            if self._delete_child(key[0], namespace, obj):
                outcome.pruned.append(f"{key[0]}/{key[1]}")
            live.pop(key)

    def _delete_child(self, kind: str, namespace: str, obj: dict[str, Any]) -> bool:
        """Delete a child we own, only if it is still the one we saw; the cache forgets it at once."""
        deleted = self.kube.delete(kind, namespace, obj["metadata"]["name"], uid=obj["metadata"].get("uid"))
        self.cache.observe_child(kind, obj, deleted=True)
        return deleted

    # ------------------------------------------------------------------ status

    def _observe(self, plan: Plan | None, live: dict, previous: dict[str, Any]) -> dict[str, RoleObservation]:
        roles: dict[str, RoleObservation] = {}
        workloads = {role: [o for (kind, _), o in sorted(live.items())
                            if kind in ("StatefulSet", "Deployment") and _component(o) == role] for role in ROLES}
        for role in ROLES:
            if plan is not None:
                if role == "talker" and plan.sizing.talker is None:
                    continue
                desired = plan.replicas[role]
                pods = plan.sizing.thinker.pods_per_replica if role == "thinker" else 1
                if plan.spec.external_autoscaler and pods == 1 and workloads[role]:
                    # An HPA or KEDA decides these replicas: what it asked of the workload is the target.
                    desired = sum((w.get("spec") or {}).get("replicas", 1) for w in workloads[role])
            else:
                if not workloads[role]:
                    continue
                # Spec can't be planned: report what is running against what was last desired.
                desired = (previous.get(role) or {}).get("desiredReplicas", 0)
                pods = ((previous.get("sizing") or {}).get(role) or {}).get("podsPerReplica", 1)
            roles[role] = observe_role(desired, workloads[role], pods)
        return roles

    def _pod_problems(self, resource: dict[str, Any], roles: dict[str, RoleObservation], live: dict,
                      outcome: Outcome) -> dict[str, PodProblem]:
        """Why roles are short of ready replicas, read from their pods (and from the events of a
        StatefulSet that could not create them) once Ready has been False for `pods_checked_after`
        seconds; until then, a look again when that time has passed."""
        meta = resource["metadata"]
        key = (meta["namespace"], meta["name"])
        if all(o.ready >= o.desired for o in roles.values()):
            with self._pods_checked_lock:
                self._pods_checked.pop(key, None)
            return {}
        ready = next((c for c in (resource.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"),
                     None)
        waited = _age(ready.get("lastTransitionTime")) if ready and ready.get("status") == "False" else 0.0
        if waited < self.pods_checked_after:
            later = self.pods_checked_after - waited + 1.0
            outcome.requeue_after = min(outcome.requeue_after or later, later)
            return {}
        now = time.monotonic()
        with self._pods_checked_lock:
            checked = self._pods_checked.get(key)
        if checked is not None and checked.generation != meta.get("generation"):
            checked = None  # the spec changed: look afresh
        if checked is not None and now - checked.at < checked.interval:
            later = checked.at + checked.interval - now + 0.1
            outcome.requeue_after = min(outcome.requeue_after or later, later)
            return checked.problems
        pods = self._pods(meta["namespace"], meta["name"])
        problems = role_problems(pods, self._failed_creates(meta["namespace"], roles, live))
        interval = self.pods_checked_after
        if checked is not None and checked.problems == problems:
            interval = min(checked.interval * 2, self.pods_checked_after * PODS_CHECK_STRETCH)
        with self._pods_checked_lock:
            self._pods_checked[key] = PodCheck(now, problems, interval, meta.get("generation"))
        outcome.requeue_after = min(outcome.requeue_after or interval, interval)
        return problems

    def _failed_creates(self, namespace: str, roles: dict[str, RoleObservation], live: dict) -> dict[str, PodProblem]:
        """role -> why its workload could not create pods. A StatefulSet says so only in its events,
        read for one with fewer pods than replicas; a Deployment in its ReplicaFailure condition."""
        failures: dict[str, PodProblem] = {}
        for (kind, name), obj in sorted(live.items()):
            role = _component(obj)
            if kind not in ("StatefulSet", "Deployment") or role not in roles or role in failures \
                    or roles[role].ready >= roles[role].desired:
                continue
            events = []
            if kind == "StatefulSet" and missing_pods(obj):
                events = self.kube.list("Event", namespace, field_selector=(
                    f"involvedObject.kind=StatefulSet,involvedObject.name={name},reason=FailedCreate,type=Warning"))
            if (problem := failed_create(obj, events)) is not None:
                failures[role] = problem
        return failures

    def _write_status(self, resource: dict[str, Any], plan: Plan | None, live: dict, sizing_error: str | None,
                      invalid_spec: bool, outcome: Outcome) -> None:
        meta = resource["metadata"]
        previous = resource.get("status") or {}
        roles = self._observe(plan, live, previous)
        problems = self._pod_problems(resource, roles, live, outcome)
        generation = meta.get("generation")
        weights_decision = plan.weights if plan else None
        conditions = compute_conditions(
            generation=generation, sizing_error=sizing_error,
            sizing_reason=plan.sizing.reason if plan else "", invalid_spec=invalid_spec,
            apply_failure=outcome.failure, roles=roles,
            weights=weights_decision.condition if weights_decision else None,
            weights_failed=bool(weights_decision and weights_decision.failed),
            waiting_for_weights=bool(weights_decision and weights_decision.mount is None), problems=problems)
        planned: dict[str, Any] = {}
        if plan is not None:
            # GPUs of the replicas actually asked for (an HPA may have chosen other counts than the plan).
            gpus = gpus_for(plan.sizing, {role: obs.desired for role, obs in roles.items()})
            planned = dict(sizing=sizing_status(plan.sizing, gpus), gpus=gpus, replicas=roles["thinker"].current,
                           selector=role_selector(meta["name"], "thinker"), weights=plan.weights.status)
        update = OmniDeploymentStatus(
            observed_generation=generation,
            conditions=[Condition.model_validate(c) for c in
                        merge_conditions(previous.get("conditions") or [], conditions, _now())],
            **{role: roles[role].as_status(problems.get(role)) for role in ROLES if role in roles}, **planned)
        # A merge patch of what this reconcile owns (the autoscaler's decisions stay); null
        # removes a role that no longer exists (e.g. talker after a variant change), and a
        # role's reason once its problem is gone.
        patch = update.patch() | {role: None for role in ROLES if role not in roles}
        for role in roles:
            patch[role] = {"reason": None, "message": None} | patch[role]
        status = {k: v for k, v in (previous | patch).items() if v is not None}
        metrics.record_status(meta["namespace"], meta["name"], sizing_error is None, roles,
                              weights_ready=weights_decision.condition["status"] == "True" if weights_decision else None,
                              weights_failed=bool(weights_decision and weights_decision.failed))

        if _comparable(status) == _comparable(previous):
            return
        # The resourceVersion guards the autoscaler's decisions: if it wrote meanwhile, we re-read.
        try:
            written = self.kube.patch_status(KIND, meta["namespace"], meta["name"], patch,
                                             resource_version=meta.get("resourceVersion"))
        except KubeError as err:
            if err.status != 409:
                raise
            # our copy was stale: take the current one, then decide again
            fresh = self.kube.get(KIND, meta["namespace"], meta["name"])
            if fresh is not None:
                self.cache.observe_omni(fresh)
            outcome.requeue = True
            return
        if written:
            self.cache.observe_omni(written)
        outcome.status_written = True
        for type_, cond in condition_events(previous.get("conditions") or [], conditions, weight_cache.WARNING_REASONS):
            self.kube.create_event(meta["namespace"], resource, reason=cond["reason"],
                                   message=f"{cond['type']}={cond['status']}: {cond['message']}", type_=type_)


_PROVIDERS = {"ScaledObject": "KEDA, https://keda.sh/docs/latest/deploy/"}


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _needs_write(obj: dict[str, Any], found: dict[str, Any] | None) -> bool:
    return found is None or not (is_subset(obj, found) or obj["kind"] in CREATE_ONLY_KINDS)


# Answers that stay the same for the same object until someone changes it or the cluster: bad
# request, forbidden (admission, quota, RBAC), invalid. A conflict, throttling or a server error may
# pass on the next try.
_REFUSALS = (400, 403, 422)


def _apply_error(obj: dict[str, Any], err: KubeError, *, checked: bool) -> ApplyFailure:
    """Degraded's message for a child the apiserver did not take. `checked`: refused by a dry
    run or by its create, so nothing of the plan was kept (what was created before is deleted)."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if err.status == 404 and kind not in BUILTIN_KINDS:
        return ApplyFailure(f"the {obj['apiVersion']} {kind} API is not served by this cluster, so "
                            f"{kind} {name} cannot be created: install its provider "
                            f"({_PROVIDERS.get(kind, 'its CRD')}) or choose another spec.autoscaling.mode",
                            lasting=True)
    lasting = err.status in _REFUSALS
    if checked:
        return ApplyFailure(f"the apiserver refused {kind} {name}, so nothing was applied: {err.message}", lasting)
    return ApplyFailure(f"applying {kind} {name} failed: {err.message}", lasting)


def _not_owned(key: tuple[str, str], namespace: str) -> str:
    return (f"{key[0]} {namespace}/{key[1]} already exists and is not owned by this OmniDeployment; "
            "rename one of them (nothing was changed)")


def _comparable(status: dict[str, Any]) -> dict[str, Any]:
    """Status without timestamps and without keys set to None (absent and null are the same)."""
    out = {k: v for k, v in status.items() if v is not None}
    out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                         for c in status.get("conditions") or []]
    for key in ("sizing", "weights", *ROLES):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if v is not None}
    return out
