"""The Helm chart (charts/qwen3-omni).

Pure tier: `helm lint` and `helm template` of every ci/*-values.yaml scenario, each object validated
strictly against the Kubernetes JSON schemas (custom resources against their CRD instead), the values
schema refusing bad input with readable messages, monitoring objects gated on their API, the alerts
against their promtool unit tests, the README and the Argo CD health check.

Cluster tier: install, upgrade and uninstall against the local control plane.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from e2e.binaries import tool

from .helpers import ROOT, validate_against_crd, validate_k8s

pytestmark = pytest.mark.schema

CHART = ROOT / "charts" / "qwen3-omni"
CI_DIR = CHART / "ci"
SCENARIOS = sorted(p.name for p in CI_DIR.glob("*-values.yaml"))
RULES_FILE = CHART / "files" / "rbac-rules.yaml"
CHART_CRD = CHART / "files" / "crds" / "omnideployment.yaml"
LUA_FILE = CHART / "files" / "argocd-health.lua"
KUBE_VERSION = "1.34.0"
RELEASE, NAMESPACE = "qo", "omni-system"
OPERATOR = f"{RELEASE}-qwen3-omni-operator"
MONITORING_API = "monitoring.coreos.com/v1"
OMNI_API = "omni.qwen.ai/v1alpha1/OmniDeployment"
CRD_NAME = "omnideployments.omni.qwen.ai"
# Kinds served by CRDs: not in the Kubernetes schemas.
CRD_GROUPS = {"monitoring.coreos.com", "omni.qwen.ai"}


# --------------------------------------------------------------------------------------- helm


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # A private HOME-independent config so a developer's repositories and plugins don't interfere.
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/qwen3-omni-helm/cache",
               HELM_CONFIG_HOME="/tmp/qwen3-omni-helm/config", HELM_DATA_HOME="/tmp/qwen3-omni-helm/data")
    proc = subprocess.run([str(tool("helm")), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc


def _value_args(values: tuple[str, ...] = (), sets: tuple[str, ...] = (), api_versions: tuple[str, ...] = ()
                ) -> list[str]:
    args: list[str] = []
    for v in values:
        args += ["-f", str(CI_DIR / v)]
    for s in sets:
        args += ["--set", s]
    for a in api_versions:
        args += ["--api-versions", a]
    return args


@functools.cache
def render(values: tuple[str, ...] = (), sets: tuple[str, ...] = (), api_versions: tuple[str, ...] = ()
           ) -> tuple[dict[str, Any], ...]:
    out = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION,
               *_value_args(values, sets, api_versions)).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def scenario_api_versions(scenario: str) -> tuple[str, ...]:
    return (MONITORING_API,) if "monitoring" in scenario else ()


def find(docs, kind: str, name: str | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def one(docs, kind: str, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def generated_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES_FILE.read_text())


def operator_container(docs) -> dict[str, Any]:
    return one(docs, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]


def pod_specs(docs) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] == "Pod":
            yield d["metadata"]["name"], d["spec"]
        elif d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


# --------------------------------------------------------------------------- lint and render


def test_ci_scenarios_cover_the_main_configurations():
    assert {"default-values.yaml", "namespaced-values.yaml", "monitoring-values.yaml",
            "default-omnideployment-values.yaml", "ha-leader-election-values.yaml"} <= set(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint(scenario):
    result = helm("lint", "--strict", str(CHART), "-f", str(CI_DIR / scenario), "--kube-version", KUBE_VERSION)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid(scenario):
    docs = render((scenario,), api_versions=scenario_api_versions(scenario))
    assert docs
    seen = set()
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        assert key not in seen, f"rendered twice: {key}"
        seen.add(key)
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if group == "omni.qwen.ai":
            validate_against_crd(doc)
        elif group == "monitoring.coreos.com":
            assert doc["apiVersion"] == MONITORING_API
            assert doc["kind"] in {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
        else:
            validate_k8s(doc)
        if doc["kind"] not in {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}:
            assert doc["metadata"].get("namespace"), f"{doc['kind']} {doc['metadata']['name']} has no namespace"
        # Objects that hold JSON embedded in a string (the hook's OMNI_OBJECT) are checked separately.


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_meet_the_restricted_pod_security_standard(scenario):
    docs = render((scenario,), api_versions=scenario_api_versions(scenario))
    specs = list(pod_specs(docs))
    assert specs
    for name, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "limits" in c["resources"] and "memory" in c["resources"]["limits"], name


def test_operator_deployment_defaults():
    docs = render()
    deploy = one(docs, "Deployment", OPERATOR)
    pod = deploy["spec"]["template"]["spec"]
    c = operator_container(docs)
    assert c["image"] == f"ghcr.io/qwen3-omni/operator:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    assert c["command"] == ["omni-operator"]
    assert c["args"] == ["run", "--all-namespaces", "--health-port=8080", "--metrics-port=9400"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 8080, "metrics": 9400}
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == "64Mi"
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert not find(docs, "Role") and not find(docs, "PodDisruptionBudget")
    # Selector: the operator's pods only, never the runtime pods that share app.kubernetes.io/name.
    assert deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"


def test_image_digest_wins_over_tag_runtime_images_come_from_the_mirror_and_extra_args_are_appended():
    c = operator_container(render(("external-crds-values.yaml",)))
    assert c["image"].startswith("registry.example.com/mirror/qwen3-omni-operator@sha256:")
    assert c["args"][-3:] == ["--image-repository=registry.example.com/mirror", "--image-tag=1.2.3", "--verbose"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]


def test_metrics_service_selects_the_operator_pods():
    docs = render()
    svc = one(docs, "Service", OPERATOR)
    pod_labels = one(docs, "Deployment", OPERATOR)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "metrics": (9400, "metrics"), "health": (8080, "health")}


@pytest.mark.parametrize("sets", [("replicaCount=3",), ("leaderElection.enabled=true",)])
def test_leader_election(sets):
    docs = render(sets=sets)
    c = operator_container(docs)
    assert "--leader-elect" in c["args"]
    role = one(docs, "Role", f"{OPERATOR}-leader-election", NAMESPACE)
    lease_rules = [r for r in role["rules"] if r["resources"] == ["leases"]]
    assert lease_rules and lease_rules[0]["apiGroups"] == ["coordination.k8s.io"]
    assert {"get", "create", "update"} <= set(lease_rules[0]["verbs"])
    binding = one(docs, "RoleBinding", f"{OPERATOR}-leader-election", NAMESPACE)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]
    strategy = one(docs, "Deployment", OPERATOR)["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_ha_scenario_spreads_replicas_and_has_a_disruption_budget():
    docs = render(("ha-leader-election-values.yaml",))
    deploy = one(docs, "Deployment", OPERATOR)
    assert deploy["spec"]["replicas"] == 3
    affinity = deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == \
        "kubernetes.io/hostname"
    pdb = one(docs, "PodDisruptionBudget", OPERATOR)
    assert pdb["spec"]["selector"] == deploy["spec"]["selector"]


def test_operator_disruption_budget_never_blocks_evicting_an_unhealthy_pod():
    # A crash-looping operator pod must not hold up a node drain.
    pdb = one(render(("ha-leader-election-values.yaml",)), "PodDisruptionBudget", OPERATOR)
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_cluster_role_rules_are_the_generated_rules():
    docs = render()
    role = one(docs, "ClusterRole")
    assert role["rules"] == generated_rules()
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]


def _grants(rules) -> set[tuple[str, str, str]]:
    return {(g, res, verb) for r in rules for g in r.get("apiGroups", []) for res in r.get("resources", [])
            for verb in r["verbs"]}


def test_namespaced_mode_splits_the_rules_into_roles_and_a_cluster_role():
    docs = render(("namespaced-values.yaml",))
    c = operator_container(docs)
    assert "--all-namespaces" not in c["args"]
    assert [a for a in c["args"] if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    roles = {r["metadata"]["namespace"]: r for r in find(docs, "Role")}
    assert set(roles) == {"team-a", "team-b"}
    for ns, role in roles.items():
        binding = one(docs, "RoleBinding", role["metadata"]["name"], ns)
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    cluster_role = one(docs, "ClusterRole")
    cluster_grants = _grants(cluster_role["rules"])
    # Only cluster-scoped resources go cluster-wide ...
    assert {res for _, res, _ in cluster_grants} <= {"namespaces", "customresourcedefinitions", "nodes"}
    # ... and together nothing of the generated rules is lost or widened.
    assert _grants(roles["team-a"]["rules"]) | cluster_grants == _grants(generated_rules())
    assert not _grants(roles["team-a"]["rules"]) & cluster_grants


def test_crd_is_the_generated_one_kept_on_uninstall_and_optional():
    crd = one(render(), "CustomResourceDefinition")
    generated = yaml.safe_load(CHART_CRD.read_text())
    assert crd["spec"] == generated["spec"]
    assert crd["spec"] == yaml.safe_load((ROOT / "crds" / "omnideployment.yaml").read_text())["spec"]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["name"] == CRD_NAME
    assert not find(render(sets=("crds.install=false",)), "CustomResourceDefinition")


# ------------------------------------------------------------------------------- monitoring


def test_monitoring_objects_need_the_prometheus_operator_api():
    without = render(("monitoring-values.yaml",))
    assert not [d for d in without if d["apiVersion"].startswith("monitoring.coreos.com")]
    assert find(without, "ConfigMap", f"{RELEASE}-qwen3-omni-dashboard")  # a plain ConfigMap: always
    with_api = render(("monitoring-values.yaml",), api_versions=(MONITORING_API,))
    assert {d["kind"] for d in with_api if d["apiVersion"] == MONITORING_API} == \
        {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    # Off by default even where the API exists.
    assert not [d for d in render(api_versions=(MONITORING_API,)) if d["apiVersion"] == MONITORING_API]


def test_service_monitor_scrapes_the_operator_service():
    docs = render(("monitoring-values.yaml",), api_versions=(MONITORING_API,))
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service", OPERATOR)
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_pod_monitor_scrapes_the_runtime_pods():
    pm = one(render(("monitoring-values.yaml",), api_versions=(MONITORING_API,)), "PodMonitor")
    sel = pm["spec"]["selector"]
    assert sel["matchLabels"] == {"app.kubernetes.io/name": "qwen3-omni", "app.kubernetes.io/managed-by": "omni-operator"}
    assert sel["matchExpressions"][0]["values"] == ["thinker", "talker", "gateway"]
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    endpoints = {e["port"]: e for e in pm["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"metrics", "http"}
    keep = [r for r in endpoints["http"]["relabelings"] if r.get("action") == "keep"]
    assert keep and keep[0]["regex"] == "thinker"
    # Namespaced mode narrows it.
    pm_ns = one(render(("monitoring-values.yaml", "namespaced-values.yaml"), api_versions=(MONITORING_API,)),
                "PodMonitor")
    assert pm_ns["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_prometheus_rule_alerts():
    rule = one(render(("monitoring-values.yaml",), api_versions=(MONITORING_API,)), "PrometheusRule")
    rules = rule["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert set(alerts) == {"OmniQueueBackingUp", "OmniReplicasNotReady", "OmniSizingInvalid", "OmniWeightsFailed",
                           "OmniOperatorDown", "OmniReconcileErrors"}
    q = alerts["OmniQueueBackingUp"]
    assert "omni_queue_depth" in q["expr"] and q["expr"].rstrip().endswith("> 16") and q["for"] == "5m"
    r = alerts["OmniReplicasNotReady"]["expr"]
    assert "omni_operator_desired_replicas" in r and "omni_operator_ready_replicas" in r and "!= 0" in r
    assert "omni_operator_sizing_valid" in alerts["OmniSizingInvalid"]["expr"]
    assert alerts["OmniWeightsFailed"]["expr"].rstrip().endswith("== -1")
    assert f'job="{OPERATOR}"' in alerts["OmniOperatorDown"]["expr"]
    assert 'omni_operator_reconcile_total{' in alerts["OmniReconcileErrors"]["expr"]
    assert 'result!="ok"' in alerts["OmniReconcileErrors"]["expr"]
    assert "omni_operator_leader" not in r  # one replica: no Lease
    for name, a in alerts.items():
        assert a["labels"]["severity"] in {"warning", "critical"}
        assert a["annotations"]["summary"] and a["annotations"]["description"]
        if name not in ("OmniOperatorDown", "OmniReconcileErrors"):  # Prometheus templating survives Helm's
            assert "{{ $labels.namespace }}" in a["annotations"]["summary"]
    assert {"record": "omni:queue_depth:sum_by_role",
            "expr": "sum by (namespace, omnideployment, role) (omni_queue_depth)"} in rules
    # Each alert can be switched off; OmniOperatorDown needs the ServiceMonitor.
    off = one(render(("monitoring-values.yaml",), sets=("monitoring.prometheusRule.rules.sizingInvalid.enabled=false",
                                                          "monitoring.serviceMonitor.enabled=false"),
                     api_versions=(MONITORING_API,)), "PrometheusRule")
    assert {r.get("alert") for r in off["spec"]["groups"][0]["rules"]} >= {"OmniQueueBackingUp"}
    assert not {r.get("alert") for r in off["spec"]["groups"][0]["rules"]} & {
        "OmniSizingInvalid", "OmniOperatorDown", "OmniReconcileErrors"}


def test_alerts_read_only_the_leaders_series_with_leader_election():
    rule = one(render(("monitoring-values.yaml", "ha-leader-election-values.yaml"), api_versions=(MONITORING_API,)),
               "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for r in rule["spec"]["groups"][0]["rules"] if "alert" in r}
    for name in ("OmniReplicasNotReady", "OmniSizingInvalid", "OmniWeightsFailed"):
        assert "and on (instance) (omni_operator_leader == 1)" in alerts[name], name


@pytest.mark.parametrize("values, tests", [
    (("monitoring-values.yaml",), "prometheusrule-tests.yaml"),
    (("monitoring-values.yaml", "ha-leader-election-values.yaml"), "prometheusrule-ha-tests.yaml"),
], ids=["one-replica", "leader-election"])
def test_alerts_pass_their_promtool_unit_tests(values, tests, tmp_path):
    """The rule unit tests in ci/ run against the rendered rules: each alert fires with its labels
    (namespace included) and annotations on a series that should trigger it, and stays quiet on a
    healthy one."""
    rule = one(render(values, api_versions=(MONITORING_API,)), "PrometheusRule")
    groups = rule["spec"]["groups"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(CI_DIR / tests, tmp_path / tests)
    promtool = str(tool("promtool"))
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", tests]):
        result = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    if len(values) == 1:
        cases = [t for case in yaml.safe_load((CI_DIR / tests).read_text())["tests"]
                 for t in case.get("alert_rule_test", [])]
        alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
        assert {t["alertname"] for t in cases if t["exp_alerts"]} == alerts, "an alert is never seen firing"
        assert {t["alertname"] for t in cases if not t["exp_alerts"]} == alerts, "an alert is never seen quiet"
        for t in cases:
            for alert in t["exp_alerts"]:
                assert alert["exp_labels"].get("namespace"), t


def test_grafana_dashboard():
    cm = one(render(("monitoring-values.yaml",)), "ConfigMap", f"{RELEASE}-qwen3-omni-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["qwen3-omni-overview.json"])
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in panels.items()}
    assert "omni_queue_depth" in exprs["Queue depth per role"] and "by (role)" in exprs["Queue depth per role"]
    replicas = exprs["Replicas desired / ready"]
    assert "omni_operator_desired_replicas" in replicas and "omni_operator_ready_replicas" in replicas
    ttft = exprs["Time to first token p50 / p95"]
    assert "histogram_quantile(0.50" in ttft and "histogram_quantile(0.95" in ttft
    assert "vllm:time_to_first_token_seconds_bucket" in ttft
    kv = exprs["GPU KV-cache usage"]
    assert "vllm:gpu_cache_usage_perc" in kv and "vllm:kv_cache_usage_perc" in kv
    realtime = exprs["Open realtime sessions"] + exprs["Realtime turns and barge-ins"]
    assert "omni_gateway_realtime_sessions{" in realtime and "omni_gateway_realtime_sessions_refused_total" in realtime
    assert "omni_gateway_realtime_turns_total" in realtime and "omni_gateway_realtime_barge_ins_total" in realtime
    v2v = exprs["Realtime voice-to-voice p50 / p99"]
    assert "histogram_quantile(0.99" in v2v and "omni_gateway_realtime_voice_to_voice_seconds_bucket" in v2v
    assert "omni_gateway_realtime_errors_total" in exprs["Realtime errors sent"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace", "omnideployment"}


def test_network_policies():
    docs = render(("networkpolicy-values.yaml",))
    op = one(docs, "NetworkPolicy", OPERATOR, NAMESPACE)
    assert op["spec"]["policyTypes"] == ["Ingress", "Egress"]
    api = op["spec"]["egress"][0]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}] and api["ports"] == [{"port": 443, "protocol": "TCP"}]
    scrape = op["spec"]["egress"][1]["to"][0]
    assert scrape["namespaceSelector"]["matchExpressions"][0]["values"] == ["inference"]
    for role in ("thinker", "talker"):
        runtime = one(docs, "NetworkPolicy", f"{RELEASE}-qwen3-omni-runtime-{role}", "inference")
        assert runtime["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == role
        assert runtime["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "omni-operator"
        peers_rule, metrics_rule = runtime["spec"]["ingress"]
        peers = [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers_rule["from"]]
        # gateway -> thinker/talker; thinker pods of one replica talk to each other; nothing -> talker else.
        assert peers == (["gateway", "thinker"] if role == "thinker" else ["gateway"])
        assert "ports" not in peers_rule
        assert {p["port"] for p in metrics_rule["ports"]} == {"metrics", "http"}
        assert metrics_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
        assert metrics_rule["from"][1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == \
            "monitoring"
    assert not find(docs, "NetworkPolicy", namespace=NAMESPACE)[1:]  # only the operator's in its namespace
    assert not find(render(), "NetworkPolicy")
    # the gateway is the entry point (HTTP API and /v1/realtime WebSockets on its http port): no policy limits it
    selected = [p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
                for p in find(docs, "NetworkPolicy")]
    assert "gateway" not in selected and None not in selected


# ----------------------------------------------------------------------- default OmniDeployment


def _hook_object(docs) -> dict[str, Any]:
    job = one([d for d in docs if d], "Job")
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return json.loads(env["OMNI_OBJECT"])


def test_default_omnideployment_on_first_install_is_created_by_a_hook_job():
    docs = render(("default-omnideployment-values.yaml",))
    assert not find(docs, "OmniDeployment")  # the kind cannot be mapped before its CRD exists
    hooks = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})
             and d["metadata"]["annotations"]["helm.sh/hook"] != "test"]
    assert {d["kind"] for d in hooks} == {"ServiceAccount", "Role", "RoleBinding", "Job"}
    job = one(hooks, "Job")
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    assert job["metadata"]["annotations"]["helm.sh/hook-output-log-policy"] == "hook-failed"
    for d in hooks:
        assert d["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
        assert "hook-succeeded" in d["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    assert one(docs, "Role", f"{RELEASE}-qwen3-omni-create-omni")["rules"] == [
        {"apiGroups": ["omni.qwen.ai"], "resources": ["omnideployments"], "verbs": ["create", "patch"]}]
    obj = _hook_object(docs)
    validate_against_crd(obj)
    assert obj["metadata"]["name"] == "qwen3-omni" and obj["metadata"]["namespace"] == NAMESPACE
    # Ownership metadata: the next `helm upgrade` adopts the object instead of refusing it.
    assert obj["metadata"]["annotations"] == {"meta.helm.sh/release-name": RELEASE,
                                              "meta.helm.sh/release-namespace": NAMESPACE}
    assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert obj["metadata"]["labels"]["team"] == "speech"
    assert obj["spec"]["workload"]["maxVideoSeconds"] == 60


def test_default_omnideployment_is_a_release_object_once_the_api_is_served():
    docs = render(("default-omnideployment-values.yaml",), api_versions=(OMNI_API,))
    assert not find(docs, "Job")
    cr = one(docs, "OmniDeployment", "qwen3-omni", NAMESPACE)
    validate_against_crd(cr)
    assert "helm.sh/hook" not in cr["metadata"].get("annotations", {})
    first_install = _hook_object(render(("default-omnideployment-values.yaml",)))
    assert cr["spec"] == first_install["spec"]


def test_default_values_spec_is_a_valid_omnideployment():
    cr = one(render(sets=("omniDeployment.enabled=true",), api_versions=(OMNI_API,)), "OmniDeployment")
    validate_against_crd(cr)
    assert cr["metadata"]["name"] == f"{RELEASE}-qwen3-omni"


def test_hook_script_is_the_file_in_the_chart():
    job = one(render(("default-omnideployment-values.yaml",)), "Job")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["python3", "-c"]
    assert command[2].strip() == (CHART / "files" / "hooks" / "create-omnideployment.py").read_text().strip()
    compile(command[2], "create-omnideployment.py", "exec")


# ------------------------------------------------------------------------------- bad values


BAD_VALUES = [
    (["--set", "replicaCount=two"], ["/replicaCount", "got string, want integer"]),
    (["--set", "unknownKey=1"], ["additional properties 'unknownKey' not allowed"]),
    (["--set", "image.tags=v1"], ["/image", "additional properties 'tags' not allowed"]),
    (["--set", "image.pullPolicy=Sometimes"], ["/image/pullPolicy", "'Always', 'IfNotPresent', 'Never'"]),
    (["--set", "watchNamespaces=team-a"], ["/watchNamespaces", "got string, want array"]),
    (["--set", "watchNamespaces[0]=Team_A"], ["/watchNamespaces/0", "does not match pattern"]),
    (["--set", "watchNamespaces={a,a}"], ["/watchNamespaces", "items at 0 and 1 are equal"]),
    (["--set", "ports.metrics=70000"], ["/ports/metrics", "maximum"]),
    (["--set", "monitoring.podMonitor.enabled=yes"], ["/monitoring/podMonitor/enabled", "got string, want boolean"]),
    (["--set", "monitoring.prometheusRule.rules.queueBackingUp.for=10 minutes"],
     ["/monitoring/prometheusRule/rules/queueBackingUp/for", "does not match pattern"]),
    (["--set", "omniDeployment.name=Not_A_Name"], ["/omniDeployment/name", "does not match pattern"]),
    (["--set", "omniDeployment.name=a-very-long-name-that-is-longer-than-forty"],
     ["/omniDeployment/name", "maxLength: got 42, want 40"]),
    (["--set-json", "omniDeployment.spec=[1]"], ["/omniDeployment/spec", "got array, want object"]),
    (["--set", "networkPolicy.operator.apiServer.ports[0]=https"],
     ["/networkPolicy/operator/apiServer/ports/0", "got string, want integer"]),
    (["--set", "image.digest=latest"], ["/image/digest", "does not match pattern"]),
]


@pytest.mark.parametrize("args,messages", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_schema_rejects_bad_values_with_a_readable_message(args, messages):
    result = helm("template", RELEASE, str(CHART), *args, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    for message in messages:
        assert message in result.stderr, result.stderr


@pytest.mark.parametrize("sets,message", [
    (("omniDeployment.enabled=true", "watchNamespaces[0]=team-a"),
     f'release namespace "{NAMESPACE}", which is not in watchNamespaces [team-a]'),
    (("serviceAccount.create=false",), "serviceAccount.name is required when serviceAccount.create is false"),
])
def test_inconsistent_values_fail_with_a_message(sets, message):
    args = [a for s in sets for a in ("--set", s)]
    result = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_schema_is_draft_07_and_closed():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(schema["properties"]) == set(values)
    for key in ("image", "serviceAccount", "monitoring", "omniDeployment", "networkPolicy", "crds"):
        assert schema["properties"][key]["additionalProperties"] is False, key


# ----------------------------------------------------------------------- notes, docs, helm test


def test_notes_tell_what_to_do_next():
    notes = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client",
                 "--set", "monitoring.podMonitor.enabled=true").stdout
    notes = notes[notes.index("NOTES:"):]
    assert "kubectl apply" in notes and "kubectl get omni" in notes
    assert f"rollout status deployment/{OPERATOR}" in notes
    assert "does not serve monitoring.coreos.com/v1" in notes
    with_default = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client",
                        "--set", "omniDeployment.enabled=true").stdout
    assert f"get omni {RELEASE}-qwen3-omni -o wide" in with_default


def _leaf_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node and prefix not in {
            "omniDeployment.spec", "podSecurityContext", "securityContext", "resources", "livenessProbe",
            "readinessProbe", "monitoring.dashboard.labels"}:
        for k, v in node.items():
            yield from _leaf_keys(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    table = {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", readme, re.M)}
    missing = [k for k in _leaf_keys(yaml.safe_load((CHART / "values.yaml").read_text())) if k not in table]
    assert not missing, f"README values table lacks {missing}"


def test_readme_carries_the_argocd_health_check():
    readme = (CHART / "README.md").read_text()
    block = readme.split("resource.customizations.health.omni.qwen.ai_OmniDeployment: |\n", 1)[1].split("```", 1)[0]
    lua = "\n".join(line[4:] for line in block.rstrip().splitlines())
    assert lua.strip() == LUA_FILE.read_text().strip()


class _Healthz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,expected_rc", [(200, 0), (503, 1)])
def test_helm_test_pod_checks_the_operator_healthz(status, expected_rc):
    pod = one(render(), "Pod", f"{OPERATOR}-test-healthz")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["HEALTHZ_URL"] == f"http://{OPERATOR}.{NAMESPACE}.svc:8080/healthz"
    handler = type("H", (_Healthz,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env.update(HEALTHZ_URL=f"http://127.0.0.1:{server.server_port}/healthz", HEALTHZ_ATTEMPTS="1")
        command = [sys.executable if c["command"][0] == "python3" else c["command"][0], *c["command"][1:]]
        result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
    assert result.returncode == expected_rc, result.stdout + result.stderr


# ------------------------------------------------------------------------ Argo CD health check


def _lua_literal(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {_lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def _cond(type_: str, status: str, reason: str = "Reason", message: str = "", generation: int | None = 2):
    c = {"type": type_, "status": status, "reason": reason, "message": message,
         "lastTransitionTime": "2026-01-01T00:00:00Z"}
    if generation is not None:
        c["observedGeneration"] = generation
    return c


LUA_CASES = {
    "no status": ({}, "Progressing", "Waiting for the operator"),
    "generation not observed": ({"observedGeneration": 1, "conditions": [_cond("Ready", "True", generation=1)]},
                                "Progressing", "observe generation 2"),
    "ready": ({"observedGeneration": 2, "conditions": [
        _cond("SizingValid", "True"), _cond("Progressing", "False"), _cond("Degraded", "False"),
        _cond("Ready", "True", "AllReplicasReady", "2/2 thinker, 4/4 talker ready")]},
        "Healthy", "2/2 thinker, 4/4 talker ready"),
    "ready while rolling out": ({"observedGeneration": 2, "conditions": [
        _cond("SizingValid", "True"), _cond("Progressing", "True", "RollingUpdate", "talker 3/4 updated"),
        _cond("Ready", "True", "AllReplicasReady", "2/2 thinker, 4/4 talker ready")]},
        "Progressing", "talker 3/4 updated"),
    "ready alone": ({"observedGeneration": 2, "conditions": [_cond("Ready", "True", "AllReplicasReady", "all ready")]},
                    "Healthy", "all ready"),
    "rolling out": ({"observedGeneration": 2, "conditions": [
        _cond("SizingValid", "True"), _cond("Progressing", "True", "ScalingUp", "thinker 1/2 ready"),
        _cond("Ready", "False", "ReplicasNotReady")]}, "Progressing", "thinker 1/2 ready"),
    "sizing invalid": ({"observedGeneration": 2, "conditions": [
        _cond("SizingValid", "False", "DoesNotFit", "thinker needs 2 GPUs of 80 GiB; the pool has 1 per node"),
        _cond("Ready", "False", "SizingInvalid")]}, "Degraded", "Sizing invalid: thinker needs 2 GPUs"),
    "degraded": ({"observedGeneration": 2, "conditions": [
        _cond("SizingValid", "True"), _cond("Degraded", "True", "PodsCrashLooping", ""),
        _cond("Ready", "True")]}, "Degraded", "PodsCrashLooping"),
    "ready condition stale": ({"observedGeneration": 2, "conditions": [_cond("Ready", "True", generation=1)]},
                              "Progressing", "observe generation 2"),
    "ready without condition generation": ({"observedGeneration": 2, "conditions": [
        _cond("Ready", "True", "Ready", "", generation=None)]}, "Healthy", "Ready"),
    "not ready yet": ({"observedGeneration": 2, "conditions": [_cond("Ready", "False", "WaitingForPods", "")]},
                      "Progressing", "WaitingForPods"),
    "stalled": ({"observedGeneration": 2, "conditions": [
        _cond("SizingValid", "True"), _cond("Degraded", "False"), _cond("Progressing", "True", "RollingOut"),
        _cond("Reconciling", "False", "Stalled"),
        _cond("Stalled", "True", "CrashLoopBackOff", "thinker 0/1 ready (CrashLoopBackOff: exited with 1)"),
        _cond("Ready", "False", "CrashLoopBackOff")]}, "Degraded", "CrashLoopBackOff: exited with 1"),
    "reconciling": ({"observedGeneration": 2, "conditions": [
        _cond("Reconciling", "True", "LoadingWeights", "12 of 40 GB"), _cond("Stalled", "False"),
        _cond("Progressing", "True", "LoadingWeights", "12 of 40 GB"), _cond("Ready", "False", "WaitingForWeights")]},
        "Progressing", "12 of 40 GB"),
}


def _lua_interpreters() -> list[str]:
    return [lua for lua in ("lua5.1", "lua5.4", "lua") if shutil.which(lua)]


@pytest.mark.parametrize("case", list(LUA_CASES))
def test_argocd_health_check(case):
    status, expected_status, expected_message = LUA_CASES[case]
    obj = {"apiVersion": "omni.qwen.ai/v1alpha1", "kind": "OmniDeployment",
           "metadata": {"name": "qwen3-omni", "namespace": "default", "generation": 2}}
    if status:
        obj["status"] = status
    program = (f"obj = {_lua_literal(obj)}\n"
               f"local hs = dofile({json.dumps(str(LUA_FILE))})\n"
               "io.write(hs.status, '\\n', hs.message)\n")
    # Argo CD runs gopher-lua (Lua 5.1); check with 5.1 (`make system-tools` installs it) and any other version.
    interpreters = _lua_interpreters()
    assert "lua5.1" in interpreters, "a Lua 5.1 interpreter is needed: make system-tools (apt-get install lua5.1)"
    for lua in interpreters:
        result = subprocess.run([lua, "-"], input=program, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        got_status, got_message = result.stdout.split("\n", 1)
        assert got_status == expected_status, (lua, got_message)
        assert expected_message in got_message, (lua, got_message)


# ------------------------------------------------------------------------ real control plane


def _crd_absent(cluster) -> None:
    """Start from a cluster without the OmniDeployment CRD (the first-install path)."""
    if cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0:
        return
    # Leftovers of earlier tests: their namespaces are being deleted, and without an operator a
    # finalizer would keep them (and the CRD) forever.
    for item in cluster.get_json("omnideployments", "-A")["items"]:
        cluster.kubectl("patch", "omnideployment", item["metadata"]["name"], "-n", item["metadata"]["namespace"],
                        "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
    cluster.kubectl("delete", "crd", CRD_NAME, "--wait=false")
    cluster.wait_for("the OmniDeployment CRD to be gone",
                     lambda: cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0, timeout=120)


def _run_create_hook_like_its_job(cluster, release: str, namespace: str, tmp_path: Path,
                                  bad_object: dict[str, Any] | None = None) -> list[subprocess.CompletedProcess]:
    """kwok plays the kubelet: it marks the hook Job's pod Succeeded without running a container.
    Run the Job's container command here instead, with the Job's own service account and Role
    (first with ``bad_object``, if given, then with the Job's own object)."""
    hooks = [d for d in yaml.safe_load_all(cluster.helm("get", "hooks", release, "-n", namespace).stdout) if d]
    job = one(hooks, "Job")
    rbac = [d for d in hooks if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")
            and d["metadata"]["name"] == job["metadata"]["name"]]
    assert len(rbac) == 3
    cluster.apply(*rbac, namespace=namespace)
    sa = job["spec"]["template"]["spec"]["serviceAccountName"]
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=10m").stdout.strip()
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(token)
    shutil.copy(cluster.ca_file, sa_dir / "ca.crt")
    host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]},
           "SERVICE_ACCOUNT_DIR": str(sa_dir), "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
           "CREATE_TIMEOUT_SECONDS": "30"}
    command = [sys.executable, *container["command"][1:]]
    objects = ([json.dumps(bad_object)] if bad_object else []) + [env["OMNI_OBJECT"]]
    try:
        return [subprocess.run(command, env={**env, "OMNI_OBJECT": obj}, capture_output=True, text=True, timeout=60)
                for obj in objects]
    finally:
        for d in rbac:  # helm deletes them once the Job succeeded
            cluster.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "-n", namespace, "--ignore-not-found")


