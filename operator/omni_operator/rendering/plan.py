"""Plan: one OmniDeployment -> validated spec, sizing and the full set of child objects.

Pure. The operator's handlers and the offline `omni-operator render` share it,
so what a user previews is exactly what the operator applies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from omni_operator.api.resource import check_name
from omni_operator.api.spec import OmniDeploymentSpec, describe_validation_error, parse_spec
from omni_operator.rendering import weight_cache
from omni_operator.rendering.autoscalers import render_autoscalers
from omni_operator.rendering.meta import Owner, RenderInput, gpus_for, initial_replicas
from omni_operator.rendering.roles import render_gateway, render_talker, render_thinker
from omni_operator.rendering.services import render_pdbs, render_services
from omni_operator.rendering.weight_cache import LiveWeights, WeightsDecision
from omni_operator.sizing.replicas import DeploymentSizing, size_deployment

# Offline renders have no apiserver-assigned uid; this one makes that obvious.
OFFLINE_UID = "00000000-0000-0000-0000-000000000000"

# A digest of everything rendered for a child, on the child. The reconciler writes a child whose
# live copy lacks a rendered field or value; this makes a field that the plan stops rendering
# a difference too (the apply then removes it).
RENDERED_ANNOTATION = "omni.qwen.ai/rendered"


class PlanError(Exception):
    """The spec can't be turned into objects. `invalid`: bad input; otherwise it does not fit."""

    def __init__(self, message: str, *, invalid: bool, sizing: DeploymentSizing | None = None):
        super().__init__(message)
        self.invalid = invalid
        self.sizing = sizing


@dataclass(frozen=True)
class Plan:
    spec: OmniDeploymentSpec
    sizing: DeploymentSizing
    replicas: dict[str, int]
    objects: list[dict[str, Any]]
    weights: WeightsDecision
    # Live objects this plan does not render but that must not be pruned yet:
    # an older cache still mounted, workloads held until weights are ready.
    keep: frozenset[tuple[str, str]] = frozenset()

    @property
    def gpus(self) -> int:
        return gpus_for(self.sizing, self.replicas)


def clamp_replicas(spec: OmniDeploymentSpec, wanted: dict[str, int] | None) -> dict[str, int]:
    """Replicas to render: the autoscaler's wish within min..max, spec.replicas pinning the thinker."""
    replicas = initial_replicas(spec)
    if not wanted:
        return replicas
    bounds = {"thinker": spec.thinker, "gateway": spec.gateway}
    talker = spec.effective_talker
    if talker is not None:
        bounds["talker"] = talker
    for role, role_spec in bounds.items():
        if role in wanted and not (role == "thinker" and spec.replicas is not None):
            replicas[role] = max(role_spec.min_replicas, min(role_spec.max_replicas, wanted[role]))
    return replicas


def check_gpu_budget(spec: OmniDeploymentSpec, sizing: DeploymentSizing) -> None:
    """The budget caps what the autoscaler adds; the minimum replicas run whatever it says,
    so a budget below them could never be kept (admission can't tell: it needs the sizing)."""
    budget = spec.autoscaling.gpu_budget
    floor = initial_replicas(spec)
    needed = gpus_for(sizing, floor)
    if budget is not None and needed > budget:
        parts = [f"{role} {floor[role]} x {s.gpus_per_replica} GPU(s)"
                 for role, s in (("thinker", sizing.thinker), ("talker", sizing.talker)) if s is not None]
        raise PlanError(f"spec.autoscaling.gpuBudget {budget} is below the {needed} GPUs the minimum replicas hold "
                        f"({', '.join(parts)}): raise the budget or lower minReplicas", invalid=True)


def make_plan(name: str, namespace: str, uid: str, raw_spec: dict[str, Any],
              replicas: dict[str, int] | None = None, *, image_repository: str | None = None,
              image_tag: str | None = None, live_weights: LiveWeights | None = None,
              live_roles: frozenset[tuple[str, str]] = frozenset(), generation: int | None = None) -> Plan:
    """`live_weights`: what the cluster holds (None renders offline, as if the requested cache were
    complete); `live_roles`: the live thinker/talker workloads, kept while the weights are not ready."""
    try:
        check_name(name)
        spec = parse_spec(raw_spec)
    except ValidationError as err:
        raise PlanError(describe_validation_error(err), invalid=True) from None
    except ValueError as err:
        raise PlanError(str(err), invalid=True) from None
    sizing = size_deployment(spec)
    if not sizing.fits:
        raise PlanError(sizing.reason, invalid=False, sizing=sizing)
    check_gpu_budget(spec, sizing)
    chosen = clamp_replicas(spec, replicas)
    extra = {}
    if image_repository:
        extra["image_repository"] = image_repository
    if image_tag:
        extra["image_tag"] = image_tag
    if live_weights is None:
        live_weights = offline_weights(name, spec)
    decision = weight_cache.decide(name, spec, live_weights, generation)
    inp = RenderInput(owner=Owner(name, namespace, uid), spec=spec, sizing=sizing, replicas=chosen,
                      model_mount=decision.mount, **extra)
    cache_objects = weight_cache.render_cache(inp, decision.desired_key) if decision.desired_key else []
    objects = render_all(inp)
    objects[_first_workload(objects):_first_workload(objects)] = cache_objects  # PVC and Job before the pods
    for obj in objects:
        _stamp(obj)
    keep = {(kind, claim) for claim in decision.keep_claims for kind in ("PersistentVolumeClaim", "Job")}
    if decision.hold_roles:
        keep |= live_roles
    return Plan(spec=spec, sizing=sizing, replicas=chosen, objects=objects, weights=decision, keep=frozenset(keep))


def render_all(inp: RenderInput) -> list[dict[str, Any]]:
    """Every child object, Services first so StatefulSet pods get DNS from the start."""
    return [*render_services(inp), *render_thinker(inp), *render_talker(inp), *render_gateway(inp),
            *render_pdbs(inp), *render_autoscalers(inp)]


def _stamp(obj: dict[str, Any]) -> None:
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    obj["metadata"].setdefault("annotations", {})[RENDERED_ANNOTATION] = digest


def _first_workload(objects: list[dict[str, Any]]) -> int:
    return next((i for i, o in enumerate(objects) if o["kind"] not in ("Service",)), len(objects))


def offline_weights(name: str, spec: OmniDeploymentSpec) -> LiveWeights:
    """A complete cache of the requested revision: what the roles look like once it is filled."""
    if spec.model.pvc:
        return LiveWeights()
    key = weight_cache.cache_key(spec)
    return LiveWeights(caches={key: weight_cache.CacheState(key=key, claim=weight_cache.cache_name(name, key),
                                                       pvc_phase="Bound", job="complete")})


def plan_offline(resource: dict[str, Any], namespace: str | None = None) -> Plan:
    """Plan for a custom resource read from a file (no uid yet)."""
    meta = resource.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise PlanError("metadata.name is required", invalid=True)
    ns = meta.get("namespace") or namespace or "default"
    return make_plan(name, ns, meta.get("uid") or OFFLINE_UID, resource.get("spec") or {})

