"""GitOps tier: Flux (source-controller and kustomize-controller, built from their Go modules)
manages the platform from a Git repository served over smart HTTP on loopback, on a private local
control plane whose node agent runs the serving pods' processes for real (tiny random-weight model).

The repository holds what examples/gitops/ describes (e2e/gitops.py): the operator's namespace,
the chart rendered with `helm template`, and examples/omni.yaml. The Kustomization is
examples/gitops/flux-system.yaml as shipped (wait: true, prune: true). The operator runs as a local
process in place of its Deployment's pod (kwok runs no containers), with that pod's ServiceAccount.

The tests are one platform's life, in order: install, a broken commit and its fix, a spec change,
load with Flux reconciling, a hand edit, the removal. Each starts from the example as committed
(`deployed`), so one failing leaves the next a known state.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from e2e.binaries import ensure_binaries
from e2e.cluster import LocalCluster
from e2e.demo_serving import Burst, tiny_model
from e2e.flux import ensure_flux
from e2e.gitops import KUSTOMIZATION_KIND, OPERATOR_NAMESPACE, GitOpsPlatform, condition
from e2e.operator_process import OperatorProcess
from e2e.procs import wait_until
from omni_runtime.config import Env

from .helpers import example

pytestmark = [pytest.mark.gitops, pytest.mark.timeout(1800)]

NAME, NAMESPACE = "qwen3-omni", "default"  # examples/omni.yaml
INSTANCE = f"app.kubernetes.io/instance={NAME},app.kubernetes.io/managed-by=omni-operator"
CHILD_KINDS = "statefulsets,deployments,services,poddisruptionbudgets,persistentvolumeclaims,jobs"
OPERATOR = "omni-operator"  # the operator's field manager
FLUX = "kustomize-controller"  # Flux's field manager
# kstatus' verdict in Flux's own words (fluxcd/pkg/ssa WaitForSet with fail-fast, the default).
FLUX_FAILED = f"failed early due to stalled resources: [OmniDeployment/{NAMESPACE}/{NAME} status: 'Failed']"


class Platform:
    """The GitOps platform of this module, and the operator once Flux has installed it."""

    def __init__(self, cluster: LocalCluster, gitops: GitOpsPlatform, logs: Path):
        self.cluster, self.gitops, self.logs = cluster, gitops, logs
        self.operator: OperatorProcess | None = None

    def omni(self) -> dict[str, Any] | None:
        return self.gitops.get("omni", NAME, NAMESPACE)

    def children(self) -> dict[str, dict[str, Any]]:
        items = json.loads(self.cluster.kubectl("get", CHILD_KINDS, "-n", NAMESPACE, "-l", INSTANCE,
                                                "-o", "json", "--show-managed-fields").stdout)["items"]
        return {f"{o['kind']}/{o['metadata']['name']}": o for o in items}

    def commit_omni(self, spec_change: dict[str, Any] | None, message: str) -> str:
        """Commit examples/omni.yaml with `spec_change` merged into its spec (None: the example as is)."""
        return self.gitops.commit(self.gitops.deploy_files(omni_with(spec_change)), message)

    def deployed(self, spec_change: dict[str, Any] | None = None) -> dict[str, Any]:
        """Git holds the example (with `spec_change`) and Flux reports it Ready and healthy."""
        files = self.gitops.deploy_files(omni_with(spec_change))
        assert self.gitops.repo is not None
        if any(self.gitops.repo.read(name) != text for name, text in files.items()):
            self.gitops.commit(files, "back to examples/omni.yaml")
        return self.gitops.wait_applied(self.gitops.repo.head())

    def log_tail(self) -> str:
        return self.operator.log_tail() if self.operator else "(no operator)"


def omni_with(spec_change: dict[str, Any] | None) -> dict[str, Any]:
    resource = example()
    assert (resource["metadata"]["name"], resource["metadata"]["namespace"]) == (NAME, NAMESPACE)
    return merge(resource, {"spec": spec_change}) if spec_change else resource


def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def managers(obj: dict[str, Any], path: str) -> set[str]:
    """Field managers that own `path` (e.g. "f:spec") in `obj`'s managedFields."""
    return {m["manager"] for m in obj["metadata"].get("managedFields", []) if path in (m.get("fieldsV1") or {})}


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Iterator[Platform]:
    state = tmp_path_factory.mktemp("gitops")
    model = tiny_model()  # cached across runs
    # Serving pods are Ready only once their processes answer the readiness probe, as on a real node.
    cluster = LocalCluster(state / "cluster", die_with_parent=True, serving=True)
    ensure_binaries(cluster.bin_dir)
    ensure_flux()
    cluster.start(timeout=240, build=False)
    gitops = GitOpsPlatform(cluster, state)
    try:
        # The serving pods run for real; the stand-in hub serves the tiny model for any repo.
        cluster.serve_pods(model)
        gitops.start()
        p = Platform(cluster, gitops, state / "logs")
        yield p
    finally:
        if "p" in locals() and p.operator is not None:
            p.operator.stop()
        gitops.stop()
        cluster.serve_pods(None)
        cluster.stop()


