"""Pure builders: an OmniDeployment spec and its sizing -> Kubernetes objects.

No I/O here. Every function takes plain values and returns plain dicts that
the handlers apply with server-side apply. Object names are derived from the
OmniDeployment's name (see ``names``) so drift correction and pruning can find
them again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .api import API_VERSION, KIND, OmniDeploymentSpec, RoleSpec
from .sizing import DeploymentSizing, Sizing

APP_NAME = "qwen3-omni"
MANAGER = "omni-operator"
ROLES = ("thinker", "talker", "gateway")

HTTP_PORT = {"thinker": 8000, "talker": 8000, "gateway": 8080}
METRICS_PORT = 9400
MASTER_PORT = 29500
DEFAULT_IMAGE_REPOSITORY = "ghcr.io/qwen3-omni"
REPLICA_LABEL = "omni.qwen.ai/replica"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
RUN_AS_USER = 1000
# Runtime containers have a read-only root filesystem: they write to a /tmp emptyDir and (thinker,
# talker) to an emptyDir home that holds the caches of vLLM, torch, triton and CUDA.
SCRATCH_HOME = "/home/omni"

# Weight loading from a volume (the operator's cache or the user's PVC): ~70 GB at a few hundred MB/s.
STARTUP_BUDGET_SECONDS = 1200
STARTUP_PERIOD_SECONDS = 10


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


# ----------------------------------------------------------------------------- names


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


# ----------------------------------------------------------------------------- pod pieces


def image_for(inp: RenderInput, role: str, role_spec: RoleSpec) -> str:
    return role_spec.image or f"{inp.image_repository}/{role}:{inp.image_tag}"


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


def _quantity_gi(gib: float) -> str:
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


def _role_env(inp: RenderInput, role: str, **extra: str) -> list[dict[str, Any]]:
    """The environment contract every runtime container reads (see runtime/README.md)."""
    return env_list({"OMNI_ROLE": role, "OMNI_SERVED_MODEL_NAME": served_model_name(inp),
                 "OMNI_PORT": str(HTTP_PORT[role]), "OMNI_METRICS_PORT": str(METRICS_PORT),
                 "OMNI_DRAIN_SECONDS": str(inp.spec.workload.max_request_seconds), **extra})


def _pod_template(inp: RenderInput, role: str, pod_spec: dict[str, Any],
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


def served_model_name(inp: RenderInput) -> str:
    return inp.spec.model_repo or inp.owner.name


def _pod_spec(inp: RenderInput, role: str, role_spec: RoleSpec, *, gpu_resource: str | None, gpus: int,
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
        "terminationGracePeriodSeconds": inp.spec.workload.max_request_seconds + 30,
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


def _shm_volume(gpus: int) -> tuple[dict, dict]:
    # NCCL and vLLM's multiprocessing use /dev/shm; the container default (64 MiB) is far too small.
    size = _quantity_gi(min(64, 8 * max(1, gpus)))
    return ({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}},
            {"name": "dshm", "mountPath": "/dev/shm"})


# ----------------------------------------------------------------------------- thinker


def thinker_vllm_args(inp: RenderInput) -> list[str]:
    return list(inp.sizing.thinker.vllm_args) + list(inp.spec.thinker.extra_args)


def render_thinker(inp: RenderInput) -> list[dict[str, Any]]:
    spec, sizing, name = inp.spec, inp.sizing.thinker, inp.owner.name
    n = names(name)
    role_spec = spec.thinker
    sharded = sizing.pods_per_replica > 1
    gpu_resource = role_spec.gpu.resource_name
    if inp.model_mount is None:
        return []
    model = inp.model_mount
    shm_volume, shm_mount = _shm_volume(sizing.gpus_per_pod)
    home_env, home_volume, home_mount = scratch_home()
    defaults = {"requests": {"cpu": str(max(4, 4 * sizing.gpus_per_pod)),
                             "memory": _quantity_gi(max(32, 24 * sizing.gpus_per_pod))},
                "limits": {"memory": _quantity_gi(max(32, 24 * sizing.gpus_per_pod))}}
    base_env = [
        *_role_env(inp, "thinker", OMNI_VLLM_ARGS=json.dumps(thinker_vllm_args(inp), separators=(",", ":"))),
        *model.env, *home_env, *downward_env(),
    ]
    replicas = inp.replicas.get("thinker", 0)
    sets: list[tuple[str, int, int | None]]  # (statefulset name, pods, replica index)
    if sharded:
        sets = [(thinker_statefulset_name(name, i), sizing.pods_per_replica, i) for i in range(replicas)]
    else:
        sets = [(thinker_statefulset_name(name, None), replicas, None)]
    objects = []
    for sts_name, pods, replica in sets:
        match = selector_labels(name, "thinker")
        extra_labels: dict[str, str] = {}
        env = list(base_env)
        if replica is not None:
            extra_labels[REPLICA_LABEL] = str(replica)
            env += env_list({"OMNI_NNODES": str(sizing.pods_per_replica),
                         "OMNI_MASTER_ADDR": f"{sts_name}-0.{n['thinker-headless']}.{inp.owner.namespace}.svc",
                         "OMNI_MASTER_PORT": str(MASTER_PORT)})
        else:
            env += env_list({"OMNI_NNODES": "1"})
        match = {**match, **extra_labels}
        pod_spec = _pod_spec(
            inp, "thinker", role_spec, gpu_resource=gpu_resource, gpus=sizing.gpus_per_pod,
            resource_defaults=defaults, env=env, volumes=model.volumes + [shm_volume, home_volume],
            mounts=model.mounts + [shm_mount, home_mount], startup_seconds=STARTUP_BUDGET_SECONDS,
            spread_labels=selector_labels(name, "thinker"),
            shard_labels=match if replica is not None else None)
        objects.append(_without_replicas_if(replica is None and spec.external_autoscaler, {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": object_meta(inp, sts_name, "thinker", extra_labels),
            "spec": {
                "replicas": pods,
                "serviceName": n["thinker-headless"],
                # Shards of a replica must start together; replicas load weights in parallel.
                "podManagementPolicy": "Parallel",
                "updateStrategy": {"type": "RollingUpdate"},
                "selector": {"matchLabels": match},
                "template": _pod_template(inp, "thinker", pod_spec, extra_labels),
            },
        }))
    return objects


def _without_replicas_if(external: bool, workload: dict[str, Any]) -> dict[str, Any]:
    """With an HPA or KEDA in charge the operator leaves spec.replicas to them (single writer)."""
    if external:
        del workload["spec"]["replicas"]
    return workload


# ----------------------------------------------------------------------------- talker


def render_talker(inp: RenderInput) -> list[dict[str, Any]]:
    spec, name = inp.spec, inp.owner.name
    talker = spec.effective_talker
    sizing: Sizing | None = inp.sizing.talker
    if talker is None or sizing is None or inp.model_mount is None:
        return []
    n = names(name)
    model = inp.model_mount
    home_env, home_volume, home_mount = scratch_home()
    env = [
        *_role_env(inp, "talker", OMNI_MAX_QUEUE=str(talker.max_queue), OMNI_MAX_INFLIGHT=str(talker.max_inflight),
                   OMNI_DEVICE="cuda"),
        *model.env, *home_env, *downward_env(),
    ]
    defaults = {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "32Gi"}}
    pod_spec = _pod_spec(inp, "talker", talker, gpu_resource=talker.gpu.resource_name, gpus=sizing.gpus_per_pod,
                         resource_defaults=defaults, env=env, volumes=model.volumes + [home_volume],
                         mounts=model.mounts + [home_mount], startup_seconds=STARTUP_BUDGET_SECONDS,
                         spread_labels=selector_labels(name, "talker"))
    return [_without_replicas_if(spec.external_autoscaler, {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": object_meta(inp, n["talker"], "talker"),
        "spec": {
            "replicas": inp.replicas.get("talker", 0),
            "serviceName": n["talker-headless"],
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": selector_labels(name, "talker")},
            "template": _pod_template(inp, "talker", pod_spec),
        },
    })]


# ----------------------------------------------------------------------------- gateway


def render_gateway(inp: RenderInput) -> list[dict[str, Any]]:
    spec, name, ns = inp.spec, inp.owner.name, inp.owner.namespace
    gateway = spec.gateway
    n = names(name)
    values = {"OMNI_THINKER_SERVICE": f"{n['thinker-headless']}.{ns}.svc:{HTTP_PORT['thinker']}",
              "OMNI_MAX_REQUEST_BYTES": str(gateway.max_request_bytes)}
    if spec.has_talker:
        values["OMNI_TALKER_SERVICE"] = f"{n['talker-headless']}.{ns}.svc:{HTTP_PORT['talker']}"
    volumes: list[dict] = []
    mounts: list[dict] = []
    if gateway.api_key_secret_ref:
        values["OMNI_API_KEYS_FILE"] = "/etc/omni/api-keys/keys"
        volumes.append({"name": "api-keys", "secret": {
            "secretName": gateway.api_key_secret_ref.name,
            "items": [{"key": gateway.api_key_secret_ref.key, "path": "keys"}]}})
        mounts.append({"name": "api-keys", "mountPath": "/etc/omni/api-keys", "readOnly": True})
    defaults = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    pod_spec = _pod_spec(inp, "gateway", gateway, gpu_resource=None, gpus=0, resource_defaults=defaults,
                         env=[*_role_env(inp, "gateway", **values), *downward_env()], volumes=volumes, mounts=mounts,
                         startup_seconds=60, spread_labels=selector_labels(name, "gateway"))
    return [_without_replicas_if(spec.external_autoscaler, {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(inp, n["gateway"], "gateway"),
        "spec": {
            "replicas": inp.replicas.get("gateway", 0),
            "selector": {"matchLabels": selector_labels(name, "gateway")},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": _pod_template(inp, "gateway", pod_spec),
        },
    })]


# ----------------------------------------------------------------------------- services, PDBs


def _ports(role: str) -> list[dict[str, Any]]:
    return [{"name": "http", "port": HTTP_PORT[role], "targetPort": "http", "protocol": "TCP"},
            {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}]


def _service(inp: RenderInput, role: str, svc_name: str, selector: dict[str, str], *, headless: bool,
             publish_not_ready: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": selector, "ports": _ports(role)}
    if headless:
        spec["clusterIP"] = "None"
        spec["publishNotReadyAddresses"] = publish_not_ready
    else:
        spec["type"] = "ClusterIP"
    return {"apiVersion": "v1", "kind": "Service", "metadata": object_meta(inp, svc_name, role), "spec": spec}


def render_services(inp: RenderInput) -> list[dict[str, Any]]:
    name = inp.owner.name
    n = names(name)
    sharded = inp.sizing.thinker.pods_per_replica > 1
    thinker_selector = selector_labels(name, "thinker")
    if sharded:
        # Only rank 0 of each replica serves the API; workers join it by the headless DNS name,
        # before it is ready, so the headless Service publishes not-ready addresses.
        thinker_selector = {**thinker_selector, POD_INDEX_LABEL: "0"}
    services = [
        _service(inp, "thinker", n["thinker-headless"], thinker_selector, headless=True, publish_not_ready=sharded),
        _service(inp, "thinker", n["thinker"], thinker_selector, headless=False),
    ]
    if inp.spec.has_talker:
        services += [
            _service(inp, "talker", n["talker-headless"], selector_labels(name, "talker"), headless=True),
            _service(inp, "talker", n["talker"], selector_labels(name, "talker"), headless=False),
        ]
    services.append(_service(inp, "gateway", n["gateway"], selector_labels(name, "gateway"), headless=False))
    return services


def render_pdbs(inp: RenderInput) -> list[dict[str, Any]]:
    roles = ["thinker", "gateway"] + (["talker"] if inp.spec.has_talker else [])
    return [{
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(inp, names(inp.owner.name)[role], role),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(inp.owner.name, role)},
            # A pod that never became ready (stuck loading) may still be evicted for maintenance.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    } for role in sorted(roles)]


# ----------------------------------------------------------------------------- HPA / KEDA


def _scaled_roles(inp: RenderInput) -> list[tuple[str, dict[str, Any], Any]]:
    """(role, scale target, role spec) for every role an external autoscaler can scale."""
    spec, name = inp.spec, inp.owner.name
    targets = []
    if inp.sizing.thinker.pods_per_replica == 1:  # a replica spanning nodes is a set of StatefulSets
        targets.append(("thinker", {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                    "name": thinker_statefulset_name(name, None)}, spec.thinker))
    if spec.effective_talker is not None:
        targets.append(("talker", {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": names(name)["talker"]},
                        spec.effective_talker))
    targets.append(("gateway", {"apiVersion": "apps/v1", "kind": "Deployment", "name": names(name)["gateway"]},
                    spec.gateway))
    return targets


def render_autoscalers(inp: RenderInput) -> list[dict[str, Any]]:
    """An HPA (Pods metric omni_queue_depth, served by a metrics adapter) or a KEDA ScaledObject
    (Prometheus query) per role, when the spec hands replicas to one of them."""
    scaling = inp.spec.autoscaling
    targets = scaling.target_queue_depth.model_dump()
    objects = []
    for role, ref, role_spec in _scaled_roles(inp):
        meta = object_meta(inp, names(inp.owner.name)[role], role)
        if scaling.mode == "HPA":
            objects.append({
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
                "spec": {
                    "scaleTargetRef": ref,
                    # The HPA cannot go to zero; KEDA can.
                    "minReplicas": max(1, role_spec.min_replicas),
                    "maxReplicas": max(1, role_spec.max_replicas),
                    "metrics": [{"type": "Pods", "pods": {
                        "metric": {"name": "omni_queue_depth"},
                        "target": {"type": "AverageValue", "averageValue": f"{targets[role]:g}"}}}],
                    "behavior": {
                        "scaleUp": {"stabilizationWindowSeconds": scaling.scale_up_stabilization_seconds,
                                    "policies": [{"type": "Pods", "value": scaling.max_step, "periodSeconds": 15}]},
                        "scaleDown": {"stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds,
                                      "policies": [{"type": "Pods", "value": scaling.max_step,
                                                    "periodSeconds": 60}]},
                    },
                },
            })
        elif scaling.mode == "KEDA":
            ns, name = inp.owner.namespace, inp.owner.name
            selector = f'namespace="{ns}",role="{role}",pod=~"{name}-{role}-.*"'
            objects.append({
                "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": meta,
                "spec": {
                    "scaleTargetRef": ref,
                    "minReplicaCount": role_spec.min_replicas if scaling.scale_to_zero else max(1, role_spec.min_replicas),
                    "maxReplicaCount": max(1, role_spec.max_replicas),
                    "pollingInterval": scaling.poll_seconds,
                    "cooldownPeriod": scaling.scale_down_stabilization_seconds,
                    "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                        "scaleUp": {"stabilizationWindowSeconds": scaling.scale_up_stabilization_seconds},
                        "scaleDown": {"stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds}}}},
                    "triggers": [{"type": "prometheus", "metadata": {
                        "serverAddress": scaling.prometheus_address,
                        # Requests in the system (waiting + running): the same signal the operator's loop uses.
                        "query": f"sum(omni_queue_depth{{{selector}}}) + sum(omni_requests_running{{{selector}}})",
                        "threshold": f"{targets[role]:g}",
                    }}],
                },
            })
    return objects


def render_all(inp: RenderInput) -> list[dict[str, Any]]:
    """Every child object, Services first so StatefulSet pods get DNS from the start."""
    return [*render_services(inp), *render_thinker(inp), *render_talker(inp), *render_gateway(inp),
            *render_pdbs(inp), *render_autoscalers(inp)]


# ----------------------------------------------------------------------------- replicas and GPUs


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
