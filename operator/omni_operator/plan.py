"""Plan: one OmniDeployment -> validated spec, sizing and the full set of child objects.

Pure. The operator's handlers and the offline `omni-operator render` share it,
so what a user previews is exactly what the operator applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .api import OmniDeploymentSpec, check_name, describe_validation_error, parse_spec
from .render import Owner, RenderInput, gpus_for, initial_replicas, render_all
from .sizing import DeploymentSizing, size_deployment

# Offline renders have no apiserver-assigned uid; this one makes that obvious.
OFFLINE_UID = "00000000-0000-0000-0000-000000000000"


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


def make_plan(name: str, namespace: str, uid: str, raw_spec: dict[str, Any],
              replicas: dict[str, int] | None = None, *, image_repository: str | None = None,
              image_tag: str | None = None) -> Plan:
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
    chosen = clamp_replicas(spec, replicas)
    extra = {}
    if image_repository:
        extra["image_repository"] = image_repository
    if image_tag:
        extra["image_tag"] = image_tag
    objects = render_all(RenderInput(owner=Owner(name, namespace, uid), spec=spec, sizing=sizing,
                                     replicas=chosen, **extra))
    return Plan(spec=spec, sizing=sizing, replicas=chosen, objects=objects)


def plan_offline(resource: dict[str, Any], namespace: str | None = None) -> Plan:
    """Plan for a custom resource read from a file (no uid yet)."""
    meta = resource.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise PlanError("metadata.name is required", invalid=True)
    ns = meta.get("namespace") or namespace or "default"
    return make_plan(name, ns, meta.get("uid") or OFFLINE_UID, resource.get("spec") or {})

