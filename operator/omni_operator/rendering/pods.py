"""The pod pieces every role shares: container, probes, environment, security context,
scratch volumes and node-pool placement (pure)."""

from __future__ import annotations

import json
import math
from typing import Any

from omni_operator.api.spec import RoleSpec, WorkloadProfile
from omni_operator.rendering.meta import (HTTP_PORT, METRICS_PORT, RenderInput, common_labels, image_for,
                                          served_model_name)
from omni_runtime.config import Env

RUN_AS_USER = 1000


# Runtime containers have a read-only root filesystem: they write to a /tmp emptyDir and (thinker,
# talker) to an emptyDir home that holds the caches of vLLM, torch, triton and CUDA.
SCRATCH_HOME = "/home/omni"


# Weight loading from a volume (the operator's cache or the user's PVC): ~70 GB at a few hundred MB/s.
STARTUP_BUDGET_SECONDS = 1200


STARTUP_PERIOD_SECONDS = 10


# After its drain a pod still flushes its last responses and stops (vLLM's engine takes seconds).
STOP_MARGIN_SECONDS = 30
# The roles that keep taking new requests through the shutdown delay after SIGTERM: clients reach a
# gateway through kube-proxy and ingress, which learn of its removal late; a vLLM thinker cannot
# refuse what the gateways' stale DNS still sends it. The talker refuses new work at once (its only
# client, the gateway, fails over on the 503), so its drain starts at SIGTERM.
SERVE_THROUGH_SHUTDOWN_DELAY = ("gateway", "thinker")


def termination_grace_seconds(workload: WorkloadProfile, role: str) -> int:
    """terminationGracePeriodSeconds: the shutdown delay (where the role serves through it), the
    longest request, and the stop itself."""
    delay = workload.shutdown_delay_seconds if role in SERVE_THROUGH_SHUTDOWN_DELAY else 0
    return delay + workload.max_request_seconds + STOP_MARGIN_SECONDS


