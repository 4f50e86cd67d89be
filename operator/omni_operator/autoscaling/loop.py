"""The autoscaling loop: scrape each ready pod's /metrics, decide, write replicas.

The decision itself is pure (``omni_operator.autoscaling.policy.decide``); this module
only gathers its inputs and applies its output. The decided replicas go to the
OmniDeployment's status (the record the reconciler renders from, so the two
never disagree) and straight to the workload's scale subresource, under the
operator's one field manager.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from pydantic import ValidationError

from omni_operator.api.resource import KIND
from omni_operator.api.spec import AutoscalingMode, OmniDeploymentSpec, parse_spec
from omni_operator.api.status import RoleStatus, ScaleDecision
from omni_operator.autoscaling.policy import (Decision, History, Policy, RoleState, decide, parse_gateway_waiting,
                                              parse_pod_metrics)
from omni_operator.controller.drift import parse_timestamp
from omni_operator.controller.pod_problems import pod_ready, unschedulable
from omni_operator.kube import Kube, KubeError
from omni_operator.rendering.meta import METRICS_PORT, POD_INDEX_LABEL, names, thinker_statefulset_name

log = logging.getLogger(__name__)

MAX_DECISIONS_KEPT = 10
SCALED_ROLES = ("thinker", "talker", "gateway")
SCALED_KINDS = ("StatefulSet", "Deployment")  # whose scale subresource it writes (_scale_target)


def fetch_metrics(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None


def _metrics_url(pod: dict[str, Any]) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = METRICS_PORT
    for container in pod["spec"].get("containers", []):
        for p in container.get("ports", []):
            if p.get("name") == "metrics":
                port = p["containerPort"]
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def _operator_scaled(resource: dict[str, Any]) -> bool:
    """The operator's own loop decides replicas (not an HPA, KEDA, or nobody)."""
    mode = ((resource.get("spec") or {}).get("autoscaling") or {}).get("mode", AutoscalingMode.OPERATOR.value)
    return mode == AutoscalingMode.OPERATOR.value and not resource["metadata"].get("deletionTimestamp")


def startup_seconds(pods: list[dict[str, Any]]) -> float | None:
    """How long the role's ready pods took from creation to Ready (the median): what a new
    replica costs in time before it serves. None when no pod tells."""
    took = []
    for pod in pods:
        created = parse_timestamp(pod["metadata"].get("creationTimestamp"))
        ready = next((c for c in (pod.get("status") or {}).get("conditions", [])
                      if c.get("type") == "Ready" and c.get("status") == "True"), None)
        became = parse_timestamp(ready.get("lastTransitionTime")) if ready else None
        if created is not None and became is not None and became >= created:
            took.append(became - created)
    return statistics.median(took) if took else None


def policy_for(spec: OmniDeploymentSpec, role: str, startup: float | None = None) -> Policy:
    scaling = spec.autoscaling
    role_spec = {"thinker": spec.thinker, "talker": spec.effective_talker, "gateway": spec.gateway}[role]
    policy = Policy(target_per_replica=getattr(scaling.target_queue_depth, role),
                    min_replicas=role_spec.min_replicas, max_replicas=role_spec.max_replicas,
                    scale_up_window=scaling.scale_up_stabilization_seconds,
                    scale_down_window=scaling.scale_down_stabilization_seconds,
                    max_step=scaling.max_step, scale_to_zero=scaling.scale_to_zero)
    return policy if startup is None else dataclasses.replace(policy, startup_seconds=startup)


