"""Tier 3: the operator against a real kube-apiserver with kwok GPU node pools."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml
from kubernetes import config as kube_config

from e2e.operator_process import OperatorProcess, install_crd
from omni_operator.api.status import OmniDeploymentStatus
from omni_operator.controller.reconciler import Reconciler
from omni_operator.kube import Kube

from .helpers import example, watch_cache

pytestmark = pytest.mark.cluster


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crd(cluster):
    install_crd(cluster)
    return cluster


@pytest.fixture(scope="module")
def operator(crd, tmp_path_factory):
    op = OperatorProcess(crd, tmp_path_factory.mktemp("operator") / "operator.log", "--all-namespaces")
    op.start()
    yield op
    op.stop()


@pytest.fixture
def kube(cluster) -> Kube:
    return Kube(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))


# ----------------------------------------------------------------------------- helpers


def kget(cluster, *args) -> Any:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def apply(cluster, resource: dict, check: bool = True):
    return cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(resource), check=check)


def omni(name: str, namespace: str, spec: dict | None = None, base: str = "omni.yaml") -> dict:
    resource = example(base)
    resource["metadata"] = {"name": name, "namespace": namespace}
    if spec is not None:
        resource["spec"] = spec
    return resource


def condition(resource: dict | None, type_: str) -> dict:
    for cond in ((resource or {}).get("status") or {}).get("conditions", []):
        if cond["type"] == type_:
            return cond
    return {}


def wait(what: str, check, timeout: float = 90.0, operator: OperatorProcess | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as err:  # reported on timeout
            last = err
        time.sleep(0.3)
    tail = f"\noperator log:\n{operator.log_tail()}" if operator else ""
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}{tail}")


def wait_ready(cluster, namespace: str, name: str, operator: OperatorProcess) -> dict:
    return wait(f"{name} Ready", lambda: (r := kget(cluster, "omni", name, "-n", namespace))
                and condition(r, "Ready").get("status") == "True"
                and r["status"].get("observedGeneration") == r["metadata"]["generation"] and r,
                operator=operator)


def children(cluster, namespace: str, name: str) -> dict[str, dict]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=omni-operator"
    items = kget(cluster, "statefulsets,deployments,services,poddisruptionbudgets", "-n", namespace,
                 "-l", selector)["items"]
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in items}


def pods_by_node_pool(cluster, namespace: str) -> dict[str, str]:
    nodes = {n["metadata"]["name"]: n["metadata"]["labels"].get("omni.qwen.ai/pool")
             for n in kget(cluster, "nodes")["items"]}
    return {p["metadata"]["name"]: nodes.get(p["spec"].get("nodeName"))
            for p in kget(cluster, "pods", "-n", namespace)["items"]}


# ----------------------------------------------------------------------------- tests


def test_omnideployment_converges_onto_the_gpu_pools(cluster, namespace, operator):
    apply(cluster, omni("omni", namespace))
    resource = wait_ready(cluster, namespace, "omni", operator)
    status = resource["status"]
    assert status["thinker"] == {"desiredReplicas": 1, "replicas": 1, "readyReplicas": 1, "ready": "1/1"}
    assert status["talker"]["ready"] == "1/1" and status["gateway"]["ready"] == "1/1"
    assert status["gpus"] == 3
    assert status["sizing"]["thinker"]["tensorParallelSize"] == 2
    # 10.73 GB for one synthesis (the model card) + 2 GB of CUDA graphs + the KV cache of 17 more at 29696
    # tokens (maxInflight unset: what the talker's 24 GiB GPU holds).
    assert status["sizing"]["talker"]["estimatedGB"] == 23.07
    assert status["sizing"]["talker"]["concurrentSequences"] == 18
    assert {c["type"]: c["status"] for c in status["conditions"]} == \
        {"Ready": "True", "Progressing": "False", "Degraded": "False", "SizingValid": "True", "WeightsReady": "True",
         "Reconciling": "False", "Stalled": "False"}
    # every key the operator wrote is one the typed model knows (and so the CRD keeps)
    OmniDeploymentStatus.model_validate(status)
    placement = pods_by_node_pool(cluster, namespace)
    # The weight loader runs on the CPU pool too, never on a GPU node.
    assert placement == {"omni-thinker-0": "thinker", "omni-talker-0": "talker",
                         **{p: "cpu" for p in placement if p.startswith(("omni-gateway-", "omni-weights-"))}}
    pod = kget(cluster, "pod", "omni-thinker-0", "-n", namespace)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    sts = kget(cluster, "statefulset", "omni-thinker", "-n", namespace)
    (owner,) = sts["metadata"]["ownerReferences"]
    assert owner["uid"] == resource["metadata"]["uid"] and owner["controller"] is True
    events = kget(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.kind=OmniDeployment")
    assert "AllReplicasReady" in {e["reason"] for e in events["items"]}


def test_printer_columns(cluster, namespace, operator):
    apply(cluster, omni("cols", namespace))
    wait_ready(cluster, namespace, "cols", operator)
    out = cluster.kubectl("get", "omni", "cols", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "READY", "THINKER", "TALKER", "GPUS", "AGE"]
    assert out[1].split()[:5] == ["cols", "True", "1/1", "1/1", "3"]


def test_update_rolls_out_and_leaves_other_fields_alone(cluster, namespace, operator):
    apply(cluster, omni("roll", namespace))
    wait_ready(cluster, namespace, "roll", operator)
    # Someone else's field on a child (another field manager) must survive our updates.
    cluster.kubectl("annotate", "statefulset", "roll-thinker", "-n", namespace, "team.example/owner=ml")
    resource = omni("roll", namespace)
    resource["spec"]["thinker"]["image"] = "registry.example/thinker:2"
    resource["spec"]["workload"]["maxRequestSeconds"] = 120
    apply(cluster, resource)

    def rolled():
        sts = kget(cluster, "statefulset", "roll-thinker", "-n", namespace)
        container = sts["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        return container["image"] == "registry.example/thinker:2" and env.get("OMNI_DRAIN_SECONDS") == "120" \
            and sts
    sts = wait("thinker rolled out", rolled, operator=operator)
    assert sts["metadata"]["annotations"]["team.example/owner"] == "ml"
    resource = wait_ready(cluster, namespace, "roll", operator)
    assert resource["status"]["observedGeneration"] == resource["metadata"]["generation"] == 2


def test_drift_is_corrected(cluster, namespace, operator):
    apply(cluster, omni("drift", namespace))
    wait_ready(cluster, namespace, "drift", operator)
    cluster.kubectl("patch", "statefulset", "drift-talker", "-n", namespace, "--type=json", "-p",
                    json.dumps([{"op": "replace", "path": "/spec/template/spec/containers/0/image",
                                 "value": "evil/image:latest"}]))
    cluster.kubectl("delete", "service", "drift-gateway", "-n", namespace)
    cluster.kubectl("delete", "pdb", "drift-thinker", "-n", namespace)

    def restored():
        kids = children(cluster, namespace, "drift")
        image = kids["StatefulSet/drift-talker"]["spec"]["template"]["spec"]["containers"][0]["image"]
        return ("Service/drift-gateway" in kids and "PodDisruptionBudget/drift-thinker" in kids
                and image != "evil/image:latest")
    wait("children restored", restored, operator=operator)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r["spec"]["thinker"].update(minReplicas=3, maxReplicas=1), "minReplicas must not exceed maxReplicas"),
    (lambda r: r["spec"].update(variant="Thinking"), "talker is only available for variant Instruct"),
    (lambda r: r["spec"]["model"].update(pvc={"claimName": "weights"}), "set either model.repo or model.pvc"),
    (lambda r: r["metadata"].update(name="x" * 41), "metadata.name must be at most 40 characters"),
    (lambda r: r["spec"]["workload"].update(maxVideoSeconds=-1), "spec.workload.maxVideoSeconds"),
    (lambda r: r["spec"]["thinker"]["gpu"].update(utilization=2), "spec.thinker.gpu.utilization"),
    (lambda r: r["spec"].update(colour="blue"), 'unknown field "spec.colour"'),
    (lambda r: r["spec"]["model"].update(repo="a/b; rm -rf /"), "spec.model.repo"),
    (lambda r: r["spec"]["model"].update(repo=None, pvc={"claimName": "w", "path": "../../etc"}),
     "pvc.path must stay inside the volume"),
    (lambda r: r["spec"].update(replicas=9), "replicas must lie within"),
    (lambda r: r["spec"]["model"].update(repo="acme/finetune"), "model.cache.size is required"),
    (lambda r: r["spec"]["model"]["cache"].update(accessMode="ReadOnlyMany"), "spec.model.cache.accessMode"),
    (lambda r: r["spec"]["model"]["cache"].update(size="a lot"), "spec.model.cache.size"),
])
def test_invalid_resources_are_refused_at_admission(cluster, namespace, crd, mutate, message):
    resource = omni("bad", namespace)
    mutate(resource)
    resource["spec"]["model"] = {k: v for k, v in resource["spec"]["model"].items() if v is not None}
    result = apply(cluster, resource, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert kget(cluster, "omni", resource["metadata"]["name"], "-n", namespace) is None


def test_unsizable_spec_sets_a_condition_and_creates_nothing(cluster, namespace, operator):
    resource = omni("toosmall", namespace)
    resource["spec"]["thinker"]["gpu"] = {"memoryGiB": 16, "countPerNode": 2}
    apply(cluster, resource)
    result = wait("SizingValid=False",
                  lambda: (r := kget(cluster, "omni", "toosmall", "-n", namespace))
                  and condition(r, "SizingValid").get("status") == "False" and r, operator=operator)
    sizing = condition(result, "SizingValid")
    assert sizing["reason"] == "InsufficientGPUMemory"
    assert "77.79 GB" in sizing["message"] and "2 x 16 GiB" in sizing["message"]
    assert condition(result, "Degraded")["status"] == "True"
    # kstatus (Flux, kpt, Config Sync): Failed, with the operator's words
    assert (condition(result, "Stalled")["status"], condition(result, "Stalled")["reason"]) == \
        ("True", "InsufficientGPUMemory")
    assert condition(result, "Stalled")["message"] == sizing["message"]
    assert condition(result, "Reconciling")["status"] == "False"
    assert children(cluster, namespace, "toosmall") == {}


def test_unsizable_update_leaves_running_replicas_untouched(cluster, namespace, operator):
    apply(cluster, omni("keep", namespace))
    wait_ready(cluster, namespace, "keep", operator)
    before = {k: v["metadata"]["resourceVersion"] for k, v in children(cluster, namespace, "keep").items()}
    resource = omni("keep", namespace)
    resource["spec"]["workload"]["maxVideoSeconds"] = 120
    resource["spec"]["thinker"]["gpu"] = {"memoryGiB": 24, "countPerNode": 4}
    apply(cluster, resource)
    result = wait("SizingValid=False", lambda: (r := kget(cluster, "omni", "keep", "-n", namespace))
                  and condition(r, "SizingValid").get("status") == "False" and r, operator=operator)
    assert "131.65 GB" in condition(result, "SizingValid")["message"]
    after = {k: v["metadata"]["resourceVersion"] for k, v in children(cluster, namespace, "keep").items()}
    assert after.keys() == before.keys()
    assert {k: after[k] for k in after if k.startswith(("Service", "PodDisruptionBudget"))} == \
        {k: before[k] for k in before if k.startswith(("Service", "PodDisruptionBudget"))}
    sts = kget(cluster, "statefulset", "keep-thinker", "-n", namespace)
    assert sts["metadata"]["generation"] == 1, "the running thinker was not rolled"
    assert result["status"]["thinker"]["ready"] == "1/1"


def test_variant_change_prunes_the_talker(cluster, namespace, operator):
    apply(cluster, omni("prune", namespace))
    wait_ready(cluster, namespace, "prune", operator)
    resource = omni("prune", namespace)
    resource["spec"]["variant"] = "Thinking"
    resource["spec"]["model"] = {}
    del resource["spec"]["talker"]
    apply(cluster, resource)
    wait("talker pruned", lambda: not [k for k in children(cluster, namespace, "prune") if "talker" in k],
         operator=operator)
    resource = wait_ready(cluster, namespace, "prune", operator)
    assert "talker" not in resource["status"]
    assert resource["status"]["gpus"] == 2  # thinker only: 30 s video -> 2 x 80 GiB


def test_objects_not_owned_are_never_taken_over(cluster, namespace, operator):
    cluster.kubectl("create", "service", "clusterip", "mine-gateway", "-n", namespace, "--tcp=80:80")
    apply(cluster, omni("mine", namespace))
    result = wait("Degraded=True", lambda: (r := kget(cluster, "omni", "mine", "-n", namespace))
                  and condition(r, "Degraded").get("reason") == "ApplyFailed" and r, operator=operator)
    assert "mine-gateway already exists and is not owned" in condition(result, "Degraded")["message"]
    assert (condition(result, "Stalled")["status"], condition(result, "Stalled")["reason"]) == ("True", "ApplyFailed")
    svc = kget(cluster, "service", "mine-gateway", "-n", namespace)
    assert "ownerReferences" not in svc["metadata"] and svc["spec"]["ports"][0]["port"] == 80
    assert children(cluster, namespace, "mine") == {}, "nothing half-applied"
    cluster.kubectl("delete", "omni", "mine", "-n", namespace)
    time.sleep(1)
    assert kget(cluster, "service", "mine-gateway", "-n", namespace) is not None


def test_keda_mode_without_keda_says_what_to_install(cluster, namespace, operator):
    resource = omni("nokeda", namespace)
    resource["spec"]["autoscaling"] = {"mode": "KEDA", "prometheusAddress": "http://prometheus.monitoring:9090"}
    apply(cluster, resource)
    result = wait("Degraded=True", lambda: (r := kget(cluster, "omni", "nokeda", "-n", namespace))
                  and condition(r, "Degraded").get("reason") == "ApplyFailed" and r, operator=operator)
    message = condition(result, "Degraded")["message"]
    assert "keda.sh/v1alpha1 ScaledObject API is not served" in message and "install" in message, message
    assert "404 page not found" not in message


def test_a_gpu_budget_the_minimum_replicas_exceed_is_reported_not_exceeded(cluster, namespace, operator):
    resource = omni("budget", namespace)
    resource["spec"]["autoscaling"] = {"gpuBudget": 0}
    apply(cluster, resource)
    result = wait("SizingValid=False", lambda: (r := kget(cluster, "omni", "budget", "-n", namespace))
                  and condition(r, "SizingValid").get("status") == "False" and r, operator=operator)
    assert "spec.autoscaling.gpuBudget 0 is below the" in condition(result, "SizingValid")["message"]
    assert condition(result, "Ready").get("status") != "True"
    assert children(cluster, namespace, "budget") == {}, "nothing runs past the budget"


def test_delete_garbage_collects_children(cluster, namespace, operator):
    apply(cluster, omni("gone", namespace))
    wait_ready(cluster, namespace, "gone", operator)
    cluster.kubectl("delete", "omni", "gone", "-n", namespace, "--wait=true", "--timeout=60s")
    wait("children collected", lambda: children(cluster, namespace, "gone") == {}, operator=operator)
    wait("pods gone", lambda: not [p for p in pods_by_node_pool(cluster, namespace) if p.startswith("gone-")])


def test_steady_state_reconcile_writes_nothing(cluster, namespace, operator, kube):
    resource = omni("quiet", namespace)
    # Decimal quantities, which the apiserver stores in canonical form ("2500m", "512Mi"): the
    # same amounts, so no drift to repair.
    resource["spec"]["thinker"]["resources"] = {"requests": {"cpu": "2.5", "memory": "0.5Gi"}, "limits": {"memory": "1Gi"}}
    # An affinity, checked at admission against core/v1 Affinity's schema and passed through.
    resource["spec"]["talker"]["nodePool"]["affinity"] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 10, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}]}}
    apply(cluster, resource)
    wait_ready(cluster, namespace, "quiet", operator)
    container = kget(cluster, "statefulset", "quiet-thinker", "-n", namespace)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"] == "2500m" and container["resources"]["requests"]["memory"] == "512Mi"
    reconciler = Reconciler(kube, watch_cache(kube, namespace))
    reconciler.reconcile(namespace, "quiet")  # settle anything the operator had not yet written
    kube.writes.clear()
    outcome = reconciler.reconcile(namespace, "quiet")
    assert (outcome.applied, outcome.pruned, outcome.status_written, outcome.error) == ([], [], False, None)
    assert sum(kube.writes.values()) == 0, kube.writes


def test_a_settled_object_reconciled_from_the_watch_cache_costs_no_api_call(cluster, namespace, operator, kube):
    apply(cluster, omni("cached", namespace))
    wait_ready(cluster, namespace, "cached", operator)
    reconciler = Reconciler(kube, watch_cache(kube, namespace))
    reconciler.reconcile(namespace, "cached")  # settle anything the operator had not yet written
    kube.reads.clear()
    kube.writes.clear()
    outcome = reconciler.reconcile(namespace, "cached")
    assert (outcome.applied, outcome.pruned, outcome.status_written, outcome.error) == ([], [], False, None)
    assert sum(kube.reads.values()) == 0 and sum(kube.writes.values()) == 0, (kube.reads, kube.writes)


def test_operator_killed_mid_reconcile_converges_after_restart(cluster, namespace, crd, tmp_path):
    first = OperatorProcess(crd, tmp_path / "first.log", "--namespace", namespace).start()
    big = omni("restart", namespace)
    big["spec"]["thinker"]["minReplicas"] = 2
    apply(cluster, big)
    # Kill it as soon as it has started writing children: the reconcile is cut short.
    wait("first child", lambda: children(cluster, namespace, "restart"), timeout=60, operator=first)
    first.kill()
    second = OperatorProcess(crd, tmp_path / "second.log", "--namespace", namespace).start()
    try:
        resource = wait_ready(cluster, namespace, "restart", second)
        assert resource["status"]["thinker"]["ready"] == "2/2"
        kids = children(cluster, namespace, "restart")
        assert sorted(kids) == sorted([
            "Deployment/restart-gateway", "PodDisruptionBudget/restart-gateway",
            "PodDisruptionBudget/restart-talker", "PodDisruptionBudget/restart-thinker",
            "Service/restart-gateway", "Service/restart-talker", "Service/restart-talker-headless",
            "Service/restart-thinker", "Service/restart-thinker-headless",
            "StatefulSet/restart-talker", "StatefulSet/restart-thinker"])
        thinker_pods = [p for p in pods_by_node_pool(cluster, namespace) if p.startswith("restart-thinker-")]
        assert sorted(thinker_pods) == ["restart-thinker-0", "restart-thinker-1"]
    finally:
        second.stop()


def test_a_restarted_operator_repairs_what_changed_while_none_ran(cluster, namespace, crd, tmp_path):
    """No watch event tells a new operator that a child went while none ran, and the watch's first
    copy of each object is the one its cache was primed with: it reconciles every object once at
    start. The resync is an hour here, so nothing else brings the Service back."""
    no_resync = ("--namespace", namespace, "--resync-seconds", "3600")
    first = OperatorProcess(crd, tmp_path / "first.log", *no_resync).start()
    try:
        apply(cluster, omni("away", namespace))
        wait_ready(cluster, namespace, "away", first)  # settled: no child event is on its way
    finally:
        first.stop()
    cluster.kubectl("delete", "service", "away-gateway", "-n", namespace, "--wait=true")
    second = OperatorProcess(crd, tmp_path / "second.log", *no_resync).start()
    try:
        wait("the gateway's Service created again",
             lambda: "Service/away-gateway" in children(cluster, namespace, "away"), operator=second)
    finally:
        second.stop()


def test_operator_metrics_report_sizing_and_replicas(cluster, namespace, operator):
    apply(cluster, omni("metrics", namespace))
    wait_ready(cluster, namespace, "metrics", operator)
    text = wait("metrics", lambda: (m := operator.metrics()) and
                f'omni_operator_ready_replicas{{name="metrics",namespace="{namespace}",role="thinker"}} 1.0' in m
                and m, operator=operator)
    assert f'omni_operator_sizing_valid{{name="metrics",namespace="{namespace}"}} 1.0' in text
    assert 'omni_operator_reconcile_total{result="ok"}' in text

    # A role that goes away and an object that is deleted take their series with them, so
    # OmniReplicasNotReady / OmniSizingInvalid cannot keep firing for them.
    talker = f'omni_operator_desired_replicas{{name="metrics",namespace="{namespace}",role="talker"}}'
    assert talker in text
    thinking = omni("metrics", namespace)
    thinking["spec"]["variant"] = "Thinking"
    thinking["spec"]["model"] = {}
    del thinking["spec"]["talker"]
    apply(cluster, thinking)
    wait("talker series removed", lambda: talker not in operator.metrics(), operator=operator)
    cluster.kubectl("delete", "omni", "metrics", "-n", namespace, "--wait=true", "--timeout=60s")
    wait("all series of the deleted object removed",
         lambda: f'name="metrics",namespace="{namespace}"' not in operator.metrics(), operator=operator)


def test_scale_subresource_pins_thinker_replicas(cluster, namespace, operator):
    resource = omni("scaled", namespace)
    apply(cluster, resource)
    wait_ready(cluster, namespace, "scaled", operator)
    cluster.kubectl("scale", "omni", "scaled", "-n", namespace, "--replicas=3")
    result = wait("3 thinkers", lambda: (r := kget(cluster, "omni", "scaled", "-n", namespace))
                  and (r.get("status") or {}).get("thinker", {}).get("ready") == "3/3" and r, operator=operator)
    assert result["status"]["replicas"] == 3
    assert result["status"]["gpus"] == 3 * 2 + 1
    scale = json.loads(cluster.kubectl("get", "--raw",
                                       f"/apis/omni.qwen.ai/v1alpha1/namespaces/{namespace}/omnideployments/"
                                       "scaled/scale").stdout)
    assert scale["status"]["replicas"] == 3 and "component=thinker" in scale["status"]["selector"]
    assert scale["spec"]["replicas"] == 3


def test_operator_works_with_exactly_its_rbac_rules(cluster, namespace, crd, tmp_path):
    """The rules in omni_operator.controller.rbac (what the chart installs) are enough to reconcile."""
    from omni_operator.controller.rbac import rules

    sa, role = "omni-operator", f"omni-operator-{namespace}"
    cluster.kubectl("create", "serviceaccount", sa, "-n", namespace)
    apply(cluster, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": role}, "rules": rules()})
    cluster.kubectl("create", "clusterrolebinding", role, f"--clusterrole={role}",
                    f"--serviceaccount={namespace}:{sa}")
    try:
        sa_config = cluster.service_account_kubeconfig(namespace, sa, tmp_path / "sa-kubeconfig", duration="1h")

        class SaCluster:  # the same cluster, seen with the service account's credentials
            env = dict(cluster.env, KUBECONFIG=str(sa_config))

        op = OperatorProcess(SaCluster, tmp_path / "sa-operator.log", "--all-namespaces").start()
        try:
            apply(cluster, omni("rbac", namespace))
            wait_ready(cluster, namespace, "rbac", op)
            # An RBAC denial reads 'is forbidden: User "system:serviceaccount:..." cannot <verb> resource'
            # (a 403 for a namespace other tests are deleting is not about these rules).
            denials = [line for line in op.log_tail(400).splitlines() if "cannot" in line and "forbidden: User" in line]
            assert not denials, denials
        finally:
            op.stop()
    finally:
        cluster.kubectl("delete", "clusterrolebinding", role, check=False)
        cluster.kubectl("delete", "clusterrole", role, check=False)


def test_leader_election_keeps_a_single_writer(cluster, namespace, crd, tmp_path):
    lease_args = ("--namespace", namespace, "--leader-elect", "--leader-election-namespace", namespace)
    leader = OperatorProcess(crd, tmp_path / "leader.log", *lease_args).start()
    follower = OperatorProcess(crd, tmp_path / "follower.log", *lease_args).start()  # healthy, not ready
    try:
        apply(cluster, omni("elect", namespace))
        wait_ready(cluster, namespace, "elect", leader)
        lease = kget(cluster, "lease", "omni-operator-leader", "-n", namespace)
        assert lease["spec"]["holderIdentity"].endswith(str(leader.proc.pid))
        assert leader.ready() and not follower.ready()
        assert "applied" not in follower.log_tail(), "the follower must not reconcile"
        leader.kill()
        wait("follower takes over", follower.ready, timeout=60, operator=follower)
        cluster.kubectl("delete", "service", "elect-gateway", "-n", namespace)
        wait("new leader repairs drift", lambda: "Service/elect-gateway" in children(cluster, namespace, "elect"),
             operator=follower)
    finally:
        leader.stop()
        follower.stop()


def test_switching_autoscaling_mode_keeps_a_single_writer_of_replicas(cluster, namespace, operator):
    resource = omni("modes", namespace)
    resource["spec"]["autoscaling"] = {"mode": "HPA"}
    apply(cluster, resource)
    wait("HPAs", lambda: len(kget(cluster, "hpa", "-n", namespace)["items"]) == 3, operator=operator)
    # The StatefulSet comes once the weights are cached.
    sts = wait("the thinker StatefulSet", lambda: kget(cluster, "statefulset", "modes-thinker", "-n", namespace,
                                                       "--show-managed-fields"), operator=operator)
    # Created with POST, the StatefulSet's defaulted replicas sit in the create's entry until the HPA
    # scales it (an Update steals them) or the operator's first apply releases them; the operator's
    # apply never claims them.
    managers = {(m["manager"], m["operation"]) for m in sts["metadata"]["managedFields"]
                if "f:replicas" in json.dumps(m.get("fieldsV1", {}).get("f:spec", {}))}
    assert ("omni-operator", "Apply") not in managers, "with an HPA in charge the operator must not own spec.replicas"
    # The HPA's choice is the target the status reports against (someone else scaling is not drift).
    wait("the talker StatefulSet", lambda: kget(cluster, "statefulset", "modes-talker", "-n", namespace),
         operator=operator)  # applied right after the thinker's, in the same reconcile
    cluster.kubectl("scale", "statefulset", "modes-talker", "-n", namespace, "--replicas=2")
    scaled = wait("talker 2/2", lambda: (r := kget(cluster, "omni", "modes", "-n", namespace))
                  and r["status"].get("talker", {}).get("ready") == "2/2" and r, operator=operator)
    assert condition(scaled, "Progressing")["status"] == "False" and condition(scaled, "Ready")["status"] == "True"
    assert scaled["status"]["gpus"] == 2 + 2 * 1  # thinker 1 x 2 GPUs, talker 2 x 1 GPU
    assert kget(cluster, "statefulset", "modes-talker", "-n", namespace)["spec"]["replicas"] == 2
    resource["spec"]["autoscaling"] = {"mode": "Operator"}
    apply(cluster, resource)
    wait("HPAs pruned", lambda: kget(cluster, "hpa", "-n", namespace)["items"] == [], operator=operator)
    wait_ready(cluster, namespace, "modes", operator)