def _gpu_tolerations(role_spec: RoleSpec, gpu_resource: str | None) -> list[dict[str, Any]]:
    tolerations = [t.wire() for t in role_spec.node_pool.tolerations]
    # GPU nodes are commonly tainted with the resource name; tolerate it unless told otherwise.
    if gpu_resource and not any(t.get("key") == gpu_resource for t in tolerations):
        tolerations.append({"key": gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _affinity(role_spec: RoleSpec, spread_labels: dict[str, str], shard_labels: dict[str, str] | None):
    affinity = json.loads(json.dumps(role_spec.node_pool.affinity)) if role_spec.node_pool.affinity else None
    if affinity is None:
        # Spread replicas of a role over nodes so one node failure takes out one replica.
        affinity = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": spread_labels}}}]}}
    if shard_labels:
        # Shards of one replica each take a whole node's GPUs: never two on one node.
        anti = affinity.setdefault("podAntiAffinity", {})
        anti.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": shard_labels}})
    return affinity


def quantity_gi(gib: float) -> str:
    return f"{int(math.ceil(gib))}Gi"


def _resources(role_spec: RoleSpec, defaults: dict[str, dict[str, Any]], gpu_resource: str | None,
               gpus: int) -> dict[str, Any]:
    requests = dict(defaults.get("requests", {}))
    limits = dict(defaults.get("limits", {}))
    if role_spec.resources:
        requests.update(role_spec.resources.requests)
        limits.update(role_spec.resources.limits)
    if gpu_resource and gpus:
        # Extended resources: the request must equal the limit; sizing owns this number.
        limits[gpu_resource] = gpus
        requests[gpu_resource] = gpus
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = {k: requests[k] for k in sorted(requests)}
    if limits:
        out["limits"] = {k: limits[k] for k in sorted(limits)}
    return out


def _http_probe(path: str, port: str, period: int, failures: int, timeout: int = 3) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": timeout}


def _probes(startup_seconds: int) -> dict[str, Any]:
    return {
        "startupProbe": _http_probe("/health", "http", STARTUP_PERIOD_SECONDS,
                                    int(math.ceil(startup_seconds / STARTUP_PERIOD_SECONDS))),
        "readinessProbe": _http_probe("/health", "http", 5, 3),
        "livenessProbe": _http_probe("/health", "http", 20, 6, timeout=5),
    }


def env_list(pairs: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in pairs.items()]


def role_env(inp: RenderInput, role: str, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The environment contract every runtime container reads (omni_runtime.config)."""
    workload = inp.spec.workload
    stop = {Env.DRAIN_SECONDS: str(workload.max_request_seconds)}
    if role in SERVE_THROUGH_SHUTDOWN_DELAY:
        stop[Env.SHUTDOWN_DELAY_SECONDS] = str(workload.shutdown_delay_seconds)
    return env_list({Env.ROLE: role, Env.SERVED_MODEL_NAME: served_model_name(inp),
                     Env.PORT: str(HTTP_PORT[role]), Env.METRICS_PORT: str(METRICS_PORT), **stop, **(extra or {})})


def pod_template(inp: RenderInput, role: str, pod_spec: dict[str, Any],
                  extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"labels": common_labels(inp.owner.name, role, {**inp.extra_labels, **(extra_labels or {})}),
                         "annotations": {"kubectl.kubernetes.io/default-container": role}},
            "spec": pod_spec}


def downward_env() -> list[dict[str, Any]]:
    return [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]


def security_context() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}
    return pod, container


def scratch_home() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(env, volume, mount) of the writable home of thinker and talker: the images' defaults for these
    caches (~/.cache, ~/.triton, ~/.nv, /tmp/torchinductor_*) would land on the read-only root."""
    home = SCRATCH_HOME
    env = env_list({"HOME": home, "TMPDIR": "/tmp", "XDG_CACHE_HOME": f"{home}/.cache",
                    "XDG_CONFIG_HOME": f"{home}/.config", "VLLM_CACHE_ROOT": f"{home}/.cache/vllm",
                    "VLLM_CONFIG_ROOT": f"{home}/.config/vllm", "TRITON_CACHE_DIR": f"{home}/.triton/cache",
                    "TORCHINDUCTOR_CACHE_DIR": f"{home}/.cache/torchinductor",
                    "CUDA_CACHE_PATH": f"{home}/.nv/ComputeCache"})
    return env, {"name": "home", "emptyDir": {}}, {"name": "home", "mountPath": home}


def build_pod_spec(inp: RenderInput, role: str, role_spec: RoleSpec, *, gpu_resource: str | None, gpus: int,
                   resource_defaults: dict, env: list[dict], volumes: list[dict], mounts: list[dict],
                   startup_seconds: int | None, spread_labels: dict[str, str],
                   shard_labels: dict[str, str] | None = None) -> dict[str, Any]:
    pod_sc, container_sc = security_context()
    container: dict[str, Any] = {
        "name": role,
        "image": image_for(inp, role, role_spec),
        "imagePullPolicy": role_spec.image_pull_policy,
        "command": ["omni-runtime", role],
        "env": env,
        "ports": [{"name": "http", "containerPort": HTTP_PORT[role], "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": _resources(role_spec, resource_defaults, gpu_resource, gpus),
        "securityContext": container_sc,
        "volumeMounts": mounts + [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if startup_seconds:
        container.update(_probes(startup_seconds))
    pod: dict[str, Any] = {
        "containers": [container],
        "securityContext": pod_sc,
        # Nothing in a runtime pod calls the Kubernetes API, and its processes parse untrusted media.
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(inp.spec.workload, role),
        "enableServiceLinks": False,
        "volumes": volumes + [{"name": "tmp", "emptyDir": {}}],
        "affinity": _affinity(role_spec, spread_labels, shard_labels),
        **pool_placement(role_spec, gpu_resource),
    }
    return pod


def pool_placement(role_spec: RoleSpec, gpu_resource: str | None) -> dict[str, Any]:
    """nodeSelector, tolerations and classes that put a pod on a role's node pool."""
    pool = role_spec.node_pool
    out: dict[str, Any] = {}
    if pool.node_selector:
        out["nodeSelector"] = dict(sorted(pool.node_selector.items()))
    tolerations = _gpu_tolerations(role_spec, gpu_resource)
    if tolerations:
        out["tolerations"] = tolerations
    if pool.priority_class_name:
        out["priorityClassName"] = pool.priority_class_name
    if pool.runtime_class_name:
        out["runtimeClassName"] = pool.runtime_class_name
    return out


def shm_volume_and_mount(gpus: int) -> tuple[dict, dict]:
    # NCCL and vLLM's multiprocessing use /dev/shm; the container default (64 MiB) is far too small.
    size = quantity_gi(min(64, 8 * max(1, gpus)))
    return ({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}},
            {"name": "dshm", "mountPath": "/dev/shm"})