class Autoscaler:
    def __init__(self, kube: Kube, enqueue: Callable[[str, str], None],
                 pods: Callable[[str, str], list[dict[str, Any]]], *, scrape_timeout: float = 2.0,
                 fetch: Callable[[str, float], str | None] = fetch_metrics, clock: Callable[[], float] = time.monotonic):
        """`pods(namespace, name)`: an OmniDeployment's pods as the watch keeps them (a pass
        makes no pod LIST)."""
        self.kube = kube
        self.pods = pods
        self.enqueue = enqueue
        self.scrape_timeout = scrape_timeout
        self.fetch = fetch
        self.clock = clock
        self.histories: dict[tuple[str, str, str], History] = {}
        self._specs: dict[tuple[str | None, int | None], OmniDeploymentSpec | None] = {}
        self._blocked: dict[tuple[str, str, str], str | None] = {}  # last reported block per role
        self.next_tick: dict[tuple[str, str], float] = {}
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="scrape")

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event, resources: Callable[[], list[dict[str, Any]]]) -> None:
        """Every second, tick the OmniDeployments that are due; `resources` returns the latest
        version of each (the watch keeps them, so this makes no LIST calls)."""
        while not stop.wait(1.0):
            try:
                self.run_once(resources())
            except Exception:  # the loop must outlive any one bad object or API hiccup
                if stop.is_set():
                    return  # the process is stopping (its scrape pool too): a pass cut short is no failure
                log.exception("autoscaling pass failed")

    def run_once(self, resources: list[dict[str, Any]]) -> None:
        now = self.clock()
        due = []
        for resource in resources:
            key = (resource["metadata"]["namespace"], resource["metadata"]["name"])
            if now >= self.next_tick.get(key, 0.0) and _operator_scaled(resource):
                poll = ((resource.get("spec") or {}).get("autoscaling") or {}).get("pollSeconds", 5)
                self.next_tick[key] = now + poll
                due.append(resource)
        for resource in due:
            meta = resource["metadata"]
            self.tick(resource, self.pods(meta["namespace"], meta["name"]))
        live = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in resources}
        current_specs = {(r["metadata"].get("uid"), r["metadata"].get("generation")) for r in resources}
        self._specs = {k: v for k, v in self._specs.items() if k in current_specs}
        for key in [k for k in self.next_tick if k not in live]:  # forget deleted OmniDeployments
            self.next_tick.pop(key)
            for hkey in [h for h in self.histories if h[:2] == key]:
                self.histories.pop(hkey)
                self._blocked.pop(hkey, None)

    # ------------------------------------------------------------------ one OmniDeployment

    def tick(self, resource: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Decision]:
        """Decide for one OmniDeployment that `run_once` found due and operator-scaled."""
        meta = resource["metadata"]
        ns, name = meta["namespace"], meta["name"]
        spec = self._spec(resource)
        if spec is None:
            return {}
        status = resource.get("status") or {}
        sizing = status.get("sizing")
        if not sizing:
            return {}  # nothing sized and running yet: the reconciler goes first

        by_role: dict[str, list[dict]] = {r: [] for r in SCALED_ROLES}
        for pod in pods:
            role = pod["metadata"].get("labels", {}).get("app.kubernetes.io/component")
            if role in by_role:
                by_role[role].append(pod)
        thinker_pods = (sizing.get("thinker") or {}).get("podsPerReplica", 1)
        # Pending shards count against their replica whatever their rank: a replica needs all of them.
        pending = {role: sum(1 for p in role_pods if unschedulable(p) is not None) for role, role_pods in by_role.items()}
        pending["thinker"] = -(-pending["thinker"] // thinker_pods)  # in replicas
        if thinker_pods > 1:  # only rank 0 of a multi-node replica serves and reports load
            by_role["thinker"] = [p for p in by_role["thinker"]
                                  if p["metadata"].get("labels", {}).get(POD_INDEX_LABEL) == "0"]

        pages = self._scrape([p for role in SCALED_ROLES for p in by_role[role] if pod_ready(p)])
        gateway_waiting: dict[str, float] = {}
        for pod in by_role["gateway"]:
            page = pages.get(pod["metadata"]["name"])
            for role, value in (parse_gateway_waiting(page) if page else {}).items():
                gateway_waiting[role] = gateway_waiting.get(role, 0.0) + value

        gpus = {r: (sizing.get(r) or {}).get("gpusPerReplica", 0) for r in ("thinker", "talker")}
        current = {r: (status.get(r) or {}).get("desiredReplicas", 0) for r in SCALED_ROLES}
        now = self.clock()
        decisions: dict[str, Decision] = {}
        for role in SCALED_ROLES:
            if status.get(role) is None or (role == "talker" and spec.effective_talker is None):
                continue
            if role == "thinker" and spec.replicas is not None:
                continue  # pinned through the scale subresource
            loads = [load for p in by_role[role] if pod_ready(p)
                     and (load := parse_pod_metrics(p["metadata"]["name"], pages.get(p["metadata"]["name"]) or "",
                                                    role)) is not None]
            other = {"thinker": "talker", "talker": "thinker"}.get(role)
            state = RoleState(
                current=current[role], ready=(status.get(role) or {}).get("readyReplicas", 0),
                unschedulable=pending[role], gpus_per_replica=gpus.get(role, 0),
                other_roles_gpus=gpus.get(other, 0) * current.get(other, 0) if other else 0,
                gpu_budget=spec.autoscaling.gpu_budget if role != "gateway" else None,
                gateway_waiting=gateway_waiting.get(role, 0.0))
            history = self.histories.setdefault((ns, name, role), History())
            startup = startup_seconds([p for p in by_role[role] if pod_ready(p)])
            decision = decide(now, loads, state, policy_for(spec, role, startup), history)
            if decision.changed(state.current):
                decisions[role] = decision
            self._report_blocked(resource, role, decision)
        if decisions:
            self._apply(resource, spec, decisions, thinker_pods)
        return decisions

    def _report_blocked(self, resource: dict[str, Any], role: str, decision: Decision) -> None:
        """A Warning Event when a role starts wanting more than the GPU pool or budget allows."""
        key = (resource["metadata"]["namespace"], resource["metadata"]["name"], role)
        if decision.blocked == self._blocked.get(key):
            return
        self._blocked[key] = decision.blocked
        if decision.blocked:
            self.kube.create_event(key[0], resource, reason=decision.blocked, type_="Warning",
                                   message=f"{role}: {decision.reason}")

    def _spec(self, resource: dict[str, Any]) -> OmniDeploymentSpec | None:
        """The parsed spec, parsed once per generation (ticks come every few seconds)."""
        meta = resource["metadata"]
        key = (meta.get("uid"), meta.get("generation"))
        if key not in self._specs:
            try:
                self._specs[key] = parse_spec(resource.get("spec") or {})
            except ValidationError:
                self._specs[key] = None
        return self._specs[key]

    def _scrape(self, pods: list[dict[str, Any]]) -> dict[str, str | None]:
        urls = {p["metadata"]["name"]: _metrics_url(p) for p in pods}
        futures = {name: self.pool.submit(self.fetch, url, self.scrape_timeout)
                   for name, url in urls.items() if url}
        return {name: f.result() for name, f in futures.items()}

    def _apply(self, resource: dict[str, Any], spec: OmniDeploymentSpec, decisions: dict[str, Decision],
               thinker_pods: int) -> None:
        meta = resource["metadata"]
        ns, name = meta["namespace"], meta["name"]
        status = resource.get("status") or {}
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        history = list(status.get("lastScaleDecisions") or [])
        patch: dict[str, Any] = {}
        for role, d in decisions.items():
            before = (status.get(role) or {}).get("desiredReplicas", 0)
            patch[role] = RoleStatus(desired_replicas=d.desired).patch()  # the reconciler fills in the rest
            history.append(ScaleDecision(
                time=stamp, role=role, from_replicas=before, to_replicas=d.desired, reason=d.reason[:512],
                arrival_rate=None if d.arrival_rate is None else round(d.arrival_rate, 3),
                service_seconds=None if d.service_seconds is None else round(d.service_seconds, 2)).wire())
        patch["lastScaleDecisions"] = history[-MAX_DECISIONS_KEPT:]
        try:
            # The status carries the decision; the resourceVersion makes a concurrent writer lose, not us.
            self.kube.patch_status(KIND, ns, name, patch, resource_version=meta.get("resourceVersion"))
        except KubeError as err:
            if err.status == 409:
                return  # changed under us: decide again on the next tick with fresh state
            raise
        for role, d in decisions.items():
            target = self._scale_target(spec, name, role, thinker_pods)
            if target is not None:
                self.kube.scale(target[0], ns, target[1], d.desired)
            before = (status.get(role) or {}).get("desiredReplicas", 0)
            self.kube.create_event(ns, resource, reason="ScaledUp" if d.desired > before else "ScaledDown",
                                   message=f"{role} {before} -> {d.desired}: {d.reason}")
            log.info("%s/%s: %s %d -> %d: %s", ns, name, role, before, d.desired, d.reason)
        self.enqueue(ns, name)

    @staticmethod
    def _scale_target(spec: OmniDeploymentSpec, name: str, role: str, thinker_pods: int) -> tuple[str, str] | None:
        if role == "gateway":
            return ("Deployment", names(name)["gateway"])
        if role == "talker":
            return ("StatefulSet", names(name)["talker"])
        if thinker_pods == 1:
            return ("StatefulSet", thinker_statefulset_name(name, None))
        return None  # a multi-node replica is a StatefulSet of its own: the reconciler adds or removes it
