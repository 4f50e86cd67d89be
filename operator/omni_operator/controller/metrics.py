"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("omni_operator_reconcile_total", "Reconciles by result.", ["result"])
RECONCILE_SECONDS = Histogram("omni_operator_reconcile_duration_seconds", "Time for one reconcile.",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
SIZING_VALID = Gauge("omni_operator_sizing_valid", "1 when the OmniDeployment's spec could be sized.",
                     ["namespace", "name"])
DESIRED = Gauge("omni_operator_desired_replicas", "Replicas the operator wants per role.",
                ["namespace", "name", "role"])
READY = Gauge("omni_operator_ready_replicas", "Ready replicas per role.", ["namespace", "name", "role"])
WEIGHTS_READY = Gauge("omni_operator_weights_ready",
                      "1 when a complete copy of the requested weights is cached (or on the user's PVC); "
                      "-1 when its loader failed for good.", ["namespace", "name"])
QUEUE_DEPTH = Gauge("omni_operator_workqueue_depth", "OmniDeployments waiting to be reconciled.")
IS_LEADER = Gauge("omni_operator_leader", "1 while this process holds the leader Lease.")


ROLES = ("thinker", "talker", "gateway")


def record_status(namespace: str, name: str, sizing_valid: bool, roles, weights_ready: bool | None = None,
                  weights_failed: bool = False) -> None:
    """Set the per-object series; a role that no longer exists loses its series, so alerts
    on it stop."""
    SIZING_VALID.labels(namespace, name).set(1 if sizing_valid else 0)
    if weights_ready is not None:
        WEIGHTS_READY.labels(namespace, name).set(1 if weights_ready else -1 if weights_failed else 0)
    else:
        _remove(WEIGHTS_READY, namespace, name)
    for role in ROLES:
        if role in roles:
            DESIRED.labels(namespace, name, role).set(roles[role].desired)
            READY.labels(namespace, name, role).set(roles[role].ready)
        else:
            _remove(DESIRED, namespace, name, role)
            _remove(READY, namespace, name, role)


def forget(namespace: str, name: str) -> None:
    """Drop every series of a deleted OmniDeployment (else its alerts would fire forever)."""
    _remove(SIZING_VALID, namespace, name)
    _remove(WEIGHTS_READY, namespace, name)
    for role in ROLES:
        _remove(DESIRED, namespace, name, role)
        _remove(READY, namespace, name, role)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # never set
        pass
