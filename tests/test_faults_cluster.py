"""Tier 3: faults provoked for real against the control plane (no mocks)."""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes import config as kube_config

from e2e.operator_process import OperatorProcess, install_crd
from omni_operator.controller.rbac import rules
from omni_operator.controller.reconciler import Outcome, Reconciler
from omni_operator.kube import Kube

from .helpers import watch_cache
from .test_operator_cluster import apply, children, kget, omni, wait, wait_ready

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    install_crd(cluster)
    op = OperatorProcess(cluster, tmp_path_factory.mktemp("faults") / "operator.log", "--all-namespaces").start()
    yield op
    op.stop()


@pytest.fixture
def kube(cluster) -> Kube:
    return Kube(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))


def test_status_conflict_makes_the_reconcile_start_over(cluster, namespace, operator, kube):
    """A stale read loses against a concurrent status writer (HTTP 409) instead of overwriting it."""
    apply(cluster, omni("conflict", namespace))
    wait_ready(cluster, namespace, "conflict", operator)
    stale = kube.get("OmniDeployment", namespace, "conflict")
    # Another writer (the autoscaler, or a person) changes the status after our read.
    kube.patch_status("OmniDeployment", namespace, "conflict", {"thinker": {"desiredReplicas": 2}})
    stale["status"]["thinker"]["readyReplicas"] = 0  # make our stale view differ so a write is attempted
    outcome = Outcome()
    Reconciler(kube, watch_cache(kube, namespace))._reconcile(stale, outcome)
    assert outcome.requeue and not outcome.status_written
    assert kube.get("OmniDeployment", namespace, "conflict")["status"]["thinker"]["desiredReplicas"] == 2


def test_resources_deleted_while_being_reconciled_leave_nothing_behind(cluster, namespace, operator):
    names = [f"flash-{i}" for i in range(5)]
    docs = [omni(n, namespace) for n in names]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    cluster.kubectl("delete", "omni", *names, "-n", namespace, "--wait=false")
    wait("every child collected",
         lambda: all(children(cluster, namespace, n) == {} for n in names), timeout=120, operator=operator)
    # The operator is still healthy and serving other objects.
    assert operator.healthy()
    apply(cluster, omni("after", namespace))
    wait_ready(cluster, namespace, "after", operator)
    assert "Traceback" not in operator.log_tail(400)


def test_hub_token_is_referenced_never_read_logged_or_stored(cluster, namespace, operator):
    secret_value = "hf_do-not-leak-" + namespace
    cluster.kubectl("create", "secret", "generic", "hf", "-n", namespace, f"--from-literal=token={secret_value}")
    resource = omni("secret", namespace)
    resource["spec"]["model"]["tokenSecretRef"] = {"name": "hf"}
    apply(cluster, resource)
    ready = wait_ready(cluster, namespace, "secret", operator)
    assert secret_value not in json.dumps(ready)
    for obj in children(cluster, namespace, "secret").values():
        assert secret_value not in json.dumps(obj)
    # Only the loader that fetches the weights gets the token, by reference.
    job = kget(cluster, "job", ready["status"]["weights"]["claimName"], "-n", namespace)
    assert secret_value not in json.dumps(job)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    sts = kget(cluster, "statefulset", "secret-thinker", "-n", namespace)
    assert "HF_TOKEN" not in json.dumps(sts)
    assert secret_value not in operator.log_file.read_text()
    assert not [r for r in rules() if "secrets" in r["resources"]], "the operator has no reason to read Secrets"


