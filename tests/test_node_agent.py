"""The node agent of the local control plane (e2e/node_agent.py): volumes for claims, the
operator's weight-loader pods run for real, and kwok no longer completing them on its own.

The loader Jobs here are written by hand in the shape of the weight-cache contract (what the
operator renders for ``model.repo``); the loader itself is the real ``omni-runtime fetch-weights``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from e2e.cluster import LocalCluster
from e2e.hub import HubStandIn, write_placeholder_checkpoint
from e2e.nodes import POOLS
from e2e.procs import pid_alive

pytestmark = pytest.mark.cluster

LOADER_LABELS = {
    "app.kubernetes.io/name": "qwen3-omni",
    "app.kubernetes.io/instance": "omni",
    "app.kubernetes.io/component": "weights",
    "app.kubernetes.io/managed-by": "omni-operator",
    "app.kubernetes.io/part-of": "qwen3-omni",
    "omni.qwen.ai/weights-key": "0123456789",
}
EXIT_PERMANENT = 2


# -- objects --------------------------------------------------------------------------------


def pvc(name: str, *, size: str = "1Gi", access: str = "ReadWriteMany", storage_class: str | None = None
        ) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": [access], "resources": {"requests": {"storage": size}}}
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec}


def loader_job(name: str, claim: str, repo: str, *, endpoint: str | None = None,
               token_secret: str | None = None) -> dict[str, Any]:
    """The loader Job of the weight-cache contract."""
    env: list[dict[str, Any]] = [
        {"name": "OMNI_MODEL", "value": repo},
        {"name": "OMNI_WEIGHTS_DIR", "value": "/weights"},
        {"name": "OMNI_METRICS_PORT", "value": "9400"},
        {"name": "HF_HOME", "value": "/tmp/huggingface"},
    ]
    if endpoint:
        env.append({"name": "HF_ENDPOINT", "value": endpoint})
    if token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token_secret, "key": "token"}}})
    env += [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    container = {
        "name": "loader", "image": "registry.invalid/omni/gateway:1", "command": ["omni-runtime", "fetch-weights"],
        "env": env, "ports": [{"name": "metrics", "containerPort": 9400}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "weights", "mountPath": "/weights"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec = {
        "restartPolicy": "Never", "containers": [container], "terminationGracePeriodSeconds": 0,
        "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": claim}},
                    {"name": "tmp", "emptyDir": {}}],
        "nodeSelector": POOLS["cpu"].node_selector,
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": LOADER_LABELS},
        "spec": {
            "backoffLimit": 4,
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                "containerName": "loader", "operator": "In", "values": [EXIT_PERMANENT]}}]},
            "template": {"metadata": {"labels": LOADER_LABELS}, "spec": pod_spec},
        },
    }


def plain_job(name: str, labels: dict[str, str]) -> dict[str, Any]:
    container = {"name": "main", "image": "registry.invalid/omni/hook:1", "command": ["true"]}
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": {
            "restartPolicy": "Never", "containers": [container], "terminationGracePeriodSeconds": 0}}},
    }


# -- reading the cluster ----------------------------------------------------------------------


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def job_finished(cluster: LocalCluster, ns: str, name: str) -> Callable[[], dict[str, Any] | None]:
    def check():
        job = cluster.get_json("job", name, "-n", ns)
        done = [k for k in ("Complete", "Failed") if (condition(job, k) or {}).get("status") == "True"]
        return job if done else None
    return check


def job_pods(cluster: LocalCluster, ns: str, job: str) -> list[dict[str, Any]]:
    return cluster.get_json("pods", "-n", ns, "-l", f"job-name={job}")["items"]


def one_pod(cluster: LocalCluster, ns: str, job: str, pred: Callable[[dict[str, Any]], bool], what: str,
            timeout: float = 60) -> dict[str, Any]:
    def check():
        pods = [p for p in job_pods(cluster, ns, job) if pred(p)]
        return pods[0] if pods else None
    return cluster.wait_for(f"a pod of job {ns}/{job} {what}", check, timeout=timeout)


def container_state(pod: dict[str, Any]) -> dict[str, Any]:
    return (pod.get("status", {}).get("containerStatuses") or [{}])[0].get("state", {})


def loader_pid(cluster: LocalCluster, pod: dict[str, Any]) -> int:
    """The pid of the pod's process, from the agent's log."""
    meta = pod["metadata"]
    pattern = re.compile(rf"started {re.escape(meta['namespace'])}/{re.escape(meta['name'])} \(pid (\d+)\)")
    found = cluster.wait_for(f"the node agent to start {meta['name']}",
                             lambda: pattern.findall(cluster.log_file("node-agent").read_text()), timeout=30)
    return int(found[-1])


@pytest.fixture
def hub(tmp_path: Path):
    """A hub of the test's own that knows only what a test adds (no default repo)."""
    with HubStandIn() as h:
        yield h


