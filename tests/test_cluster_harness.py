"""The local control plane itself: RBAC, service-account tokens, the fake GPU node
pools, scheduling onto them, garbage collection, and the kubectl/helm clients."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.binaries import pinned_versions
from e2e.cluster import REPO_ROOT, LocalCluster
from e2e.nodes import GPU_RESOURCE, GPU_TAINT, NODE_POOLS, POD_CIDR, POOL_LABEL, POOLS

pytestmark = pytest.mark.cluster


# -- helpers -------------------------------------------------------------------


def _pod_spec(pool: str | None, gpus: int = 0, **extra: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "registry.invalid/omni/test:1"}
    if gpus:
        container["resources"] = {"limits": {GPU_RESOURCE: str(gpus)}}
    spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 0}
    if pool:
        spec["nodeSelector"] = POOLS[pool].node_selector
        spec["tolerations"] = POOLS[pool].tolerations
    spec.update(extra)
    return spec


def _pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def _is_ready(pod: dict[str, Any]) -> bool:
    cond = _condition(pod, "Ready")
    return pod.get("status", {}).get("phase") == "Running" and bool(cond) and cond["status"] == "True"


def _wait_pod(cluster: LocalCluster, ns: str, name: str, pred, what: str, timeout: float = 60) -> dict[str, Any]:
    def check():
        pod = cluster.get_json("pod", name, "-n", ns)
        return pod if pred(pod) else None

    return cluster.wait_for(f"pod {ns}/{name} {what}", check, timeout=timeout)


# -- API server, authentication, RBAC ------------------------------------------


def test_apiserver_is_ready_and_rbac_is_on(cluster: LocalCluster) -> None:
    assert cluster.api("GET", "/readyz")[0] == 200
    assert cluster.server.startswith("https://127.0.0.1:")
    groups = cluster.kubectl("api-versions").stdout.split()
    assert "rbac.authorization.k8s.io/v1" in groups
    # the admin client certificate (O=system:masters) may do anything
    assert cluster.kubectl("auth", "can-i", "*", "*", "--all-namespaces").stdout.strip() == "yes"


def test_anonymous_and_bad_credentials_are_refused(cluster: LocalCluster) -> None:
    status, body = cluster.api("GET", "/api/v1/namespaces", anonymous=True)
    assert status == 403, body
    assert body["details"]["kind"] == "namespaces"
    assert 'system:anonymous' in body["message"]
    status, _ = cluster.api("GET", "/api/v1/namespaces", token="not-a-valid-token")
    assert status == 401


def test_service_account_token_is_authorized_only_by_its_rbac(cluster: LocalCluster, namespace: str) -> None:
    ns = namespace
    cluster.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader", "namespace": ns}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "configmap-reader", "namespace": ns},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "visible", "namespace": ns},
         "data": {"k": "v"}},
    )
    # TokenRequest API
    token = cluster.kubectl("create", "token", "reader", "-n", ns, "--duration=10m").stdout.strip()
    assert token.count(".") == 2  # a JWT

    status, review = cluster.api(
        "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}, token=token,
    )
    assert status == 201, review
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:reader"

    # allowed by the Role (the RBAC cache may need a moment to see the new binding)
    cluster.wait_for("the RoleBinding to take effect",
                     lambda: cluster.api("GET", f"/api/v1/namespaces/{ns}/configmaps", token=token)[0] == 200)
    status, cm = cluster.api("GET", f"/api/v1/namespaces/{ns}/configmaps/visible", token=token)
    assert status == 200 and cm["data"] == {"k": "v"}
    # and nothing else
    assert cluster.api("GET", f"/api/v1/namespaces/{ns}/secrets", token=token)[0] == 403
    assert cluster.api("GET", "/api/v1/namespaces/default/configmaps", token=token)[0] == 403
    assert cluster.api("GET", "/api/v1/nodes", token=token)[0] == 403
    status, _ = cluster.api(
        "POST", f"/api/v1/namespaces/{ns}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nope"}}, token=token,
    )
    assert status == 403
    # kubectl's view of the same permissions
    can = cluster.kubectl("auth", "can-i", "delete", "configmaps", "-n", ns,
                          f"--as=system:serviceaccount:{ns}:reader", check=False)
    assert can.stdout.strip() == "no"


# -- node pools ----------------------------------------------------------------


def test_node_pools_have_gpu_capacity_labels_and_taints(cluster: LocalCluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in cluster.get_json("nodes")["items"]}
    expected = {name for pool in NODE_POOLS for name in pool.nodes}
    assert expected <= set(nodes)
    assert {p.name for p in NODE_POOLS} == {"thinker", "talker", "cpu"}
    for pool in NODE_POOLS:
        assert len(pool.nodes) == 2
        for name in pool.nodes:
            node = nodes[name]
            labels = node["metadata"]["labels"]
            assert labels[POOL_LABEL] == pool.name
            assert labels["type"] == "kwok"
            assert _condition(node, "Ready")["status"] == "True", name
            for key in ("capacity", "allocatable"):
                res = node["status"][key]
                if pool.has_gpus:
                    assert res[GPU_RESOURCE] == str(pool.gpus_per_node)
                else:
                    assert GPU_RESOURCE not in res
            taints = node["spec"].get("taints", [])
            if pool.has_gpus:
                assert labels["nvidia.com/gpu.product"] == pool.gpu_product
                assert labels["nvidia.com/gpu.memory"] == str(pool.gpu_memory_mib)
                assert {"key": GPU_TAINT["key"], "value": GPU_TAINT["value"], "effect": GPU_TAINT["effect"]} in [
                    {k: t.get(k) for k in ("key", "value", "effect")} for t in taints
                ]
            else:
                assert not [t for t in taints if t["key"] == GPU_TAINT["key"]]

    thinker, talker = POOLS["thinker"], POOLS["talker"]
    assert (thinker.gpus_per_node, thinker.gpu_product, thinker.gpu_memory_mib) == (8, "NVIDIA-H100-80GB-HBM3", 81559)
    assert (talker.gpus_per_node, talker.gpu_product, talker.gpu_memory_mib) == (4, "NVIDIA-L4", 23034)
    assert nodes["thinker-gpu-0"]["status"]["capacity"]["cpu"] == "96"
    assert nodes["thinker-gpu-0"]["status"]["capacity"]["memory"] == "1Ti"
    assert nodes["thinker-gpu-0"]["status"]["capacity"]["pods"] == "110"


# -- scheduling onto the pools ---------------------------------------------------


def test_gpu_statefulset_lands_on_thinker_nodes_and_becomes_ready(cluster: LocalCluster, namespace: str) -> None:
    ns = namespace
    labels = {"app": "thinker-test"}
    cluster.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "thinker", "namespace": ns},
            "spec": {
                "replicas": 2,
                "serviceName": "thinker",
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": _pod_spec("thinker", gpus=4)},
            },
        }
    )

    def ready():
        sts = cluster.get_json("statefulset", "thinker", "-n", ns)
        return sts.get("status", {}).get("readyReplicas") == 2

    cluster.wait_for("statefulset thinker to have 2 ready replicas", ready, timeout=90)
    pods = cluster.get_json("pods", "-n", ns, "-l", "app=thinker-test")["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == ["thinker-0", "thinker-1"]
    cidr = ipaddress.ip_network(POD_CIDR)
    for pod in pods:
        assert pod["spec"]["nodeName"] in POOLS["thinker"].nodes
        assert _is_ready(pod)
        assert ipaddress.ip_address(pod["status"]["podIP"]) in cidr
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits[GPU_RESOURCE] == "4"


def test_talker_pod_lands_on_a_talker_node(cluster: LocalCluster, namespace: str) -> None:
    cluster.apply(_pod("talker", _pod_spec("talker", gpus=2)), namespace=namespace)
    pod = _wait_pod(cluster, namespace, "talker", _is_ready, "Ready")
    assert pod["spec"]["nodeName"] in POOLS["talker"].nodes


def test_untolerating_pod_avoids_the_gpu_pools(cluster: LocalCluster, namespace: str) -> None:
    cluster.apply(_pod("plain", _pod_spec(None)), namespace=namespace)
    pod = _wait_pod(cluster, namespace, "plain", _is_ready, "Ready")
    assert pod["spec"]["nodeName"] in POOLS["cpu"].nodes


def test_pod_asking_more_gpus_than_any_node_stays_pending(cluster: LocalCluster, namespace: str) -> None:
    most = max(p.gpus_per_node for p in NODE_POOLS)
    spec = _pod_spec(None, gpus=most * 2, tolerations=[{"key": GPU_TAINT["key"], "operator": "Exists"}])
    cluster.apply(_pod("too-big", spec), namespace=namespace)

    def unschedulable(pod):
        cond = _condition(pod, "PodScheduled")
        return bool(cond) and cond["status"] == "False" and cond.get("reason") == "Unschedulable"

    pod = _wait_pod(cluster, namespace, "too-big", unschedulable, "Unschedulable")
    assert f"Insufficient {GPU_RESOURCE}" in _condition(pod, "PodScheduled")["message"]
    time.sleep(2)
    pod = cluster.get_json("pod", "too-big", "-n", namespace)
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_pod_ip_is_a_local_address(cluster: LocalCluster, namespace: str) -> None:
    """Later tiers run real processes on pod IPs: the address must be bindable here."""
    cluster.apply(_pod("ip", _pod_spec("cpu")), namespace=namespace)
    pod = _wait_pod(cluster, namespace, "ip", _is_ready, "Ready")
    ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(POD_CIDR)
    with socket.socket() as server:
        server.bind((ip, 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


# -- controllers -----------------------------------------------------------------


def test_owner_reference_garbage_collection(cluster: LocalCluster, namespace: str) -> None:
    ns = namespace
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": ns}})
    uid = cluster.get_json("configmap", "owner", "-n", ns)["metadata"]["uid"]
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "namespace": ns,
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
            },
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bystander", "namespace": ns}},
    )
    cluster.kubectl("delete", "configmap", "owner", "-n", ns)

    def child_gone():
        return cluster.kubectl("get", "configmap", "child", "-n", ns, check=False).returncode != 0

    cluster.wait_for("the garbage collector to delete the child", child_gone, timeout=60)
    assert cluster.kubectl("get", "configmap", "bystander", "-n", ns).returncode == 0


# -- clients ---------------------------------------------------------------------


def test_kubectl_and_helm_work_against_the_cluster(cluster: LocalCluster, namespace: str, tmp_path: Path) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == pinned_versions()["K8S_VERSION"]
    assert version["clientVersion"]["gitVersion"].startswith("v1.")

    helm_version = cluster.helm("version", "--short").stdout.strip()
    assert helm_version.startswith("v"), helm_version

    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-probe\n"
        "data:\n  pool: {{ .Values.pool | quote }}\n"
    )
    (chart / "values.yaml").write_text("pool: thinker\n")
    cluster.helm("install", "probe", str(chart), "-n", namespace, "--wait", "--timeout", "60s")
    cm = cluster.get_json("configmap", "probe-probe", "-n", namespace)
    assert cm["data"] == {"pool": "thinker"}
    releases = json.loads(cluster.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [r["name"] for r in releases] == ["probe"]
    cluster.helm("uninstall", "probe", "-n", namespace)


# -- the harness itself ----------------------------------------------------------


def test_start_reuses_a_running_cluster_and_cli(cluster: LocalCluster) -> None:
    again = LocalCluster(cluster.state_dir)
    t0 = time.monotonic()
    again.start()  # must reuse, not restart
    assert time.monotonic() - t0 < 10
    assert again.server == cluster.server
    assert again.hub_url == cluster.hub_url  # the node agent of the running cluster, not a new one
    assert again.is_running()

    cli = [sys.executable, "-m", "e2e.cluster"]
    status = subprocess.run([*cli, "status", "--state-dir", str(cluster.state_dir)],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "healthy" in status.stdout
    assert re.search(r"node-agent\s+running", status.stdout), status.stdout
    env = subprocess.run([*cli, "env", "--state-dir", str(cluster.state_dir)],
                         capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert f"export KUBECONFIG={cluster.kubeconfig}" in env.stdout
    assert str(cluster.bin_dir) in env.stdout
    assert cluster.env["KUBECONFIG"] == str(cluster.kubeconfig)
    assert cluster.env["PATH"].split(":")[0] == str(cluster.bin_dir)


def test_a_serving_cluster_s_kwok_gives_serving_pods_an_address_but_never_ready(tmp_path: Path) -> None:
    """Only the node agent's probes may make the operator's serving pods Ready (it serves none
    here); kwok still runs every other pod as before."""
    c = LocalCluster(tmp_path / "probed", die_with_parent=True, serving=True)
    c.start(timeout=240, build=False)
    try:
        serving = _pod("omni-thinker-0", _pod_spec("cpu"))
        serving["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "omni-operator",
                                         "app.kubernetes.io/component": "thinker"}
        other = _pod("plain", _pod_spec("cpu"))
        other["metadata"]["labels"] = {"app.kubernetes.io/component": "thinker"}  # not the operator's
        c.apply(serving, other, namespace="default")
        c.wait_for("the plain pod Ready", lambda: _is_ready(c.get_json("pod", "plain", "-n", "default")), timeout=60)
        def addressed() -> dict[str, Any] | None:
            pod = c.get_json("pod", "omni-thinker-0", "-n", "default")
            return pod if pod.get("status", {}).get("podIP") else None
        pod = c.wait_for("the serving pod's address", addressed, timeout=60)
        assert pod["status"]["phase"] == "Pending" and _condition(pod, "Ready")["status"] == "False"
        assert not [s for s in pod["status"].get("containerStatuses") or [] if s.get("ready")]
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(POD_CIDR)
    finally:
        c.stop()