def _release_kinds(cluster, release: str, namespace: str) -> set[str]:
    manifest = cluster.helm("get", "manifest", release, "-n", namespace).stdout
    return {d["kind"] for d in yaml.safe_load_all(manifest) if d}


def _omni(cluster, name: str, namespace: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", "omnideployment", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


@pytest.mark.cluster
def test_install_upgrade_uninstall(cluster, namespace, tmp_path):
    release, name = "omni", "default-omni"
    cluster_role = f"{namespace}-{release}-qwen3-omni-operator"[:63].rstrip("-")
    _crd_absent(cluster)

    # First install: the CRD comes with the release, the default OmniDeployment through the hook Job.
    cluster.helm("install", release, str(CHART), "-n", namespace, "--wait", "--timeout", "3m",
                 "--set", "omniDeployment.enabled=true", "--set", f"omniDeployment.name={name}")
    crd = cluster.get_json("crd", CRD_NAME)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    assert cluster.get_json("clusterrole", cluster_role)["rules"] == generated_rules()
    deploy = cluster.get_json("deployment", f"{release}-qwen3-omni-operator", "-n", namespace)
    assert deploy["status"].get("readyReplicas") == 1  # kwok runs the pod (no container) and reports it Ready
    assert "OmniDeployment" not in _release_kinds(cluster, release, namespace)
    hook_object = _hook_object(yaml.safe_load_all(cluster.helm("get", "hooks", release, "-n", namespace).stdout))
    refused = json.loads(json.dumps(hook_object))
    refused["metadata"]["name"] = "refused"
    refused["spec"]["thinker"].update(minReplicas=3, maxReplicas=2)
    bad, result = _run_create_hook_like_its_job(cluster, release, namespace, tmp_path, bad_object=refused)
    assert bad.returncode == 2, bad.stdout + bad.stderr  # the Job's podFailurePolicy fails it at once
    assert "refused" in bad.stderr and "minReplicas must not exceed maxReplicas" in bad.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    created = _omni(cluster, name, namespace)
    assert created is not None
    uid = created["metadata"]["uid"]
    assert created["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
    assert created["spec"]["thinker"]["maxReplicas"] == 2

    # Upgrade: the object becomes an ordinary release object, changed in place (same uid). Helm's
    # default --wait (kstatus) would wait for it to be Ready, which takes a running operator (none
    # runs here, kwok's pods run no containers): the chart's own objects are waited for the legacy way.
    cluster.helm("upgrade", release, str(CHART), "-n", namespace, "--reuse-values", "--wait=legacy", "--timeout", "3m",
                 "--set", "omniDeployment.spec.thinker.maxReplicas=3")
    upgraded = _omni(cluster, name, namespace)
    assert upgraded["metadata"]["uid"] == uid
    assert upgraded["spec"]["thinker"]["maxReplicas"] == 3
    assert "OmniDeployment" in _release_kinds(cluster, release, namespace)
    assert not cluster.get_json("jobs", "-n", namespace)["items"]

    # Uninstall: the CRD survives, everything else of the release goes.
    cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "2m")
    assert cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0
    assert cluster.kubectl("get", "clusterrole", cluster_role, check=False).returncode != 0
    assert cluster.kubectl("get", "deployment", f"{release}-qwen3-omni-operator", "-n", namespace,
                           check=False).returncode != 0
    cluster.wait_for("the default OmniDeployment to be deleted", lambda: _omni(cluster, name, namespace) is None)

    # Install again: the kept CRD is taken back, and the API is served, so helm creates the object itself.
    cluster.helm("install", release, str(CHART), "-n", namespace,
                 "--set", "omniDeployment.enabled=true", "--set", f"omniDeployment.name={name}")
    again = _omni(cluster, name, namespace)
    assert again is not None and again["metadata"]["uid"] != uid
    assert "OmniDeployment" in _release_kinds(cluster, release, namespace)
    cluster.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "2m")
    assert cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode == 0