@pytest.mark.parametrize("patch,message", [
    ({"thinker": {"maxReplicas": 10 ** 12}}, "spec.thinker.maxReplicas"),
    ({"workload": {"maxConcurrentSequences": "many"}}, "spec.workload.maxConcurrentSequences"),
    ({"thinker": {"nodePool": {"nodeSelector": {"pool": "x\ny"}}}}, "nodeSelector keys and values"),
    ({"thinker": {"nodePool": {"nodeSelector": {"bad key!": "x"}}}}, "nodeSelector keys and values"),
    ({"thinker": {"extraArgs": ["x" * 300]}}, "spec.thinker.extraArgs[0]"),
    ({"thinker": {"image": "registry.example/img:1\"; rm -rf /"}}, "spec.thinker.image"),
    ({"model": {"revision": "main$(curl evil)"}}, "spec.model.revision"),
    ({"thinker": {"resources": {"limits": {"memory": "lots"}}}}, "spec.thinker.resources"),
    # Pod validation's rules for tolerations, node selectors and bounds, refused before any child exists.
    ({"thinker": {"nodePool": {"tolerations": [{"key": "bad key!", "operator": "Exists"}]}}},
     "toleration key must be a valid label key"),
    ({"thinker": {"nodePool": {"tolerations": [{"key": "gpü", "operator": "Exists"}]}}},
     "toleration key must be a valid label key"),
    ({"thinker": {"nodePool": {"tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]}}},
     "operator Exists must not have a value"),
    ({"thinker": {"nodePool": {"tolerations": [{"operator": "Equal", "value": "b"}]}}},
     "an empty key must use operator Exists"),
    ({"thinker": {"nodePool": {"tolerations": [{"key": "a", "operator": "Exists", "effect": "NoSchedule",
                                                "tolerationSeconds": 5}]}}},
     "tolerationSeconds is only valid with effect NoExecute"),
    ({"thinker": {"nodePool": {"tolerations": [{"key": "a", "value": "not a value!"}]}}},
     "toleration value must be a valid label value"),
    ({"thinker": {"nodePool": {"nodeSelector": {"a" * 254 + "/k": "v"}}}}, "nodeSelector keys and values"),
    ({"thinker": {"gpu": {"utilization": 0}}}, "utilization must be between 0.5 and 0.98"),
    ({"thinker": {"gpu": {"utilization": 1}}}, "utilization must be between 0.5 and 0.98"),
    # affinity has core/v1 Affinity's published schema: misspellings, wrong types and values are refused.
    ({"thinker": {"nodePool": {"affinity": {"podAntiAffinityy": {}}}}},
     'unknown field "spec.thinker.nodePool.affinity.podAntiAffinityy"'),
    ({"thinker": {"nodePool": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": "x"}}}}},
     "spec.thinker.nodePool.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"),
    ({"thinker": {"nodePool": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Near"}]}]}}}}}}, 'Unsupported value: "Near"'),
    # Quantities and resource names as Pod validation takes them.
    # ("1e100" as a string too, but a YAML dump leaves it unquoted and kubectl then reads a number)
    ({"thinker": {"resources": {"limits": {"memory": "2000P"}}}}, "quantities must be at least 0 and less than 1Ei"),
    ({"thinker": {"resources": {"limits": {"memory": "99999999999999999999999Ei"}}}},
     "quantities must be at least 0 and less than 1Ei"),
    ({"thinker": {"resources": {"requests": {"cpu": -1}}}}, "quantities must be at least 0 and less than 1Ei"),
    ({"thinker": {"resources": {"requests": {"not a resource!": "1"}}}}, "resource names must be qualified names"),
    ({"thinker": {"resources": {"requests": {"memory": {"gib": 2}}}}}, "spec.thinker.resources.requests.memory"),
    ({"thinker": {"resources": {"requests": {"memory": "64Gi"}, "limits": {"memory": "32Gi"}}}},
     "every request must be at most its limit"),
])
def test_hostile_specs_are_refused_at_admission(cluster, namespace, operator, patch, message):
    resource = omni("hostile", namespace)
    for section, value in patch.items():
        resource["spec"][section] = {**resource["spec"].get(section, {}), **value}
    result = apply(cluster, resource, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert kget(cluster, "omni", "hostile", "-n", namespace) is None


def test_operator_survives_an_apiserver_restart(cluster, namespace, operator):
    apply(cluster, omni("outage", namespace))
    wait_ready(cluster, namespace, "outage", operator)
    cluster.restart_apiserver(down_seconds=3)
    assert operator.healthy(), "the operator must ride out the outage, not exit"
    # Its watches came back: drift is still repaired and new objects are still served.
    cluster.kubectl("delete", "service", "outage-gateway", "-n", namespace)
    wait("drift repaired after the restart", lambda: "Service/outage-gateway" in children(cluster, namespace, "outage"),
         timeout=120, operator=operator)
    apply(cluster, omni("after-outage", namespace))
    wait_ready(cluster, namespace, "after-outage", operator)
