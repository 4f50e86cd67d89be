"""The operator's RBAC rules: the one place they are written.

`omni-operator generate` writes them to charts/qwen3-omni/files/rbac-rules.yaml,
which the chart renders into a ClusterRole (or a Role per watched namespace).
"""

from __future__ import annotations

from .api import GROUP, PLURAL

RULES: list[dict] = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch", "update"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch", "update"]},
    # Children: created and kept in shape with server-side apply, pruned when no longer rendered.
    {"apiGroups": ["apps"], "resources": ["statefulsets", "deployments"],
     "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
    {"apiGroups": ["apps"], "resources": ["statefulsets/scale", "deployments/scale"],
     "verbs": ["get", "patch", "update"]},
    {"apiGroups": [""], "resources": ["services"],
     "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"],
     "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"],
     "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
    {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"],
     "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
    # The weight cache of a hub repository: a PVC per revision, filled once by a loader Job.
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"],
     "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
    # Pods are read for readiness and scraped for queue depth; never written.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    # A StatefulSet's FailedCreate events: why it could not create a role's pods (e.g. a missing PriorityClass).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch"]},
    # kopf discovers the resources it serves and watches namespaces in cluster-wide mode.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
]
