"""The workloads of the three roles: thinker and talker StatefulSets on their GPU pools, the
gateway's Deployment (pure)."""

from __future__ import annotations

import json
from typing import Any

from omni_operator.rendering.meta import (HTTP_PORT, MASTER_PORT, REPLICA_LABEL, RenderInput, names, object_meta,
                                          selector_labels, thinker_statefulset_name)
from omni_operator.rendering.pods import (STARTUP_BUDGET_SECONDS, build_pod_spec, downward_env, env_list, pod_template,
                                          quantity_gi, role_env, scratch_home, shm_volume_and_mount)
from omni_operator.sizing.replicas import Sizing
from omni_runtime.config import Env


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
    shm_volume, shm_mount = shm_volume_and_mount(sizing.gpus_per_pod)
    home_env, home_volume, home_mount = scratch_home()
    defaults = {"requests": {"cpu": str(max(4, 4 * sizing.gpus_per_pod)),
                             "memory": quantity_gi(max(32, 24 * sizing.gpus_per_pod))},
                "limits": {"memory": quantity_gi(max(32, 24 * sizing.gpus_per_pod))}}
    base_env = [
        *role_env(inp, "thinker", {Env.VLLM_ARGS: json.dumps(thinker_vllm_args(inp), separators=(",", ":"))}),
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
            env += env_list({Env.NNODES: str(sizing.pods_per_replica),
                             Env.MASTER_ADDR: f"{sts_name}-0.{n['thinker-headless']}.{inp.owner.namespace}.svc",
                             Env.MASTER_PORT: str(MASTER_PORT)})
        else:
            env += env_list({Env.NNODES: "1"})
        match = {**match, **extra_labels}
        pod_spec = build_pod_spec(
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
                "template": pod_template(inp, "thinker", pod_spec, extra_labels),
            },
        }))
    return objects


def _without_replicas_if(external: bool, workload: dict[str, Any]) -> dict[str, Any]:
    """With an HPA or KEDA in charge the operator leaves spec.replicas to them (single writer)."""
    if external:
        del workload["spec"]["replicas"]
    return workload


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
        # the streams the sizing gave it (talker.maxInflight, or what its GPU holds), each a KV slot of
        # the context it was sized for
        *role_env(inp, "talker", {Env.MAX_QUEUE: str(talker.max_queue), Env.MAX_INFLIGHT: str(sizing.concurrent_sequences),
                                  Env.TALKER_MAX_TOKENS: str(sizing.context_tokens), Env.DEVICE: "cuda"}),
        *model.env, *home_env, *downward_env(),
    ]
    defaults = {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "32Gi"}}
    pod_spec = build_pod_spec(inp, "talker", talker, gpu_resource=talker.gpu.resource_name, gpus=sizing.gpus_per_pod,
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
            "template": pod_template(inp, "talker", pod_spec),
        },
    })]


def render_gateway(inp: RenderInput) -> list[dict[str, Any]]:
    spec, name, ns = inp.spec, inp.owner.name, inp.owner.namespace
    gateway = spec.gateway
    n = names(name)
    values = {Env.THINKER_SERVICE: f"{n['thinker-headless']}.{ns}.svc:{HTTP_PORT['thinker']}",
              Env.MAX_REQUEST_BYTES: str(gateway.max_request_bytes)}
    if spec.has_talker:
        values[Env.TALKER_SERVICE] = f"{n['talker-headless']}.{ns}.svc:{HTTP_PORT['talker']}"
    volumes: list[dict] = []
    mounts: list[dict] = []
    if gateway.api_key_secret_ref:
        values[Env.API_KEYS_FILE] = "/etc/omni/api-keys/keys"
        volumes.append({"name": "api-keys", "secret": {
            "secretName": gateway.api_key_secret_ref.name,
            "items": [{"key": gateway.api_key_secret_ref.key, "path": "keys"}]}})
        mounts.append({"name": "api-keys", "mountPath": "/etc/omni/api-keys", "readOnly": True})
    defaults = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    pod_spec = build_pod_spec(inp, "gateway", gateway, gpu_resource=None, gpus=0, resource_defaults=defaults,
                              env=[*role_env(inp, "gateway", values), *downward_env()], volumes=volumes, mounts=mounts,
                              startup_seconds=60, spread_labels=selector_labels(name, "gateway"))
    return [_without_replicas_if(spec.external_autoscaler, {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(inp, n["gateway"], "gateway"),
        "spec": {
            "replicas": inp.replicas.get("gateway", 0),
            "selector": {"matchLabels": selector_labels(name, "gateway")},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": pod_template(inp, "gateway", pod_spec),
        },
    })]
