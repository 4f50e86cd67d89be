"""HorizontalPodAutoscalers or KEDA ScaledObjects, when the spec hands replicas to one of them
(pure)."""

from __future__ import annotations

from typing import Any

from omni_operator.rendering.meta import RenderInput, names, object_meta, thinker_statefulset_name


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