# -- volumes ----------------------------------------------------------------------------------


def test_pending_claims_get_hostpath_volumes_that_go_with_the_claim(cluster: LocalCluster, namespace: str) -> None:
    ns = namespace
    cluster.apply(pvc("classless", size="3Gi"), pvc("fast", size="2Gi", access="ReadWriteOnce", storage_class="fast"),
                  namespace=ns)

    def bound(name):
        return lambda: cluster.get_json("pvc", name, "-n", ns)["status"].get("phase") == "Bound"

    for name, size, access, klass in (("classless", "3Gi", "ReadWriteMany", None),
                                      ("fast", "2Gi", "ReadWriteOnce", "fast")):
        cluster.wait_for(f"PVC {name} to be Bound", bound(name), timeout=60)
        claim = cluster.get_json("pvc", name, "-n", ns)
        pv = cluster.get_json("pv", claim["spec"]["volumeName"])
        assert pv["spec"]["capacity"] == {"storage": size}
        assert pv["spec"]["accessModes"] == [access]
        assert pv["spec"].get("storageClassName") == klass
        assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
        assert {k: pv["spec"]["claimRef"][k] for k in ("namespace", "name", "uid")} == {
            "namespace": ns, "name": name, "uid": claim["metadata"]["uid"]}
        host = cluster.pvc_host_dir(ns, name)
        assert host == Path(pv["spec"]["hostPath"]["path"])
        assert host.is_dir() and host.is_relative_to(cluster.node_dir / "volumes")
        assert host.stat().st_mode & 0o777 == 0o777

    host = cluster.pvc_host_dir(ns, "classless")
    (host / "data").write_text("x")
    pv_name = cluster.get_json("pvc", "classless", "-n", ns)["spec"]["volumeName"]
    cluster.kubectl("delete", "pvc", "classless", "-n", ns)
    cluster.wait_for("the released PV to be deleted",
                     lambda: cluster.kubectl("get", "pv", pv_name, check=False).returncode != 0, timeout=60)
    assert not host.exists()
    assert cluster.get_json("pvc", "fast", "-n", ns)["status"]["phase"] == "Bound"  # the other claim keeps its own


# -- loader pods ------------------------------------------------------------------------------


def test_loader_job_completes_once_the_real_loader_filled_the_volume(cluster: LocalCluster, namespace: str) -> None:
    """No HF_ENDPOINT in the pod: the loader downloads from the node's default hub."""
    ns, repo = namespace, "Qwen/Qwen3-Omni-30B-A3B-Instruct"
    cluster.apply(pvc("weights"), loader_job("loader", "weights", repo), namespace=ns)
    job = cluster.wait_for("the loader Job to finish", job_finished(cluster, ns, "loader"), timeout=120)
    assert (condition(job, "Complete") or {}).get("status") == "True", job["status"]

    model = cluster.pvc_host_dir(ns, "weights") / "model"
    manifest = json.loads((model / ".omni-weights.json").read_text())
    assert manifest["repo"] == repo and manifest["revision"] == "main"
    default = cluster.node_dir / "hub-default"
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        assert (model / name).read_bytes() == (default / name).read_bytes(), name

    [pod] = job_pods(cluster, ns, "loader")
    assert pod["status"]["phase"] == "Succeeded"
    assert (condition(pod, "Ready") or {}).get("status") == "False"
    done = container_state(pod)["terminated"]
    assert done["exitCode"] == 0 and done["reason"] == "Completed"
    assert json.loads(done["message"]) == {"commit": manifest["commit"], "bytes": manifest["bytes"],
                                           "files": len(manifest["files"]), "revision": "main"}
    assert done["startedAt"] <= done["finishedAt"]
    assert (cluster.node_dir / "pods" / pod["metadata"]["uid"] / "loader.log").is_file()


