"""Tier 1 + 2: pure renderers, every object validated against the real Kubernetes schemas."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_operator.rendering.meta import METRICS_PORT, POD_INDEX_LABEL
from omni_operator.rendering.plan import OFFLINE_UID, PlanError, make_plan, plan_offline

from .helpers import EXAMPLES, example, load_yaml, validate_k8s

pytestmark = pytest.mark.schema

STANDARD_LABELS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                   "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by"}


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def by_name(objects, name, kind="StatefulSet"):
    (found,) = [o for o in objects if o["metadata"]["name"] == name and o["kind"] == kind]
    return found


def env_of(obj) -> dict:
    container = obj["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_renders_to_valid_kubernetes_objects(path):
    plan = plan_offline(load_yaml(path))
    assert plan.objects
    for obj in plan.objects:
        if obj["kind"] != "ScaledObject":  # a KEDA CRD kind: no Kubernetes schema for it
            validate_k8s(obj)
        labels = obj["metadata"]["labels"]
        assert STANDARD_LABELS <= labels.keys()
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["kind"] == "OmniDeployment" and owner["controller"] is True and owner["uid"] == OFFLINE_UID


def test_instruct_renders_thinker_and_talker_on_their_own_pools():
    plan = plan_offline(example())
    objs = plan.objects
    key = plan.weights.desired_key
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert kinds == sorted([
        ("Service", "qwen3-omni-thinker-headless"), ("Service", "qwen3-omni-thinker"),
        ("Service", "qwen3-omni-talker-headless"), ("Service", "qwen3-omni-talker"),
        ("Service", "qwen3-omni-gateway"),
        ("PersistentVolumeClaim", f"qwen3-omni-weights-{key}"), ("Job", f"qwen3-omni-weights-{key}"),
        ("StatefulSet", "qwen3-omni-thinker"), ("StatefulSet", "qwen3-omni-talker"),
        ("Deployment", "qwen3-omni-gateway"),
        ("PodDisruptionBudget", "qwen3-omni-thinker"), ("PodDisruptionBudget", "qwen3-omni-talker"),
        ("PodDisruptionBudget", "qwen3-omni-gateway"),
    ])
    thinker = by_name(objs, "qwen3-omni-thinker")
    talker = by_name(objs, "qwen3-omni-talker")
    assert thinker["kind"] == talker["kind"] == "StatefulSet"
    tpod, kpod = thinker["spec"]["template"]["spec"], talker["spec"]["template"]["spec"]
    assert tpod["nodeSelector"] == {"omni.qwen.ai/pool": "thinker"}
    assert kpod["nodeSelector"] == {"omni.qwen.ai/pool": "talker"}
    # 30 s video: 77.79 GB > one 80 GiB GPU at 0.9 -> two GPUs for the thinker, one for the talker.
    tres = tpod["containers"][0]["resources"]
    assert tres["limits"]["nvidia.com/gpu"] == tres["requests"]["nvidia.com/gpu"] == 2
    assert kpod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    for pod in (tpod, kpod):
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert plan.gpus == 3


def test_thinker_pod_has_shm_probes_and_the_sized_vllm_arguments():
    plan = plan_offline(example())
    sts = by_name(plan.objects, "qwen3-omni-thinker")
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    shm = [v for v in pod["volumes"] if v["name"] == "dshm"][0]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    # Loading ~70 GB from the cache volume gets 20 minutes before the kubelet gives up (no download here).
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    env = env_of(sts)
    args = json.loads(env["OMNI_VLLM_ARGS"])
    assert args == plan.sizing.thinker.vllm_args
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    # vLLM serves the cached copy under the repository's name.
    assert env["OMNI_MODEL"] == "/models/model" and env["HF_HUB_OFFLINE"] == "1"
    assert env["OMNI_SERVED_MODEL_NAME"] == "Qwen/Qwen3-Omni-30B-A3B-Instruct"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "metrics": METRICS_PORT}
    assert sts["spec"]["serviceName"] == "qwen3-omni-thinker-headless"
    assert pod["terminationGracePeriodSeconds"] >= 300


def test_grace_periods_cover_the_shutdown_delay_where_a_role_serves_through_it_and_the_longest_request():
    resource = example("omni.yaml")
    resource["spec"]["workload"].update({"maxRequestSeconds": 120, "shutdownDelaySeconds": 15})
    seen = {}
    for obj in plan_offline(resource).objects:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        role = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        env = env_of(obj)
        seen[role] = (obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
                      env["OMNI_DRAIN_SECONDS"], env.get("OMNI_SHUTDOWN_DELAY_SECONDS"))
    # the gateway and the vLLM thinker keep taking requests through the delay; the talker refuses at once
    assert seen == {"gateway": (15 + 120 + 30, "120", "15"), "thinker": (165, "120", "15"), "talker": (150, "120", None)}


def test_thinking_variant_renders_no_talker():
    plan = plan_offline(example("thinking.yaml"))
    assert not [o for o in plan.objects if o["metadata"]["labels"]["app.kubernetes.io/component"] == "talker"]
    gateway = by_kind(plan.objects, "Deployment")[0]
    assert "OMNI_TALKER_SERVICE" not in env_of(gateway)
    assert plan.sizing.talker is None


def test_captioner_ignores_video_and_renders_no_talker():
    plan = make_plan("cap", "ns", "uid-1", {"variant": "Captioner", "workload": {"maxVideoSeconds": 120}})
    assert plan.sizing.talker is None
    assert plan.sizing.thinker.table_gb == 68.74  # the 15 s figure: no video at all
    assert plan.sizing.thinker.context_tokens == 16384  # 10 min audio (7500 tokens) + 8192 of text, rounded up
    args = plan.sizing.thinker.vllm_args
    assert json.loads(args[args.index("--limit-mm-per-prompt") + 1])["video"] == 0


def _vllm_args(plan) -> dict[str, str]:
    args = json.loads(env_of(by_name(plan.objects, f"{plan_name(plan)}-thinker"))["OMNI_VLLM_ARGS"])
    return dict(zip(args[::2], args[1::2]))


def plan_name(plan) -> str:
    (sts,) = [o for o in by_kind(plan.objects, "StatefulSet") if "thinker" in o["metadata"]["name"]]
    return sts["metadata"]["name"].removesuffix("-thinker")


def test_rendered_vllm_arguments_carry_the_memory_plan():
    """examples/omni.yaml: 30 s video + 10 min audio + 4 images -> 29696 tokens, 8 sequences, TP 2."""
    plan = plan_offline(example())
    args = _vllm_args(plan)
    assert args["--max-num-seqs"] == "8"
    assert args["--max-model-len"] == "29696"
    assert args["--tensor-parallel-size"] == "2"
    # Every sequence at full context; two GPUs split the thinker's 4 KV heads (48 layers x 128 x bf16).
    per_gpu = 8 * 29696 * (2 * 48 * 2 * 128 * 2)
    assert int(args["--kv-cache-memory-bytes"]) == per_gpu
    thinker = plan.sizing.thinker
    assert thinker.table_gb / 2 + per_gpu / 1e9 <= thinker.usable_gb_per_gpu
    assert thinker.estimated_gb == round(77.79 + 7 * 29696 * 2 * 48 * 4 * 128 * 2 / 1e9, 2)


@pytest.mark.parametrize("sequences,gpus", [(1, 1), (6, 1), (7, 2), (8, 2), (64, 4)])
def test_max_concurrent_sequences_drives_the_gpus_and_the_vllm_arguments(sequences, gpus):
    spec = {"variant": "Thinking", "workload": {"maxVideoSeconds": 15, "maxAudioMinutes": 0,
                                                "maxConcurrentSequences": sequences}}
    plan = make_plan("seqs", "ns", "uid", spec)
    sts = by_name(plan.objects, "seqs-thinker")
    assert sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpus
    args = _vllm_args(plan)
    assert args["--max-num-seqs"] == str(sequences)
    assert args["--tensor-parallel-size"] == str(gpus)
    assert int(args["--kv-cache-memory-bytes"]) == sequences * 17408 * 2 * 48 * (4 // gpus) * 128 * 2


def test_a_talker_batch_too_large_for_its_gpu_is_refused_with_what_fits():
    spec = {"variant": "Instruct", "workload": {"maxVideoSeconds": 120, "maxAudioMinutes": 0, "maxImagesPerPrompt": 0},
            "thinker": {"gpu": {"memoryGiB": 141}}, "talker": {"maxInflight": 16}}
    with pytest.raises(PlanError) as err:
        make_plan("batch", "ns", "uid", spec)
    assert not err.value.invalid
    assert "talker:" in str(err.value)
    assert ("fits 10 concurrent sequences at this context on 1 x 24 GiB; asked for 16 (talker.maxInflight)"
            in str(err.value))
    spec["talker"]["maxInflight"] = 10
    plan = make_plan("batch", "ns", "uid", spec)
    assert plan.sizing.talker.gpus_per_replica == 1
    assert env_of(by_name(plan.objects, "batch-talker"))["OMNI_MAX_INFLIGHT"] == "10"


def test_an_unset_talker_batch_is_what_its_gpu_holds_and_each_stream_gets_the_sized_context():
    spec = {"variant": "Instruct", "workload": {"maxVideoSeconds": 120, "maxAudioMinutes": 0, "maxImagesPerPrompt": 0},
            "thinker": {"gpu": {"memoryGiB": 141}}}
    plan = make_plan("auto", "ns", "uid", spec)
    env = env_of(by_name(plan.objects, "auto-talker"))
    assert env["OMNI_MAX_INFLIGHT"] == str(plan.sizing.talker.concurrent_sequences) == "10"
    assert env["OMNI_TALKER_MAX_TOKENS"] == str(plan.sizing.talker.context_tokens) == "40960"
    spec["talker"] = {"gpu": {"memoryGiB": 80}}
    roomy = make_plan("auto", "ns", "uid", spec)
    assert env_of(by_name(roomy.objects, "auto-talker"))["OMNI_MAX_INFLIGHT"] == "64", "capped at the largest bucket"


def test_replica_spanning_nodes_renders_one_statefulset_per_replica():
    raw = example("long-video-multinode.yaml")
    raw["spec"]["thinker"]["minReplicas"] = 2
    plan = plan_offline(raw)
    sets = [o for o in by_kind(plan.objects, "StatefulSet") if "thinker" in o["metadata"]["name"]]
    assert [s["metadata"]["name"] for s in sets] == ["omni-long-video-thinker-0", "omni-long-video-thinker-1"]
    for i, sts in enumerate(sets):
        assert sts["spec"]["replicas"] == 2  # two 4-GPU shards
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        env = env_of(sts)
        assert env["OMNI_NNODES"] == "2"
        assert env["OMNI_MASTER_ADDR"] == f"omni-long-video-thinker-{i}-0.omni-long-video-thinker-headless.default.svc"
        anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        (required,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        assert required["labelSelector"]["matchLabels"]["omni.qwen.ai/replica"] == str(i)
        assert sts["spec"]["template"]["spec"]["priorityClassName"] == "gpu-inference"
    headless = by_name(plan.objects, "omni-long-video-thinker-headless", "Service")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"][POD_INDEX_LABEL] == "0"
    for obj in plan.objects:
        validate_k8s(obj)


def test_pvc_source_mounts_read_only_and_goes_offline():
    plan = plan_offline(example("long-video-multinode.yaml"))
    sts = by_name(plan.objects, "omni-long-video-talker")
    pod = sts["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "qwen3-omni-weights", "readOnly": True}} \
        in pod["volumes"]
    env = env_of(sts)
    assert env["OMNI_MODEL"] == "/models/Qwen3-Omni-30B-A3B-Instruct"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_token_secret_is_referenced_by_name_never_inlined_and_only_by_the_loader():
    raw = example()
    raw["spec"]["model"]["tokenSecretRef"] = {"name": "hf-token"}
    plan = plan_offline(raw)
    (job,) = by_kind(plan.objects, "Job")
    assert env_of(job)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    for sts in by_kind(plan.objects, "StatefulSet"):  # role pods never download: no token for them
        assert "HF_TOKEN" not in env_of(sts)


def test_api_keys_secret_is_mounted_into_the_gateway():
    plan = plan_offline(example("long-video-multinode.yaml"))
    gateway = by_kind(plan.objects, "Deployment")[0]
    assert env_of(gateway)["OMNI_API_KEYS_FILE"] == "/etc/omni/api-keys/keys"
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_resource_overrides_merge_but_sizing_owns_the_gpu_count():
    raw = example()
    raw["spec"]["thinker"]["resources"] = {"requests": {"cpu": "12"}, "limits": {"nvidia.com/gpu": 7}}
    plan = plan_offline(raw)
    res = by_name(plan.objects, "qwen3-omni-thinker")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["cpu"] == "12"
    assert res["limits"]["nvidia.com/gpu"] == 2


def test_hostile_strings_never_reach_the_objects():
    for field, value in [("model", {"repo": "a/b; rm -rf /"}), ("model", {"repo": "../../etc"}),
                         ("thinker", {"image": "img$(reboot)"}),
                         ("thinker", {"nodePool": {"nodeSelector": {"pool": "x y"}}}),
                         ("model", {"pvc": {"claimName": "w", "path": "../secrets"}})]:
        with pytest.raises(PlanError) as err:
            make_plan("ok", "ns", "u", {field: value})
        assert err.value.invalid and str(err.value).startswith("spec.")


def test_extra_args_are_kept_as_separate_arguments():
    raw = example()
    raw["spec"]["thinker"]["extraArgs"] = ["--enable-prefix-caching", "--served-model-name=x; echo pwned"]
    env = env_of(by_name(plan_offline(raw).objects, "qwen3-omni-thinker"))
    args = json.loads(env["OMNI_VLLM_ARGS"])
    assert args[-2:] == ["--enable-prefix-caching", "--served-model-name=x; echo pwned"]


def test_replicas_are_clamped_and_pinned():
    raw = example()["spec"]
    plan = make_plan("x", "ns", "u", raw, replicas={"thinker": 99, "talker": 0, "gateway": 1})
    assert plan.replicas == {"thinker": 4, "talker": 1, "gateway": 1}
    raw["replicas"] = 3
    assert make_plan("x", "ns", "u", raw, replicas={"thinker": 1}).replicas["thinker"] == 3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    variant=st.sampled_from(["Instruct", "Thinking", "Captioner"]),
    video=st.integers(0, 150),
    gib=st.sampled_from([24, 48, 80, 141]),
    per_node=st.sampled_from([2, 4, 8]),
    nodes=st.integers(1, 2),
    lo=st.integers(0, 3),
    extra=st.integers(0, 3),
)
def test_any_sizable_spec_renders_valid_objects(variant, video, gib, per_node, nodes, lo, extra):
    spec = {"variant": variant, "workload": {"maxVideoSeconds": video},
            "thinker": {"gpu": {"memoryGiB": gib, "countPerNode": per_node, "maxNodesPerReplica": nodes},
                        "minReplicas": lo, "maxReplicas": lo + extra}}
    try:
        plan = make_plan("prop", "ns", "uid", spec)
    except PlanError as err:
        assert not err.invalid and err.sizing is not None and not err.sizing.fits
        return
    for obj in plan.objects:
        validate_k8s(obj)
    gpu_sets = [o for o in plan.objects if o["kind"] == "StatefulSet"]
    requested = sum(o["spec"]["replicas"] * o["spec"]["template"]["spec"]["containers"][0]["resources"]
                    ["limits"]["nvidia.com/gpu"] for o in gpu_sets)
    assert requested == plan.gpus


def test_hpa_mode_hands_replicas_to_one_hpa_per_role():
    raw = example()
    raw["spec"]["autoscaling"] = {"mode": "HPA", "targetQueueDepth": {"thinker": 3, "talker": 2, "gateway": 50}}
    plan = plan_offline(raw)
    hpas = {o["metadata"]["name"]: o for o in by_kind(plan.objects, "HorizontalPodAutoscaler")}
    assert sorted(hpas) == ["qwen3-omni-gateway", "qwen3-omni-talker", "qwen3-omni-thinker"]
    thinker = hpas["qwen3-omni-thinker"]["spec"]
    assert thinker["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "qwen3-omni-thinker"}
    assert (thinker["minReplicas"], thinker["maxReplicas"]) == (1, 4)
    assert thinker["metrics"][0]["pods"]["target"]["averageValue"] == "3"
    for obj in by_kind(plan.objects, "StatefulSet") + by_kind(plan.objects, "Deployment"):
        assert "replicas" not in obj["spec"], "one writer of replicas: the HPA"
    for obj in plan.objects:
        validate_k8s(obj)


def test_keda_mode_queries_prometheus_and_needs_its_address():
    raw = example()
    raw["spec"]["autoscaling"] = {"mode": "KEDA"}
    with pytest.raises(PlanError, match="mode KEDA needs prometheusAddress"):
        plan_offline(raw)
    raw["spec"]["autoscaling"]["prometheusAddress"] = "http://prometheus.monitoring:9090"
    plan = plan_offline(raw)
    scaled = {o["metadata"]["name"]: o["spec"] for o in by_kind(plan.objects, "ScaledObject")}
    assert sorted(scaled) == ["qwen3-omni-gateway", "qwen3-omni-talker", "qwen3-omni-thinker"]
    trigger = scaled["qwen3-omni-talker"]["triggers"][0]["metadata"]
    assert trigger["serverAddress"] == "http://prometheus.monitoring:9090"
    assert 'role="talker"' in trigger["query"] and "omni_requests_running" in trigger["query"]
    assert not by_kind(plan.objects, "HorizontalPodAutoscaler")


def test_operator_mode_renders_no_external_autoscaler():
    plan = plan_offline(example())
    assert not by_kind(plan.objects, "HorizontalPodAutoscaler") and not by_kind(plan.objects, "ScaledObject")
    assert all("replicas" in o["spec"] for o in by_kind(plan.objects, "StatefulSet"))


WORKLOAD_KINDS = ("StatefulSet", "Deployment", "Job")
# Where thinker and talker processes (vLLM, torch, triton, transformers, the hub client) write.
SCRATCH_ENV = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "VLLM_CACHE_ROOT",
               "VLLM_CONFIG_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH")


def rendered_pods(path):
    for obj in plan_offline(load_yaml(path)).objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj, obj["spec"]["template"]["spec"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_no_rendered_pod_mounts_a_service_account_token(path):
    # Runtime pods parse untrusted media and never call the API: no token to steal.
    kinds = set()
    for obj, pod in rendered_pods(path):
        kinds.add(obj["kind"])
        assert pod.get("automountServiceAccountToken") is False, obj["metadata"]["name"]
        assert "serviceAccountName" not in pod and "serviceAccount" not in pod
    assert {"StatefulSet", "Deployment"} <= kinds
    if "multinode" not in path.name:  # the others fill the operator's weight cache with a loader Job
        assert "Job" in kinds


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_container_has_a_read_only_root_and_writes_only_to_scratch_volumes(path):
    roles = set()
    for obj, pod in rendered_pods(path):
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"] + pod.get("initContainers", []):
            name = f"{obj['metadata']['name']}/{c['name']}"
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            writable = [m["mountPath"].rstrip("/") + "/" for m in c["volumeMounts"]
                        if m["name"] in scratch and not m.get("readOnly")]
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            role = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            if role in ("thinker", "talker"):
                roles.add(role)
                missing = [k for k in SCRATCH_ENV if k not in env]
                assert not missing, f"{name} leaves {missing} to the image (read-only root)"
            for key in (*SCRATCH_ENV, "OMNI_MM_STATES_DIR"):
                if key in env:
                    assert any((env[key].rstrip("/") + "/").startswith(w) for w in writable), \
                        f"{name}: {key}={env[key]} is not inside a writable scratch volume {writable}"
    if "thinking" not in path.name:
        assert roles == {"thinker", "talker"}


def test_a_gpu_budget_below_the_minimum_replicas_is_refused_with_the_arithmetic():
    raw = example()
    minimum = plan_offline(raw).gpus  # the example runs its minimum replicas
    raw["spec"]["autoscaling"] = {"gpuBudget": minimum - 1}
    with pytest.raises(PlanError, match=rf"gpuBudget {minimum - 1} is below the {minimum} GPUs") as err:
        plan_offline(raw)
    assert err.value.invalid and "thinker 1 x" in str(err.value)
    raw["spec"]["autoscaling"] = {"gpuBudget": minimum}
    assert plan_offline(raw).gpus == minimum


def test_every_child_carries_a_digest_of_what_was_rendered_for_it():
    """A field the plan stops rendering must still read as a difference from the live child (the
    reconciler writes a child whose live copy lacks something rendered); the digest changes."""
    from omni_operator.rendering.plan import RENDERED_ANNOTATION

    resource = example("omni.yaml")
    resource["spec"]["gateway"]["resources"] = {"limits": {"memory": "3Gi"}}
    with_limit = {(o["kind"], o["metadata"]["name"]): o for o in plan_offline(resource).objects}
    del resource["spec"]["gateway"]["resources"]
    without = {(o["kind"], o["metadata"]["name"]): o for o in plan_offline(resource).objects}
    digests = {key: o["metadata"]["annotations"][RENDERED_ANNOTATION] for key, o in without.items()}
    assert all(len(d) == 16 for d in digests.values())
    changed = {key for key, o in with_limit.items() if o["metadata"]["annotations"][RENDERED_ANNOTATION] != digests[key]}
    assert changed == {("Deployment", f"{resource['metadata']['name']}-gateway")}, changed