@pytest.mark.cluster
def test_namespaced_install_grants_only_the_watched_namespace(cluster, namespace):
    release = "scoped"
    sa = f"system:serviceaccount:{namespace}:{release}-qwen3-omni-operator"
    other = f"{namespace}-other"
    cluster.kubectl("create", "namespace", other)
    try:
        # crds.install=false: the CRD belongs to another release (or none) in this shared cluster.
        cluster.helm("install", release, str(CHART), "-n", namespace, "--wait", "--timeout", "3m",
                     "--set", "crds.install=false", "--set", f"watchNamespaces[0]={namespace}",
                     "--set", "replicaCount=2")

        def can(verb: str, resource: str, ns: str | None) -> bool:
            args = ["auth", "can-i", verb, resource, f"--as={sa}"]
            args += ["-n", ns] if ns else ["--all-namespaces"]
            return cluster.kubectl(*args, check=False).stdout.strip() == "yes"

        assert can("create", "statefulsets.apps", namespace)
        assert can("patch", "omnideployments.omni.qwen.ai/status", namespace)
        assert not can("create", "statefulsets.apps", other)
        assert not can("list", "omnideployments.omni.qwen.ai", other)
        assert can("list", "namespaces", None)  # cluster-scoped reads via the small ClusterRole
        assert not can("list", "pods", None)
        assert can("update", "leases.coordination.k8s.io", namespace)  # leader election (2 replicas)
        assert not can("update", "leases.coordination.k8s.io", other)
        deploy = cluster.get_json("deployment", f"{release}-qwen3-omni-operator", "-n", namespace)
        assert deploy["status"].get("readyReplicas") == 2
        args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--namespace={namespace}" in args and "--leader-elect" in args
    finally:
        cluster.helm("uninstall", release, "-n", namespace, check=False)
        cluster.kubectl("delete", "namespace", other, "--wait=false", "--ignore-not-found", check=False)