@pytest.fixture
def deployed(platform: Platform) -> Platform:
    if platform.operator is None:
        pytest.skip("the install test did not get as far as starting the operator")
    platform.deployed()
    return platform


# ----------------------------------------------------------------------------- 1. install


def test_flux_installs_the_operator_and_the_example_and_is_ready_only_once_the_omnideployment_is(platform):
    gitops = platform.gitops
    sha = gitops.commit(gitops.deploy_files(omni_with(None)), "qwen3-omni: the operator (helm template) and omni.yaml")
    gitops.bootstrap()

    # Flux applies everything; no operator runs yet, so the OmniDeployment has no status of the
    # operator's: observedGeneration 0 (the CRD's default) is behind its generation, and kstatus
    # says InProgress. Flux's health check keeps waiting through several of its polls (5 s apart).
    omni = wait_until("the OmniDeployment from Git", platform.omni, 300, interval=0.5)
    assert FLUX in managers(omni, "f:spec")
    assert omni["status"] == {"observedGeneration": 0} and omni["metadata"]["generation"] == 1
    wait_until("Flux's health check", lambda: "Running health checks" in
               condition(gitops.kustomization(), "Healthy").get("message", ""), 120)
    for _ in range(30):  # 15 s: three health polls
        assert condition(gitops.kustomization(), "Ready").get("status") != "True", "healthy before the operator ran"
        time.sleep(0.5)

    platform.operator = gitops.start_operator(platform.logs / "operator.log")
    ks = gitops.wait_applied(sha)
    omni = platform.omni()
    ready = condition(omni, "Ready")
    assert ready["status"] == "True" and omni["status"]["observedGeneration"] == 1, platform.log_tail()
    assert (condition(omni, "Reconciling")["status"], condition(omni, "Stalled")["status"]) == ("False", "False")
    # Flux turned Ready no earlier than the OmniDeployment (RFC 3339 seconds sort as text).
    assert condition(ks, "Ready")["lastTransitionTime"] >= ready["lastTransitionTime"]
    assert omni["status"]["thinker"]["ready"] == "1/1" and omni["status"]["talker"]["ready"] == "1/1"
    inventory = {e["id"] for e in ks["status"]["inventory"]["entries"]}
    assert f"{NAMESPACE}_{NAME}_omni.qwen.ai_OmniDeployment" in inventory
    assert f"{OPERATOR_NAMESPACE}_qwen3-omni-operator_apps_Deployment" in inventory
    assert "_omnideployments.omni.qwen.ai_apiextensions.k8s.io_CustomResourceDefinition" in inventory
    # Git holds only the OmniDeployment: none of the operator's children is Flux's.
    assert not [e for e in inventory if e.startswith(f"{NAMESPACE}_{NAME}-")]


# ----------------------------------------------------------------------------- 2. unsizable commit


def test_an_unsizable_commit_fails_the_health_check_and_a_fixing_commit_recovers_it(deployed):
    gitops = deployed.gitops
    before = {k: v["metadata"]["generation"] for k, v in deployed.children().items() if k.startswith("StatefulSet")}
    # 120 s of video on 24 GiB GPUs: the thinker needs 131.65 GB, four of them hold 96 GiB.
    sha = deployed.commit_omni({"workload": {"maxVideoSeconds": 120},
                                "thinker": {"gpu": {"memoryGiB": 24, "countPerNode": 4}}}, "longer videos")
    ks = gitops.wait_failed(sha)
    ready = condition(ks, "Ready")
    assert ready["reason"] == "HealthCheckFailed" and FLUX_FAILED in ready["message"], ready
    # Flux names the object and kstatus' verdict; the operator's reason is the Stalled condition's.
    omni = deployed.omni()
    stalled = condition(omni, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "InsufficientGPUMemory"), stalled
    assert "131.65 GB" in stalled["message"] and stalled["observedGeneration"] == omni["metadata"]["generation"]
    # The running replicas were left alone.
    after = {k: v["metadata"]["generation"] for k, v in deployed.children().items() if k.startswith("StatefulSet")}
    assert after == before

    fix = deployed.commit_omni(None, "back to 30 s videos")
    ks = gitops.wait_applied(fix)
    omni = deployed.omni()
    assert condition(omni, "Stalled")["status"] == "False" and condition(omni, "Ready")["status"] == "True"


# ----------------------------------------------------------------------------- 3. spec change


def thinker_pods(platform: Platform) -> dict[str, str]:
    """name -> uid of the thinker's pods."""
    pods = json.loads(platform.cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                                               INSTANCE + ",app.kubernetes.io/component=thinker", "-o", "json").stdout)
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods["items"]}


