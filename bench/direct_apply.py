"""The physical limit for the operator benchmark: the same children and statuses written
straight to the apiserver by a plain client (no operator, no watches, no reads), with as
many workers as the operator has reconcile workers. What the apiserver and the machine
allow; the operator's latency is compared with it in the same run."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import config as kube_config

from omni_operator.api.resource import KIND
from omni_operator.controller.conditions import compute_conditions, merge_conditions
from omni_operator.kube import Kube
from omni_operator.rendering.meta import gpus_for
from omni_operator.rendering.plan import make_plan
from omni_operator.sizing.replicas import sizing_status

WORKERS = 4  # the operator's WorkQueue default


def write_one(kube: Kube, resource: dict[str, Any]) -> None:
    """Server-side apply every child of one object, then its status (as the operator would
    write it for a first reconcile: sized, nothing ready yet)."""
    meta = resource["metadata"]
    plan = make_plan(meta["name"], meta["namespace"], meta["uid"], resource["spec"], generation=meta.get("generation"))
    for obj in plan.objects:
        kube.apply(obj)
    conditions = compute_conditions(generation=meta.get("generation"), sizing_error=None,
                                    sizing_reason=plan.sizing.reason, invalid_spec=False, apply_failure=None, roles={},
                                    weights=plan.weights.condition)
    gpus = gpus_for(plan.sizing, plan.replicas)
    status = {"observedGeneration": meta.get("generation"), "sizing": sizing_status(plan.sizing, gpus).wire(),
              "gpus": gpus, "weights": plan.weights.status.wire(),
              "conditions": merge_conditions([], conditions, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))}
    kube.patch_status(KIND, meta["namespace"], meta["name"], status)


def write_all(kubeconfig: str, namespace: str, names: list[str]) -> None:
    """Write the children and status of every named object, WORKERS at a time, each as soon
    as the object exists."""
    kube = Kube(kube_config.new_client_from_config(config_file=kubeconfig))
    pending = set(names)
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = []
        while pending:
            for obj in kube.list(KIND, namespace):
                name = obj["metadata"]["name"]
                if name in pending:
                    pending.discard(name)
                    futures.append(pool.submit(write_one, kube, obj))
            if pending:
                time.sleep(0.05)
        for f in futures:
            f.result()