def test_loader_pod_runs_as_long_as_its_process(cluster: LocalCluster, namespace: str, hub: HubStandIn,
                                                tmp_path: Path) -> None:
    """kwok would complete a Job pod at once; a loader pod stays Running while it downloads."""
    ns, repo = namespace, "acme/slow"
    hub.add(repo, {"main": write_placeholder_checkpoint(tmp_path / "ckpt", tensor_bytes=256 * 1024)})
    hub.chunk_size, hub.chunk_delay = 16 * 1024, 0.25  # about 4 s for the weights file
    cluster.apply(pvc("weights"), loader_job("loader", "weights", repo, endpoint=hub.url), namespace=ns)

    pod = one_pod(cluster, ns, "loader", lambda p: p["status"].get("phase") == "Running", "Running")
    cluster.wait_for("the download to begin", lambda: hub.downloads, timeout=30)
    pod = cluster.get_json("pod", pod["metadata"]["name"], "-n", ns)
    assert pod["status"]["phase"] == "Running" and "running" in container_state(pod)
    assert pod["status"]["podIP"]
    assert not (cluster.pvc_host_dir(ns, "weights") / "model").exists()
    job = cluster.get_json("job", "loader", "-n", ns)
    assert not condition(job, "Complete")

    job = cluster.wait_for("the loader Job to finish", job_finished(cluster, ns, "loader"), timeout=120)
    assert (condition(job, "Complete") or {}).get("status") == "True", job["status"]
    assert "model.safetensors" in hub.downloads


def test_unknown_repo_fails_the_job_at_once_with_the_loaders_sentence(
        cluster: LocalCluster, namespace: str, hub: HubStandIn) -> None:
    ns, repo = namespace, "nobody/missing-model"
    cluster.apply(pvc("weights"), loader_job("loader", "weights", repo, endpoint=hub.url), namespace=ns)
    job = cluster.wait_for("the loader Job to finish", job_finished(cluster, ns, "loader"), timeout=120)
    failed = condition(job, "Failed") or {}
    assert failed.get("status") == "True" and failed.get("reason") == "PodFailurePolicy", job["status"]

    time.sleep(2)  # a retry would show up as a second pod
    [pod] = job_pods(cluster, ns, "loader")
    assert pod["status"]["phase"] == "Failed"
    done = container_state(pod)["terminated"]
    assert done["exitCode"] == EXIT_PERMANENT and done["reason"] == "Error"
    assert repo in done["message"]
    log = (cluster.node_dir / "pods" / pod["metadata"]["uid"] / "loader.log").read_text()
    assert done["message"].strip() == log.strip().splitlines()[-1].strip()  # the loader's last stderr line


def test_a_loader_that_leaves_no_termination_message_reports_its_log_tail(
        cluster: LocalCluster, namespace: str) -> None:
    """FallbackToLogsOnError: a failed container with an empty termination log gets its log's tail."""
    ns = namespace
    job = loader_job("loader", "weights", "acme/any")
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["omni-runtime", "no-such-command"]
    cluster.apply(pvc("weights"), job, namespace=ns)
    cluster.wait_for("the loader Job to finish", job_finished(cluster, ns, "loader"), timeout=120)
    [pod] = job_pods(cluster, ns, "loader")
    done = container_state(pod)["terminated"]
    assert done["exitCode"] == EXIT_PERMANENT  # argparse's usage error
    assert "invalid choice: 'no-such-command'" in done["message"]
    assert done["message"].strip() == (
        cluster.node_dir / "pods" / pod["metadata"]["uid"] / "loader.log").read_text().strip()