def test_a_spec_commit_rolls_the_deployment_and_flux_waits_for_the_rollout(deployed):
    gitops = deployed.gitops
    pods_before = thinker_pods(deployed)
    sha = deployed.commit_omni({"workload": {"maxRequestSeconds": 120}}, "thinker: drain for 120 s")
    ks = gitops.wait_applied(sha)
    omni = deployed.omni()
    assert omni["status"]["observedGeneration"] == omni["metadata"]["generation"]
    sts = deployed.children()[f"StatefulSet/{NAME}-thinker"]
    env = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[Env.DRAIN_SECONDS] == "120"
    assert sts["status"]["updateRevision"] == sts["status"]["currentRevision"]
    pods_after = thinker_pods(deployed)
    assert pods_after.keys() == pods_before.keys() and not set(pods_after.values()) & set(pods_before.values()), \
        "every thinker pod was replaced"
    # Flux was healthy only once the operator had stopped reconciling the rollout.
    assert condition(ks, "Ready")["lastTransitionTime"] >= condition(omni, "Reconciling")["lastTransitionTime"]
    assert condition(omni, "Reconciling")["status"] == "False"


# ----------------------------------------------------------------------------- 4. autoscaler and Flux


# Committed for the load test: decisions within seconds, and at most two thinkers on this machine.
LOAD_SPEC = {"thinker": {"maxReplicas": 2}, "talker": {"maxReplicas": 1},
             "autoscaling": {"pollSeconds": 1, "scaleUpStabilizationSeconds": 2, "scaleDownStabilizationSeconds": 20}}


class ReplicaLog:
    """Every change of spec.replicas of the OmniDeployment's StatefulSets and Deployment, and who made it."""

    def __init__(self, platform: Platform):
        self.platform = platform
        self.changes: list[tuple[str, int, int, set[str]]] = []  # (workload, from, to, managers of spec.replicas)
        self.stop = threading.Event()
        self._seen: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> None:
        for key, obj in self.platform.children().items():
            if not key.startswith(("StatefulSet/", "Deployment/")):
                continue
            n = obj["spec"].get("replicas", 1)
            if key in self._seen and self._seen[key] != n:
                owners = {m["manager"] for m in obj["metadata"].get("managedFields", [])
                          if "f:replicas" in ((m.get("fieldsV1") or {}).get("f:spec") or {})}
                self.changes.append((key, self._seen[key], n, owners))
            self._seen[key] = n

    def _run(self) -> None:
        while not self.stop.wait(1.0):  # decisions are seconds apart (stabilization windows)
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the next look
                continue

    def __enter__(self) -> "ReplicaLog":
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(10)
        self.poll()


def gateway(platform: Platform) -> tuple[str, str]:
    pods = json.loads(platform.cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                                               INSTANCE + ",app.kubernetes.io/component=gateway", "-o", "json").stdout)
    pod = next(p for p in pods["items"] if condition(p, "Ready").get("status") == "True")
    ctr = pod["spec"]["containers"][0]
    port = next(p["containerPort"] for p in ctr["ports"] if p["name"] == "http")
    model = next(e.get("value") for e in ctr["env"] if e["name"] == Env.SERVED_MODEL_NAME)
    return f"http://{pod['status']['podIP']}:{port}", model


