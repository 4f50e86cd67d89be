"""The operator's RBAC rules, derived from the kinds its code reads and writes.

`python -m tools.generate` writes them to charts/qwen3-omni/files/rbac-rules.yaml, which the chart
renders into a ClusterRole (or a Role per watched namespace); a cluster test runs the operator
with exactly these rules.
"""

from __future__ import annotations

from omni_operator.api.resource import KIND
from omni_operator.autoscaling.loop import SCALED_KINDS
from omni_operator.controller.reconciler import CHILD_KINDS
from omni_operator.kube import RESOURCES

READ = ["get", "list", "watch"]
# Children are created, kept in shape with server-side apply and pruned when no longer rendered.
CHILD_VERBS = [*READ, "create", "patch", "update", "delete"]


def _group_and_plural(kind: str) -> tuple[str, str]:
    prefix, plural = RESOURCES[kind]
    return ("" if prefix == "/api/v1" else prefix.split("/")[2]), plural


def rules() -> list[dict]:
    group, plural = _group_and_plural(KIND)
    out: list[dict] = [
        {"apiGroups": [group], "resources": [plural], "verbs": [*READ, "patch", "update"]},
        {"apiGroups": [group], "resources": [f"{plural}/status"], "verbs": ["get", "patch", "update"]},
    ]
    children: dict[str, list[str]] = {}
    for kind in CHILD_KINDS:
        child_group, child_plural = _group_and_plural(kind)
        children.setdefault(child_group, []).append(child_plural)
    out += [{"apiGroups": [g], "resources": plurals, "verbs": list(CHILD_VERBS)} for g, plurals in children.items()]
    # The autoscaler writes the replicas of the role workloads through their scale subresource.
    scaled: dict[str, list[str]] = {}
    for kind in SCALED_KINDS:
        scaled_group, scaled_plural = _group_and_plural(kind)
        scaled.setdefault(scaled_group, []).append(f"{scaled_plural}/scale")
    out += [{"apiGroups": [g], "resources": subresources, "verbs": ["get", "patch", "update"]}
            for g, subresources in scaled.items()]
    out += [
        # Pods are read for readiness, the status reasons and scraping; never written.
        {"apiGroups": [""], "resources": ["pods"], "verbs": list(READ)},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        # A StatefulSet's FailedCreate events: why it could not create a role's pods.
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch"]},
        # kopf discovers the resources it serves and watches namespaces in cluster-wide mode.
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": list(READ)},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": list(READ)},
    ]
    return out