def test_missing_token_secret_holds_the_pod_until_the_secret_exists(
        cluster: LocalCluster, namespace: str, hub: HubStandIn, tmp_path: Path) -> None:
    ns, repo, token = namespace, "acme/gated", "hf_test_token"
    hub.add(repo, {"main": write_placeholder_checkpoint(tmp_path / "ckpt")}, token=token)
    cluster.apply(pvc("weights"), loader_job("loader", "weights", repo, endpoint=hub.url, token_secret="hf-token"),
                  namespace=ns)

    def config_error(p):
        return container_state(p).get("waiting", {}).get("reason") == "CreateContainerConfigError"

    pod = one_pod(cluster, ns, "loader", config_error, "waiting with CreateContainerConfigError")
    time.sleep(3)  # neither kwok nor the agent may move it on while the Secret is missing
    pod = cluster.get_json("pod", pod["metadata"]["name"], "-n", ns)
    assert container_state(pod)["waiting"] == {"reason": "CreateContainerConfigError",
                                               "message": 'secret "hf-token" not found'}
    assert pod["status"]["phase"] == "Pending"
    assert (condition(pod, "Ready") or {}).get("status") == "False"
    assert not hub.requests

    # the gated repo answers only the right token: the Job completes only with the Secret's value
    cluster.kubectl("create", "secret", "generic", "hf-token", "-n", ns, f"--from-literal=token={token}")
    job = cluster.wait_for("the loader Job to finish", job_finished(cluster, ns, "loader"), timeout=120)
    assert (condition(job, "Complete") or {}).get("status") == "True", job["status"]
    assert [p["metadata"]["name"] for p in job_pods(cluster, ns, "loader")] == [pod["metadata"]["name"]]


def test_deleting_a_loader_pod_stops_its_process(cluster: LocalCluster, namespace: str, hub: HubStandIn,
                                                 tmp_path: Path) -> None:
    ns, repo = namespace, "acme/endless"
    hub.add(repo, {"main": write_placeholder_checkpoint(tmp_path / "ckpt", tensor_bytes=1024 * 1024)})
    hub.chunk_size, hub.chunk_delay = 1024, 0.5  # far longer than the test
    cluster.apply(pvc("weights"), loader_job("loader", "weights", repo, endpoint=hub.url), namespace=ns)
    pod = one_pod(cluster, ns, "loader", lambda p: p["status"].get("phase") == "Running", "Running")
    pid = loader_pid(cluster, pod)
    cluster.wait_for("the download to begin", lambda: hub.downloads, timeout=30)
    assert pid_alive(pid)
    cluster.kubectl("delete", "job", "loader", "-n", ns, "--cascade=foreground", "--wait=false")
    cluster.wait_for("the loader process to end", lambda: not pid_alive(pid), timeout=30)


# -- kwok's own completion of Jobs -----------------------------------------------------------


def test_kwok_completes_other_jobs_but_not_the_operators(cluster: LocalCluster, namespace: str) -> None:
    ns = namespace
    managed = {"app.kubernetes.io/managed-by": "omni-operator", "app.kubernetes.io/component": "other"}
    cluster.apply(plain_job("hook", {"app.kubernetes.io/managed-by": "Helm"}), plain_job("unlabelled", {}),
                  plain_job("managed", managed), namespace=ns)
    for name in ("hook", "unlabelled"):
        job = cluster.wait_for(f"job {name} to finish", job_finished(cluster, ns, name), timeout=60)
        assert (condition(job, "Complete") or {}).get("status") == "True", job["status"]
    # an operator-managed Job pod that is no loader: kwok leaves it Running, the agent does not run it
    pod = one_pod(cluster, ns, "managed", lambda p: p["status"].get("phase") == "Running", "Running")
    time.sleep(3)
    pod = cluster.get_json("pod", pod["metadata"]["name"], "-n", ns)
    assert pod["status"]["phase"] == "Running" and "running" in container_state(pod)
    assert not condition(cluster.get_json("job", "managed", "-n", ns), "Complete")