def test_flux_reconciling_under_load_never_undoes_the_autoscalers_decisions(deployed):
    gitops = deployed.gitops
    ks = deployed.deployed(LOAD_SPEC)
    revision = ks["status"]["lastAppliedRevision"]
    url, model = gateway(deployed)
    reconciles: list[dict[str, Any]] = []
    with ReplicaLog(deployed) as log, Burst(url, model, concurrency=12, max_tokens=400) as burst:
        # Load until the autoscaler has scaled the thinker up, with Flux asked to reconcile again
        # and again meanwhile (each waits for its health check: the scale-up counts as in progress).
        deadline = time.monotonic() + 600
        def thinker_scaled() -> bool:
            return any(w == f"StatefulSet/{NAME}-thinker" for w, *_ in log.changes)
        while time.monotonic() < deadline and (len(reconciles) < 6 or not thinker_scaled()):
            reconciles.append(gitops.wait_handled(gitops.request_reconcile(), timeout=600))
        burst.stop.set()
        # Then the scale-down, with Flux reconciling through it too.
        while time.monotonic() < deadline and (deployed.omni()["status"]["thinker"]["desiredReplicas"] > 1
                                               or burst.in_flight):
            reconciles.append(gitops.wait_handled(gitops.request_reconcile(), timeout=600))
        burst.join(120)
        # The autoscaler records a decision, then scales: let the last one reach the StatefulSet.
        def scaled_as_decided() -> bool:
            sts = deployed.children()[f"StatefulSet/{NAME}-thinker"]
            return sts["spec"]["replicas"] == deployed.omni()["status"]["thinker"]["desiredReplicas"]
        wait_until("the thinker StatefulSet at the autoscaler's last decision", scaled_as_decided, 60)
    omni = deployed.omni()
    decisions = [(d["role"], d["fromReplicas"], d["toReplicas"]) for d in omni["status"].get("lastScaleDecisions", [])]
    assert ("thinker", 1, 2) in decisions and ("thinker", 2, 1) in decisions, (decisions, deployed.log_tail())
    # Every replica change of every workload is one of the autoscaler's decisions, made by the operator.
    for workload, before, after, owners in log.changes:
        role = workload.split("/", 1)[1].removeprefix(f"{NAME}-")
        assert (role, before, after) in decisions, (workload, before, after, decisions)
        assert FLUX not in owners, (workload, owners)
    thinker = [(b, a) for w, b, a, _ in log.changes if w == f"StatefulSet/{NAME}-thinker"]
    assert thinker and thinker == [(b, a) for r, b, a in decisions if r == "thinker"][-len(thinker):], \
        (log.changes, decisions)
    # Flux reconciled all along, the same revision, and never failed.
    assert len(reconciles) >= 6
    for ks in reconciles:
        assert ks["status"]["lastAppliedRevision"] == revision
        assert condition(ks, "Ready")["status"] == "True", condition(ks, "Ready")
    # Nothing the operator writes is in Git: Flux owns the spec, the operator only the status.
    assert FLUX in managers(omni, "f:spec") and OPERATOR not in managers(omni, "f:spec")
    assert burst.answered > 0


# ----------------------------------------------------------------------------- 5. hand edit


def test_a_hand_edit_of_a_git_managed_field_is_reverted_by_flux_and_the_operator_follows(deployed):
    gitops = deployed.gitops
    generation = deployed.omni()["metadata"]["generation"]
    deployed.cluster.kubectl("patch", "omni", NAME, "-n", NAMESPACE, "--type=merge",
                             "-p", json.dumps({"spec": {"talker": {"maxReplicas": 3}}}))
    # The operator takes the edited spec as it takes any spec (it does not judge who wrote it) ...
    wait_until("the operator to observe the edit", lambda: deployed.omni()["status"]["observedGeneration"]
               == generation + 1, 120)
    # ... and Flux, at its next reconcile, puts Git's value back.
    ks = gitops.wait_handled(gitops.request_reconcile())
    omni = deployed.omni()
    assert omni["spec"]["talker"]["maxReplicas"] == 8 and omni["metadata"]["generation"] == generation + 2
    assert condition(ks, "Ready")["status"] == "True"
    omni = wait_until("the operator to observe Flux's revert", lambda: (o := deployed.omni())
                      and o["status"]["observedGeneration"] == generation + 2 and o, 120)
    assert condition(omni, "Ready")["status"] == "True"
    # The operator never wrote the spec, so there is nothing to fight over.
    assert OPERATOR not in managers(omni, "f:spec")
    assert {m["manager"] for m in omni["metadata"]["managedFields"] if m.get("subresource") != "status"} \
        == {FLUX}, omni["metadata"]["managedFields"]
    # Flux applied nothing else: the revert is the whole drift.
    assert ks["status"]["lastAppliedRevision"].endswith(gitops.repo.head())


# ----------------------------------------------------------------------------- 6. removal


def test_removing_the_omnideployment_from_git_prunes_it_and_every_child(deployed):
    gitops = deployed.gitops
    kids = deployed.children()
    assert {"StatefulSet/qwen3-omni-thinker", "StatefulSet/qwen3-omni-talker", "Deployment/qwen3-omni-gateway",
            "Service/qwen3-omni-gateway"} <= kids.keys()
    claims = [k for k in kids if k.startswith("PersistentVolumeClaim/")]
    assert claims, "the weight cache is one of the children"
    sha = gitops.commit(gitops.deploy_files(None), "retire qwen3-omni")
    ks = gitops.wait_applied(sha)
    assert not [e for e in ks["status"]["inventory"]["entries"] if "OmniDeployment" in e["id"]]
    wait_until("the OmniDeployment deleted", lambda: deployed.omni() is None, 120)
    # Its children go with it (owner references), the weight cache's PVC included.
    wait_until("every child collected", lambda: deployed.children() == {}, 180)
    wait_until("every pod gone", lambda: not json.loads(deployed.cluster.kubectl(
        "get", "pods", "-n", NAMESPACE, "-l", INSTANCE, "-o", "json").stdout)["items"], 180)
    # The operator stays, from Git.
    assert gitops.get("deployment", "qwen3-omni-operator", OPERATOR_NAMESPACE) is not None
    assert gitops.get(KUSTOMIZATION_KIND) is not None
