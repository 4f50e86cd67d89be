"""What every child of an OmniDeployment carries: its name, labels, owner reference, and
the inputs every renderer takes (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omni_operator import __version__
from omni_operator.api.resource import API_VERSION, KIND
from omni_operator.api.spec import OmniDeploymentSpec, RoleSpec
from omni_operator.sizing.replicas import DeploymentSizing

APP_NAME = "qwen3-omni"


MANAGER = "omni-operator"


ROLES = ("thinker", "talker", "gateway")


HTTP_PORT = {"thinker": 8000, "talker": 8000, "gateway": 8080}


METRICS_PORT = 9400


MASTER_PORT = 29500


DEFAULT_IMAGE_REPOSITORY = "ghcr.io/qwen3-omni"


REPLICA_LABEL = "omni.qwen.ai/replica"


POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"


@dataclass(frozen=True)
class Owner:
    """The OmniDeployment the children belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


@dataclass(frozen=True)
class ModelMount:
    """How the thinker and talker pods see the weights: env, volumes and mounts (a read-only volume)."""

    env: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]


@dataclass(frozen=True)
class RenderInput:
    owner: Owner
    spec: OmniDeploymentSpec
    sizing: DeploymentSizing
    replicas: dict[str, int]  # desired replicas per role
    # Where the weights are; None while no complete copy exists: thinker and talker are not rendered.
    model_mount: ModelMount | None
    image_repository: str = DEFAULT_IMAGE_REPOSITORY
    image_tag: str = __version__
    extra_labels: dict[str, str] = field(default_factory=dict)


def names(name: str) -> dict[str, str]:
    return {
        "thinker": f"{name}-thinker",
        "thinker-headless": f"{name}-thinker-headless",
        "talker": f"{name}-talker",
        "talker-headless": f"{name}-talker-headless",
        "gateway": f"{name}-gateway",
    }


def thinker_statefulset_name(name: str, replica: int | None) -> str:
    """One StatefulSet for single-node replicas; one per replica when a replica spans nodes."""
    return f"{name}-thinker" if replica is None else f"{name}-thinker-{replica}"


def selector_labels(name: str, role: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": role}


def common_labels(name: str, role: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    labels = dict(extra or {})
    labels.update(selector_labels(name, role))
    labels.update({"app.kubernetes.io/part-of": APP_NAME, "app.kubernetes.io/managed-by": MANAGER})
    return labels


def instance_selector(name: str) -> str:
    """Label selector (string form) for everything the operator made for one OmniDeployment."""
    return (f"app.kubernetes.io/name={APP_NAME},app.kubernetes.io/instance={name},"
            f"app.kubernetes.io/managed-by={MANAGER}")


def role_selector(name: str, role: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name, role).items())


def object_meta(inp: RenderInput, name: str, role: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta_labels = common_labels(inp.owner.name, role, inp.extra_labels)
    meta_labels.update(labels or {})
    return {"name": name, "namespace": inp.owner.namespace, "labels": meta_labels,
            "ownerReferences": [inp.owner.reference()]}


def image_for(inp: RenderInput, role: str, role_spec: RoleSpec) -> str:
    return role_spec.image or f"{inp.image_repository}/{role}:{inp.image_tag}"


def served_model_name(inp: RenderInput) -> str:
    return inp.spec.model_repo or inp.owner.name


def initial_replicas(spec: OmniDeploymentSpec) -> dict[str, int]:
    """Replicas before any autoscaling decision: spec.replicas pins the thinker, else minReplicas."""
    replicas = {"thinker": spec.replicas if spec.replicas is not None else spec.thinker.min_replicas,
                "gateway": spec.gateway.min_replicas}
    talker = spec.effective_talker
    replicas["talker"] = talker.min_replicas if talker else 0
    return replicas


def gpus_for(sizing: DeploymentSizing, replicas: dict[str, int]) -> int:
    total = sizing.thinker.gpus_per_replica * replicas.get("thinker", 0)
    if sizing.talker is not None:
        total += sizing.talker.gpus_per_replica * replicas.get("talker", 0)
    return total
