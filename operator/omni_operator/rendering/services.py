"""Services and PodDisruptionBudgets of the roles (pure)."""

from __future__ import annotations

from typing import Any

from omni_operator.rendering.meta import (HTTP_PORT, METRICS_PORT, POD_INDEX_LABEL, RenderInput, names, object_meta,
                                          selector_labels)


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
