"""Tiers 3 + 4: the operator's autoscaler on the real control plane, reading the queue
depth of real thinker processes (tiny random-weight Qwen3-Omni, transformers engine).

kwok gives every pod a loopback address (127.0.64.0/18); for each thinker pod the
test starts `omni-runtime thinker` listening on that address, so the operator
scrapes real processes exactly as it would scrape pods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from e2e.operator_process import OperatorProcess, install_crd

from ..test_operator_cluster import wait

pytestmark = pytest.mark.runtime


class PodProcesses:
    """Starts `omni-runtime thinker` on the IP of every running thinker pod, stops it when the pod goes."""

    def __init__(self, cluster, namespace: str, selector: str, model: Path, logs: Path):
        self.cluster, self.namespace, self.selector, self.model, self.logs = cluster, namespace, selector, model, logs
        self.procs: dict[str, tuple[str, subprocess.Popen]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        for _, proc in self.procs.values():
            self._kill(proc)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def pod_ips(self) -> dict[str, str]:
        out = self.cluster.kubectl("get", "pods", "-n", self.namespace, "-l", self.selector, "-o", "json")
        return {p["metadata"]["name"]: p["status"]["podIP"] for p in json.loads(out.stdout)["items"]
                if p.get("status", {}).get("podIP") and not p["metadata"].get("deletionTimestamp")}

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                pods = self.pod_ips()
            except Exception:
                continue
            for name, ip in pods.items():
                if name not in self.procs or self.procs[name][0] != ip:
                    env = {**os.environ, "OMNI_HOST": ip, "OMNI_PORT": "8000", "OMNI_METRICS_PORT": "9400",
                           "OMNI_MODEL": str(self.model), "OMNI_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
                           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "POD_NAME": name}
                    log = open(self.logs / f"{name}.log", "ab")
                    proc = subprocess.Popen([sys.executable, "-m", "omni_runtime.cli", "thinker", "--engine",
                                             "transformers"], env=env, stdout=log, stderr=subprocess.STDOUT)
                    log.close()
                    self.procs[name] = (ip, proc)
            for name in [n for n in self.procs if n not in pods]:
                self._kill(self.procs.pop(name)[1])

    def wait_serving(self, pod: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pod in self.procs:
                ip = self.procs[pod][0]
                try:
                    with urllib.request.urlopen(f"http://{ip}:8000/health", timeout=1) as r:
                        if r.status == 200:
                            return ip
                except OSError:
                    pass
            time.sleep(0.3)
        raise AssertionError(f"{pod} never served")


def replicas(cluster, namespace: str, sts: str) -> int:
    out = cluster.kubectl("get", "statefulset", sts, "-n", namespace, "-o", "jsonpath={.spec.replicas}",
                          check=False)
    return int(out.stdout or 0)


def test_thinker_replicas_follow_the_queue_depth_of_real_processes(cluster, namespace, tiny_model, tmp_path):
    install_crd(cluster)
    resource = {
        "apiVersion": "omni.qwen.ai/v1alpha1", "kind": "OmniDeployment",
        "metadata": {"name": "scaling", "namespace": namespace},
        "spec": {
            "variant": "Thinking",
            # 16 GiB GPUs make a replica take all 8 GPUs of a thinker node (68.74 GB for one request plus
            # the KV cache of 7 more sequences): the pool holds two replicas.
            "thinker": {"minReplicas": 1, "maxReplicas": 4, "gpu": {"memoryGiB": 16, "countPerNode": 8},
                        "nodePool": {"nodeSelector": {"omni.qwen.ai/pool": "thinker"}}},
            "gateway": {"minReplicas": 1, "maxReplicas": 1},
            "autoscaling": {"mode": "Operator", "pollSeconds": 1, "targetQueueDepth": {"thinker": 4},
                            "scaleUpStabilizationSeconds": 2, "scaleDownStabilizationSeconds": 6, "maxStep": 1},
        },
    }
    with OperatorProcess(cluster, tmp_path / "operator.log", "--namespace", namespace) as operator, \
            PodProcesses(cluster, namespace, "app.kubernetes.io/component=thinker", tiny_model, tmp_path) as pods:
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(resource))
        deadline = time.monotonic() + 60
        while replicas(cluster, namespace, "scaling-thinker") != 1 and time.monotonic() < deadline:
            time.sleep(0.3)
        ip = pods.wait_serving("scaling-thinker-0")

        # 16 long requests on one pod with 4 workers: 12 wait, 4 run -> 16 in the system, target 4 each.
        body = json.dumps({"model": "x", "max_tokens": 1000, "temperature": 0,
                           "messages": [{"role": "user", "content": "Tell a long story."}]}).encode()

        def send():
            req = urllib.request.Request(f"http://{ip}:8000/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=600).read()
            except OSError:
                pass

        senders = [threading.Thread(target=send, daemon=True) for _ in range(16)]
        for t in senders:
            t.start()
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and max(seen or [0]) < 3:
            seen.append(replicas(cluster, namespace, "scaling-thinker"))
            time.sleep(0.5)
        assert max(seen) == 3, f"replicas seen {seen}\n{operator.log_tail()}"
        assert seen == sorted(seen), f"no scale-down while the queue is full: {seen}"

        status = json.loads(cluster.kubectl("get", "omni", "scaling", "-n", namespace, "-o", "json").stdout)["status"]
        ups = [d for d in status["lastScaleDecisions"] if d["role"] == "thinker" and d["toReplicas"] > d["fromReplicas"]]
        assert ups and all("load" in d["reason"] for d in ups)
        assert [(d["fromReplicas"], d["toReplicas"]) for d in ups][:2] == [(1, 2), (2, 3)]  # maxStep 1

        # The third replica cannot be scheduled: the load still wants a fourth, which is not asked for.
        def exhausted():
            events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
            return [e for e in events if e["reason"] == "GPUPoolExhausted"]
        (event,) = wait("a GPUPoolExhausted event", exhausted, timeout=60, operator=operator)
        assert "GPU pool exhausted" in event["message"] and event["type"] == "Warning"
        assert replicas(cluster, namespace, "scaling-thinker") == 3

        # The queue drains, then after the scale-down window the thinker returns to one replica.
        for t in senders:
            t.join(300)
        deadline = time.monotonic() + 120
        while replicas(cluster, namespace, "scaling-thinker") != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replicas(cluster, namespace, "scaling-thinker") == 1, operator.log_tail()
        events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        assert {"ScaledUp", "ScaledDown"} <= {e["reason"] for e in events}
