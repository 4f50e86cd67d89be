"""Status says why a role is not running, on a private control plane whose node agent runs the
serving pods' processes (e2e/serving_kubelet.py): the missing Secret and the crash loop below are
what that kubelet stand-in reported for real, and the unschedulable pod is the real scheduler's
verdict. No pod status is written by the test.

The weights here are an empty PVC of the user's own (`model.pvc`): the thinker finds no model
there, exits 1 and restarts with a back-off, a real crash loop.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import yaml

from e2e.binaries import ensure_binaries
from e2e.cluster import LocalCluster
from e2e.operator_process import OperatorProcess, install_crd

from .test_operator_cluster import condition, kget, wait

pytestmark = pytest.mark.cluster

NAMESPACE = "default"


@pytest.fixture(scope="module")
def serving_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("serving"), die_with_parent=True, serving=True)
    ensure_binaries(c.bin_dir)
    c.start(timeout=240, build=False)
    try:
        c.serve_pods(c.node_dir / "hub-default")
        install_crd(c)
        c.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "empty-weights", "namespace": NAMESPACE},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
        yield c
    finally:
        c.stop()


def omni(name: str, **spec) -> str:
    body = {"variant": "Thinking", "model": {"pvc": {"claimName": "empty-weights"}},
            "thinker": {"gpu": {"memoryGiB": 80, "countPerNode": 8},
                        "nodePool": {"nodeSelector": {"omni.qwen.ai/pool": "thinker"}}},
            "gateway": {"nodePool": {"nodeSelector": {"omni.qwen.ai/pool": "cpu"}}}}
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value}
    return yaml.safe_dump({"apiVersion": "omni.qwen.ai/v1alpha1", "kind": "OmniDeployment",
                           "metadata": {"name": name, "namespace": NAMESPACE}, "spec": body})


def role_reason(cluster, name: str, role: str, reason: str):
    obj = kget(cluster, "omni", name, "-n", NAMESPACE)
    return obj if obj and (obj.get("status", {}).get(role) or {}).get("reason") == reason else None


def test_status_names_the_missing_secret_and_the_crash_loop_until_they_are_fixed(serving_cluster, tmp_path):
    c = serving_cluster
    with OperatorProcess(c, tmp_path / "operator.log", "--namespace", NAMESPACE, "--pods-checked-after", "3") as op:
        c.kubectl("apply", "-f", "-", input=omni("broken", gateway={"apiKeySecretRef": {"name": "no-keys", "key": "keys"}}))
        wait("the gateway's MissingSecret", lambda: role_reason(c, "broken", "gateway", "MissingSecret"),
             timeout=120, operator=op)
        obj = wait("the thinker's crash loop", lambda: role_reason(c, "broken", "thinker", "CrashLoopBackOff"),
                   timeout=120, operator=op)
        gateway, thinker = obj["status"]["gateway"], obj["status"]["thinker"]
        assert gateway["message"].startswith("pod broken-gateway-") and 'secret "no-keys" not found' in gateway["message"]
        assert thinker["message"].startswith("pod broken-thinker-0 container thinker: exited with 1")
        ready = condition(obj, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "CrashLoopBackOff"  # the first role's problem
        assert "thinker 0/1 ready (CrashLoopBackOff: pod broken-thinker-0" in ready["message"]
        assert "gateway 0/1 ready (MissingSecret: pod broken-gateway-" in ready["message"]
        stalled = condition(obj, "Stalled")  # kstatus: Failed until someone changes something
        assert (stalled["status"], stalled["reason"], stalled["message"]) == ("True", "CrashLoopBackOff", ready["message"])
        printed = c.kubectl("get", "omni", "broken", "-n", NAMESPACE, "-o", "wide").stdout
        assert "CrashLoopBackOff" in printed  # the REASON printer column

        # The Secret appears: the kubelet starts the gateway, and its reason goes away.
        c.kubectl("create", "secret", "generic", "no-keys", "-n", NAMESPACE, "--from-literal=keys=sk-1")
        obj = wait("the gateway's reason to clear", lambda: (o := kget(c, "omni", "broken", "-n", NAMESPACE))
                   and (o["status"].get("gateway") or {}).get("readyReplicas") == 1
                   and "reason" not in o["status"]["gateway"] and o, timeout=120, operator=op)
        assert "gateway" not in condition(obj, "Ready")["message"]
        assert obj["status"]["thinker"]["reason"] == "CrashLoopBackOff"


def test_status_names_the_schedulers_reason_for_a_pod_no_node_takes(serving_cluster, tmp_path):
    c = serving_cluster
    with OperatorProcess(c, tmp_path / "operator.log", "--namespace", NAMESPACE, "--pods-checked-after", "3") as op:
        c.kubectl("apply", "-f", "-", input=omni(
            "nowhere", thinker={"nodePool": {"nodeSelector": {"omni.qwen.ai/pool": "no-such-pool"}}}))
        obj = wait("the thinker's Unschedulable", lambda: role_reason(c, "nowhere", "thinker", "Unschedulable"),
                   timeout=120, operator=op)
        message = obj["status"]["thinker"]["message"]
        assert message.startswith("pod nowhere-thinker-0: 0/") and "node(s) didn't match" in message, message
        assert condition(obj, "Ready")["reason"] == "Unschedulable"
        # a cluster autoscaler may be bringing the node: still converging, not stalled
        assert (condition(obj, "Reconciling")["status"], condition(obj, "Stalled")["status"]) == ("True", "False")


def test_status_names_the_missing_priority_class_no_pod_can_be_created_without(serving_cluster, tmp_path):
    """The Priority admission plugin refuses the pods, so none exists to read: the StatefulSet
    controller's FailedCreate event and the Deployment's ReplicaFailure condition say why."""
    c = serving_cluster
    with OperatorProcess(c, tmp_path / "operator.log", "--namespace", NAMESPACE, "--pods-checked-after", "3") as op:
        c.kubectl("apply", "-f", "-", input=omni(
            "unranked",
            thinker={"nodePool": {"nodeSelector": {"omni.qwen.ai/pool": "thinker"}, "priorityClassName": "gpu-first"}},
            gateway={"nodePool": {"nodeSelector": {"omni.qwen.ai/pool": "cpu"}, "priorityClassName": "gpu-first"}}))
        obj = wait("the thinker's and the gateway's FailedCreate",
                   lambda: role_reason(c, "unranked", "thinker", "FailedCreate")
                   and role_reason(c, "unranked", "gateway", "FailedCreate"), timeout=120, operator=op)
        thinker, gateway = obj["status"]["thinker"], obj["status"]["gateway"]
        assert thinker["message"] == ('Create Pod unranked-thinker-0 in StatefulSet unranked-thinker failed error: '
                                      'pods "unranked-thinker-0" is forbidden: no PriorityClass with name gpu-first '
                                      'was found'), thinker
        assert 'is forbidden: no PriorityClass with name gpu-first was found' in gateway["message"], gateway
        ready = condition(obj, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "FailedCreate"
        assert "thinker 0/1 ready (FailedCreate: Create Pod unranked-thinker-0" in ready["message"]
        assert (condition(obj, "Stalled")["status"], condition(obj, "Stalled")["reason"]) == ("True", "FailedCreate")

        # The PriorityClass appears: the controllers create the pods, and the reason goes away.
        c.kubectl("create", "priorityclass", "gpu-first", "--value=1000")
        try:
            wait("the thinker's reason to change", lambda: (o := kget(c, "omni", "unranked", "-n", NAMESPACE))
                 and (o["status"].get("thinker") or {}).get("reason") not in (None, "FailedCreate") and o,
                 timeout=120, operator=op)
        finally:
            c.kubectl("delete", "priorityclass", "gpu-first", check=False)


def test_status_names_the_image_the_node_cannot_pull(serving_cluster, tmp_path):
    """This node's registry holds only the images the operator renders by default
    (e2e/serving_kubelet.py): another one fails to pull as on a real node, and nothing runs."""
    c = serving_cluster
    image = "registry.example/omni/thinker:no-such-tag"
    with OperatorProcess(c, tmp_path / "operator.log", "--namespace", NAMESPACE, "--pods-checked-after", "3") as op:
        c.kubectl("apply", "-f", "-", input=omni("unpulled", thinker={
            "image": image, "nodePool": {"nodeSelector": {"omni.qwen.ai/pool": "thinker"}}}))
        obj = wait("the thinker's ImagePullBackOff", lambda: role_reason(c, "unpulled", "thinker", "ImagePullBackOff"),
                   timeout=120, operator=op)
        message = obj["status"]["thinker"]["message"]
        assert message.startswith("pod unpulled-thinker-0 container thinker: ") and f'"{image}"' in message, message
        assert condition(obj, "Ready")["reason"] == "ImagePullBackOff"
        assert (condition(obj, "Stalled")["status"], condition(obj, "Stalled")["reason"]) == ("True", "ImagePullBackOff")
        pod = kget(c, "pod", "unpulled-thinker-0", "-n", NAMESPACE)
        waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
        assert pod["status"]["phase"] == "Pending" and waiting["reason"] in ("ErrImagePull", "ImagePullBackOff")
        assert not (c.node_dir / "pods" / pod["metadata"]["uid"] / "thinker.log").exists(), "no process was started"
        # The gateway's image is one the node has: it runs.
        wait("the gateway ready", lambda: ((kget(c, "omni", "unpulled", "-n", NAMESPACE) or {}).get("status", {})
                                           .get("gateway") or {}).get("readyReplicas") == 1, timeout=120, operator=op)
