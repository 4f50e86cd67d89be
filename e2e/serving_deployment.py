"""One OmniDeployment serving on a private local cluster, for the failure drills
(tests/runtime/test_failure_drills.py) and the rollout benchmark (bench/rollout_bench.py).

The cluster runs with ``serving=True`` (the node agent runs every pod's real process, Ready only
from its probe), the real operator runs beside it, and the deployment serves the tiny random-weight
model from the node's stand-in hub through its own weight cache: ``replicas`` pods of each role,
a 3 s shutdown delay (the clients here re-read the gateway pods every second) and 30 s for
in-flight work. ``Stand`` has what the drills do to it: roll a role (a spec change), read a role's
workload and pods, restart the operator.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from e2e.binaries import ensure_binaries
from e2e.cluster import LocalCluster
from e2e.gateway_clients import COMPONENT, INSTANCE, GatewayPods, cluster_gateway_pods
from e2e.nodes import POOL_LABEL
from e2e.operator_process import OperatorProcess, install_crd
from e2e.procs import wait_until

REPO = "Qwen/Qwen3-Omni-30B-A3B-Instruct"  # any repo: the node's hub serves the tiny model for it
ROLES = ("gateway", "thinker", "talker")
WORKLOAD = {"maxVideoSeconds": 30, "maxRequestSeconds": 30, "shutdownDelaySeconds": 3}
BASE_CPU_MILLIS = 1000  # every role's CPU request; a rollout adds to it


def manifest(name: str, namespace: str, replicas: int = 2) -> dict[str, Any]:
    def role(pool: str, **extra: Any) -> dict[str, Any]:
        return {"nodePool": {"nodeSelector": {POOL_LABEL: pool}}, "minReplicas": replicas, "maxReplicas": replicas,
                "resources": {"requests": {"cpu": f"{BASE_CPU_MILLIS}m"}}, **extra}

    return {"apiVersion": "omni.qwen.ai/v1alpha1", "kind": "OmniDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"variant": "Instruct", "model": {"repo": REPO, "cache": {"accessMode": "ReadWriteMany"}},
                     "workload": dict(WORKLOAD),
                     "thinker": role("thinker", gpu={"memoryGiB": 80, "countPerNode": 8}),
                     "talker": role("talker", gpu={"memoryGiB": 24, "countPerNode": 4}),
                     "gateway": role("cpu"),
                     "autoscaling": {"mode": "Disabled"}}}


def rolled_out(workload: dict[str, Any]) -> bool:
    """The Deployment's or StatefulSet's latest spec is on every pod, and every pod is ready (pure)."""
    spec, status = workload["spec"], workload.get("status", {})
    want = spec.get("replicas", 1)
    if status.get("observedGeneration", 0) < workload["metadata"]["generation"]:
        return False
    same = (status.get("updatedReplicas"), status.get("readyReplicas"), status.get("replicas"))
    if same != (want, want, want):
        return False
    if workload["kind"] == "StatefulSet":
        return status.get("currentRevision") == status.get("updateRevision")
    return status.get("availableReplicas") == want


@dataclass
class Stand:
    cluster: LocalCluster
    operator: OperatorProcess
    name: str
    namespace: str
    model: str  # the served model name clients ask for
    rolls: int = 0

    def workload(self, role: str) -> dict[str, Any]:
        kind = "deployment" if role == "gateway" else "statefulset"
        return self.cluster.get_json(kind, f"{self.name}-{role}", "-n", self.namespace)

    def pods(self, role: str) -> list[dict[str, Any]]:
        return self.cluster.get_json("pods", "-n", self.namespace, "-l",
                                     f"{INSTANCE}={self.name},{COMPONENT}={role}")["items"]

    def roll(self, role: str) -> None:
        """A spec change that rolls the role's pods: its CPU request."""
        self.rolls += 1
        patch = {"spec": {role: {"resources": {"requests": {"cpu": f"{BASE_CPU_MILLIS + self.rolls}m"}}}}}
        self.cluster.kubectl("patch", "omnideployment", self.name, "-n", self.namespace, "--type", "merge",
                             "-p", json.dumps(patch))

    def wait_rolled_out(self, role: str, timeout: float = 600, since_generation: int | None = None) -> dict:
        """Until the role's workload is rolled out (past `since_generation`, when given)."""
        def done():
            w = self.workload(role)
            fresh = since_generation is None or w["metadata"]["generation"] > since_generation
            return w if fresh and rolled_out(w) else None
        return wait_until(f"the {role} rollout of {self.namespace}/{self.name}", done, timeout, 0.5,
                          error=AssertionError)

    def wait_ready(self, timeout: float = 600) -> None:
        for role in ROLES:
            self.wait_rolled_out(role, timeout)

    def gateway_pods(self) -> GatewayPods:
        return GatewayPods(cluster_gateway_pods(self.cluster, self.namespace, self.name))

    def restart_operator(self, *, kill: bool = True) -> None:
        """The operator's process ends (SIGKILL, as a node loss would end it) and a new one starts."""
        if kill:
            self.operator.kill()
        else:
            self.operator.stop()
        self.operator.start()


@contextlib.contextmanager
def serving_deployment(state_dir: Path, model: Path, *, name: str = "drill", namespace: str = "default",
                       replicas: int = 2, say: Callable[[str], None] = lambda _: None,
                       die_with_parent: bool = True) -> Iterator[Stand]:
    """A serving cluster in `state_dir` with the operator and one Ready OmniDeployment (module docstring)."""
    cluster = LocalCluster(state_dir, die_with_parent=die_with_parent, serving=True)
    ensure_binaries(cluster.bin_dir)
    t0 = time.monotonic()
    cluster.start(timeout=240, build=False)
    operator = OperatorProcess(cluster, state_dir / "operator.log", "--namespace", namespace)
    try:
        install_crd(cluster)
        operator.start()
        cluster.serve_pods(model)
        body = manifest(name, namespace, replicas)
        cluster.apply(body)
        stand = Stand(cluster, operator, name, namespace, model="")
        stand.wait_ready()
        env = stand.workload("gateway")["spec"]["template"]["spec"]["containers"][0]["env"]
        stand.model = next(e["value"] for e in env if e["name"] == "OMNI_SERVED_MODEL_NAME")
        say(f"{namespace}/{name} Ready ({replicas} pods per role) in {time.monotonic() - t0:.0f}s")
        yield stand
    finally:
        operator.stop()
        cluster.stop()
