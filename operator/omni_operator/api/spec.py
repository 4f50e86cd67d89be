"""The OmniDeployment's spec (omni.qwen.ai/v1alpha1).

These pydantic models are the single source of truth: the CRD's OpenAPI schema
is generated from them (``omni_operator.api.crd``), and the operator parses every
custom resource through them, so the apiserver and the operator can never
disagree on defaults or bounds. Cross-field rules are CEL
(``x-kubernetes-validations``) so bad specs are refused at admission."""

from __future__ import annotations

import copy
import json
import re
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import ConfigDict, Field, model_validator

from omni_operator.api.quantity import LARGEST, parse_quantity
from omni_operator.api.resource import ApiModel, _cel

# The thinker's context window (Qwen3-Omni max_position_embeddings).
MODEL_CONTEXT_TOKENS = 65536


class Variant(str, Enum):
    """Model card variants. Only Instruct has a talker (speech out)."""

    INSTRUCT = "Instruct"
    THINKING = "Thinking"
    CAPTIONER = "Captioner"


DEFAULT_REPOS = {
    Variant.INSTRUCT.value: "Qwen/Qwen3-Omni-30B-A3B-Instruct",
    Variant.THINKING.value: "Qwen/Qwen3-Omni-30B-A3B-Thinking",
    Variant.CAPTIONER.value: "Qwen/Qwen3-Omni-30B-A3B-Captioner",
}


# Size of each official checkpoint's files (safetensors, config, tokenizer), GB: what one cache holds.
CHECKPOINT_GB = {
    DEFAULT_REPOS[Variant.INSTRUCT.value]: 70.6,
    DEFAULT_REPOS[Variant.THINKING.value]: 63.5,
    DEFAULT_REPOS[Variant.CAPTIONER.value]: 63.5,
}


# Kubernetes name/label grammar, repeated here so admission refuses bad input early.
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


# "repo-owner/repo-name" on a model hub; no shell or path metacharacters.
REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"


REVISION = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


IMAGE = r"^[a-z0-9][a-z0-9._/:@-]{0,254}$"


LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"


LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"


PATH_IN_VOLUME = r"^[A-Za-z0-9._-][A-Za-z0-9._/-]{0,254}$"


QUANTITY = r"^[+]?[0-9]+(\.[0-9]+)?([eE][0-9]+|[KMGTPE]i?|[mkMGTPE])?$"


class SecretKeyRef(ApiModel):
    """A key in a Secret of the OmniDeployment's namespace. Only its name is stored."""

    name: str = Field(pattern=DNS1123_LABEL, max_length=253, description="The Secret's name.")
    key: str = Field(default="token", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253, description="The key in it.")


class PvcSource(ApiModel):
    """Weights already on a PersistentVolumeClaim (mounted read-only)."""

    claim_name: str = Field(pattern=DNS1123_LABEL, max_length=253,
                            description="A claim in the OmniDeployment's namespace; ReadWriteMany (or ReadOnlyMany) "
                                        "when role pods run on several nodes.")
    path: str = Field(default="", pattern=r"^$|" + PATH_IN_VOLUME, max_length=255,
                      description="Directory inside the volume that holds the model files.")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("!self.path.split('/').exists(s, s == '..')", "pvc.path must stay inside the volume (no '..')",
             reason="FieldValueInvalid")]})

    @model_validator(mode="after")
    def _inside_volume(self) -> "PvcSource":
        if ".." in self.path.split("/"):
            raise ValueError("pvc.path must stay inside the volume (no '..')")
        return self


class CacheAccessMode(str, Enum):
    # Role pods of several nodes mount the cache at once: that needs a shared (RWX) volume.
    READ_WRITE_MANY = "ReadWriteMany"
    # One node only (every role pod must land on the loader's node): single-node clusters.
    READ_WRITE_ONCE = "ReadWriteOnce"


class WeightCache(ApiModel):
    """The operator-owned weight cache of a hub repository: one PersistentVolumeClaim per
    repository revision, filled once by a loader Job and mounted read-only by every role pod."""

    size: str | None = Field(
        default=None, pattern=QUANTITY, max_length=64,
        description="Capacity of the cache volume. Defaults to the checkpoint's size plus headroom for the "
                    "official Qwen3-Omni repositories; required for other repositories.")
    storage_class_name: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253,
        description="StorageClass of the cache volume; unset uses the cluster's default class.")
    access_mode: CacheAccessMode = Field(
        default=CacheAccessMode.READ_WRITE_MANY,
        description="ReadWriteMany lets role pods on many nodes share one copy; ReadWriteOnce suits one node.")
    endpoint: str | None = Field(
        default=None, pattern=r"^https?://[A-Za-z0-9.:\[\]_-]+(/[A-Za-z0-9._~/-]*)?$", max_length=512,
        description="Hub endpoint (HF_ENDPOINT) the loader downloads from, e.g. a mirror; unset uses the public hub.")


class ModelSource(ApiModel):
    """Where the weights come from: a hub repository (cached once per revision by the operator)
    or a PVC you fill yourself."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("!(has(self.repo) && has(self.pvc))",
                     "set either model.repo or model.pvc, not both", reason="FieldValueInvalid"),
                _cel("!has(self.revision) || has(self.repo)",
                     "model.revision applies to model.repo only", reason="FieldValueInvalid"),
                _cel("!(has(self.pvc) && has(self.cache))",
                     "model.cache applies to model.repo only (a model.pvc is yours to fill)",
                     reason="FieldValueInvalid"),
                _cel("!has(self.repo) || self.repo in " + json.dumps(sorted(CHECKPOINT_GB)) +
                     " || (has(self.cache) && has(self.cache.size))",
                     "model.cache.size is required for a repository whose checkpoint size the operator does not know",
                     reason="FieldValueRequired"),
            ]
        }
    )

    repo: str | None = Field(default=None, pattern=REPO_ID, max_length=192,
                             description="Hub repository id; defaults to the variant's official repository.")
    revision: str | None = Field(default=None, pattern=REVISION, max_length=128,
                                 description="Commit, tag or branch of repo. Pin a commit for reproducible rollouts.")
    pvc: PvcSource | None = None
    cache: WeightCache | None = Field(default=None, description="The weight cache of model.repo (the default source).")
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a hub token; passed to pods as HF_TOKEN, never logged.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if self.repo and self.pvc:
            raise ValueError("set either model.repo or model.pvc, not both")
        if self.revision and not self.repo:
            raise ValueError("model.revision applies to model.repo only")
        if self.pvc and self.cache:
            raise ValueError("model.cache applies to model.repo only (a model.pvc is yours to fill)")
        if self.repo and self.repo not in CHECKPOINT_GB and not (self.cache and self.cache.size):
            raise ValueError("model.cache.size is required for a repository whose checkpoint size the operator "
                             "does not know")
        return self


class WorkloadProfile(ApiModel):
    """The largest request each replica must hold; drives sizing and vLLM limits."""

    max_video_seconds: float = Field(default=15, ge=0, le=3600,
                                     description="Longest video input per request, seconds.")
    max_audio_minutes: float = Field(default=10, ge=0, le=40,
                                     description="Longest audio input per request, minutes (model limit 40).")
    max_images_per_prompt: int = Field(default=4, ge=0, le=64,
                                       description="Images in one prompt (vLLM --limit-mm-per-prompt).")
    max_concurrent_sequences: int = Field(default=8, ge=1, le=1024,
                                          description=("vLLM --max-num-seqs per thinker replica; sizing holds "
                                                       "this many sequences at full context (KV cache)."))
    max_model_len: int | None = Field(default=None, ge=1024, le=MODEL_CONTEXT_TOKENS,
                                      description="Override the context length derived from the inputs above.")
    max_request_seconds: int = Field(default=300, ge=1, le=86400,
                                     description="Longest request; pods get this long to drain on scale-down.")
    shutdown_delay_seconds: int = Field(default=10, ge=0, le=600, description=(
        "After SIGTERM, how long a gateway keeps serving new requests (and a vLLM thinker keeps its engine "
        "up) while the pod's removal from the Service endpoints reaches kube-proxy, ingress controllers and "
        "load balancers; readiness fails at once. Their grace period is this + maxRequestSeconds + 30."))


def _label_key_cel(key: str) -> str:
    """CEL: `key` is a label key, prefix (a DNS subdomain, at most 253) included."""
    return (f"{key}.size() <= 316 && {key}.matches(r'{LABEL_KEY}') && "
            f"(!{key}.contains('/') || {key}.substring(0, {key}.indexOf('/')).size() <= 253)")


def _is_label_key(key: str) -> bool:
    prefix = key.partition("/")[0] if "/" in key else ""
    return len(key) <= 316 and bool(re.match(LABEL_KEY, key)) and len(prefix) <= 253


class Toleration(ApiModel):
    """A core/v1 Toleration, with Pod validation's rules (the apiserver would refuse the
    StatefulSet later, after the roles before it were applied)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("!has(self.key) || self.key == '' || (" + _label_key_cel("self.key") + ")",
             "toleration key must be a valid label key", reason="FieldValueInvalid"),
        _cel(f"!has(self.value) || self.value.matches(r'{LABEL_VALUE}')",
             "toleration value must be a valid label value", reason="FieldValueInvalid"),
        _cel("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
             "a toleration with operator Exists must not have a value", reason="FieldValueInvalid"),
        _cel("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
             "a toleration with an empty key must use operator Exists", reason="FieldValueInvalid"),
        _cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             "tolerationSeconds is only valid with effect NoExecute", reason="FieldValueInvalid"),
    ]})

    key: str | None = Field(default=None, max_length=316, description="The taint key; empty with Exists: every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Equal when unset.")
    value: str | None = Field(default=None, max_length=63, description="The taint value (Equal only).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="The taint effect; unset matches every effect.")
    toleration_seconds: int | None = Field(default=None, ge=0,
                                           description="How long a NoExecute taint is tolerated before eviction.")

    @model_validator(mode="after")
    def _pod_rules(self) -> "Toleration":
        if self.key and not _is_label_key(self.key):
            raise ValueError(f"toleration key {self.key!r} must be a valid label key")
        if self.value and not re.match(LABEL_VALUE, self.value):
            raise ValueError(f"toleration value {self.value!r} must be a valid label value")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not have a value")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration with an empty key must use operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds is only valid with effect NoExecute")
        return self


# Core types as the kube-apiserver publishes them, made structural for the CRD (written by
# `python -m e2e.core_schemas` from a real apiserver; a cluster test keeps it current).
CORE_SCHEMAS = json.loads((Path(__file__).with_name("core_schemas.json")).read_text())


def _core_schema(name: str) -> Callable[[dict[str, Any]], None]:
    def embed(schema: dict[str, Any]) -> None:
        description = schema.get("description")
        schema.clear()
        schema.update(copy.deepcopy(CORE_SCHEMAS[name]))
        if description:
            schema["description"] = description
    return embed


class NodePool(ApiModel):
    """Where a role's pods run. GPU roles also tolerate the nvidia.com/gpu taint."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.nodeSelector.all(k, " + _label_key_cel("k") + " && "
             "self.nodeSelector[k].matches(r'" + LABEL_VALUE + "'))",
             "nodeSelector keys and values must be valid label keys and values", reason="FieldValueInvalid"),
    ]})

    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=32, description="Labels of the pool's nodes, e.g. omni.qwen.ai/pool: thinker.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32,
                                          description="Taints of the pool's nodes the pods tolerate.")
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra=_core_schema("Affinity"),
        description="A core/v1 Affinity (its published schema), passed to the pods unchanged.")
    priority_class_name: str | None = Field(default=None, pattern=DNS1123_LABEL, max_length=253,
                                            description="A PriorityClass that exists in the cluster.")
    runtime_class_name: str | None = Field(default=None, pattern=DNS1123_LABEL, max_length=253,
                                           description="A RuntimeClass, e.g. nvidia where the GPU runtime is not the default.")

    @model_validator(mode="after")
    def _labels(self) -> "NodePool":
        for key, value in self.node_selector.items():
            if not _is_label_key(key):
                raise ValueError(f"nodeSelector key {key!r} is not a valid label key")
            if not re.match(LABEL_VALUE, value):
                raise ValueError(f"nodeSelector value {value!r} is not a valid label value")
        return self


class GpuType(ApiModel):
    """The accelerator of a role's node pool."""

    # The schema's minimum/maximum are compared as integers when the value is one (0 passed and
    # 1 read "less than or equal to 0"): the rule compares as numbers.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("!has(self.utilization) || (self.utilization >= 0.5 && self.utilization <= 0.98)",
             "utilization must be between 0.5 and 0.98", field_path=".utilization", reason="FieldValueInvalid"),
    ]})

    memory_gib: float = Field(default=80, alias="memoryGiB", gt=0, le=1024, description="Memory of one GPU, GiB.")
    count_per_node: int = Field(default=8, ge=1, le=64, description="GPUs on one node of the pool.")
    max_nodes_per_replica: int = Field(
        default=1, ge=1, le=16,
        description="Allow one replica to span this many nodes (vLLM multi-node); 1 keeps a replica on one node.")
    resource_name: str = Field(default="nvidia.com/gpu", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$", max_length=253,
                               description="The extended resource the device plugin advertises; its taint is tolerated.")
    utilization: float = Field(default=0.9, ge=0.5, le=0.98,
                               description="Fraction of GPU memory the server may use (vLLM --gpu-memory-utilization).")


# A resource.Quantity in a structural schema, as Go operators' CRDs embed it: an integer, or a
# string of quantity form (the pattern applies to strings). A plain decimal number (2.5) cannot be
# said in a structural schema: write "2.5" or 2500m. CEL (Kubernetes' quantity library) refuses
# what Pod validation would refuse later: names that are not resource names, amounts past 1Ei,
# negative amounts, requests above limits.
RESOURCE_NAME = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


_QUANTITY_SCHEMA = {"x-kubernetes-int-or-string": True, "pattern": QUANTITY, "maxLength": 64}


def _q(v: str) -> str:
    return f"quantity(string({v}))"


_QUANTITY_MAP = {
    "additionalProperties": _QUANTITY_SCHEMA,
    "x-kubernetes-validations": [
        _cel(f"self.all(k, k.size() <= 253 && k.matches('{RESOURCE_NAME}'))",
             "resource names must be qualified names such as cpu, memory or nvidia.com/gpu",
             reason="FieldValueInvalid"),
        _cel(f"self.all(k, isQuantity(string(self[k])) && {_q('self[k]')}.compareTo(quantity('0')) >= 0 && "
             f"{_q('self[k]')}.isLessThan(quantity('1Ei')))",
             "quantities must be at least 0 and less than 1Ei", reason="FieldValueInvalid"),
    ],
}


class Resources(ApiModel):
    """Overrides for the main container's requests and limits (GPU limits are set by sizing)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || "
             f"!isQuantity(string(self.requests[k])) || !isQuantity(string(self.limits[k])) || "
             f"{_q('self.requests[k]')}.compareTo({_q('self.limits[k]')}) <= 0)",
             "every request must be at most its limit", reason="FieldValueInvalid"),
    ]})

    requests: dict[str, str | int] = Field(default_factory=dict, max_length=16, json_schema_extra=_QUANTITY_MAP,
                                           description="Resource name to quantity, over the role's defaults.")
    limits: dict[str, str | int] = Field(default_factory=dict, max_length=16, json_schema_extra=_QUANTITY_MAP,
                                         description="Resource name to quantity, over the role's defaults.")

    @model_validator(mode="after")
    def _quantities(self) -> "Resources":
        amounts: dict[str, dict[str, Decimal]] = {}
        for section in ("requests", "limits"):
            amounts[section] = {}
            for name, qty in getattr(self, section).items():
                if len(name) > 253 or not re.match(RESOURCE_NAME, name):
                    raise ValueError(f"resources.{section}: {name!r} is not a resource name")
                if not re.match(QUANTITY, str(qty)):
                    raise ValueError(f"resources.{section}.{name}: {qty!r} is not a quantity")
                amount = parse_quantity(qty)
                if not 0 <= amount < LARGEST:
                    raise ValueError(f"resources.{section}.{name}: {qty!r} must be at least 0 and less than 1Ei")
                amounts[section][name] = amount
        for name, amount in amounts["requests"].items():
            if name in amounts["limits"] and amount > amounts["limits"][name]:
                raise ValueError(f"resources.requests.{name} must be at most its limit")
        return self


class TalkerGpuType(GpuType):
    """The talker's share (10-13 GB) fits one mid-size GPU, e.g. a 24 GiB L4."""

    memory_gib: float = Field(default=24, alias="memoryGiB", gt=0, le=1024, description="Memory of one GPU, GiB.")
    count_per_node: int = Field(default=4, ge=1, le=64, description="GPUs on one node of the pool.")


_REPLICA_RULES = {
    "x-kubernetes-validations": [
        _cel("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas",
             reason="FieldValueInvalid"),
    ]
}


class RoleSpec(ApiModel):
    """Common per-role settings."""

    model_config = ConfigDict(json_schema_extra=_REPLICA_RULES)

    image: str | None = Field(default=None, pattern=IMAGE, max_length=255,
                              description="Container image; defaults to the operator's image for this role.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(default="IfNotPresent",
                                                                         description="The container's imagePullPolicy.")
    node_pool: NodePool = Field(default_factory=NodePool)
    min_replicas: int = Field(default=1, ge=0, le=1000,
                              description="Fewest replicas the autoscaler keeps (0 needs autoscaling.scaleToZero).")
    max_replicas: int = Field(default=1, ge=0, le=1000, description="Most replicas the autoscaler adds.")
    resources: Resources | None = None

    @model_validator(mode="after")
    def _replicas(self) -> "RoleSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})")
        return self


class ThinkerSpec(RoleSpec):
    """vLLM thinker shards (text out)."""

    gpu: GpuType = Field(default_factory=GpuType)
    extra_args: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list, max_length=32, description="Extra vLLM arguments appended after the sized ones.")


class TalkerSpec(RoleSpec):
    """Talker + code2wav speech pods (Instruct only)."""

    gpu: TalkerGpuType = Field(default_factory=TalkerGpuType)
    max_queue: int = Field(default=16, ge=1, le=10000, description="Requests a talker pod queues before answering 429.")
    max_inflight: int | None = Field(default=None, ge=1, le=256, description=(
        "Syntheses one talker pod decodes together (its batch: a KV slot each at full context, CUDA graphs "
        "per batch bucket); more wait in its queue. Unset: as many as one talker GPU holds (KV cache and "
        "CUDA graphs), at most 64; status.sizing.talker.concurrentSequences says how many."))


class GatewaySpec(RoleSpec):
    """The OpenAI-compatible entry point (CPU only)."""

    min_replicas: int = Field(default=1, ge=0, le=1000,
                              description="Fewest replicas the autoscaler keeps (0 needs autoscaling.scaleToZero).")
    max_replicas: int = Field(default=2, ge=0, le=1000, description="Most replicas the autoscaler adds.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding newline-separated API keys; unset means no authentication.")
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=2 * 1024 ** 3,
                                   description="Largest request body, bytes (media inline as base64 counts).")


class AutoscalingMode(str, Enum):
    """Exactly one mechanism writes replicas."""

    OPERATOR = "Operator"  # the operator's own queue-depth loop
    HPA = "HPA"  # an autoscaling/v2 HPA per role on the omni_queue_depth Pods metric
    KEDA = "KEDA"  # a KEDA ScaledObject per role
    DISABLED = "Disabled"  # replicas stay at minReplicas (or spec.replicas)


class TargetQueueDepth(ApiModel):
    thinker: float = Field(default=4, gt=0, le=10000, description="Requests per thinker replica.")
    talker: float = Field(default=2, gt=0, le=10000, description="Syntheses per talker replica.")
    gateway: float = Field(default=64, gt=0, le=100000, description="Requests per gateway replica.")


class AutoscalingSpec(ApiModel):
    """Who writes replicas and how: the operator's own loop (Operator), an HPA, KEDA, or nobody."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.scaleDownStabilizationSeconds >= self.scaleUpStabilizationSeconds",
                     "scaleDownStabilizationSeconds must be at least scaleUpStabilizationSeconds",
                     reason="FieldValueInvalid"),
                _cel("self.mode != 'KEDA' || has(self.prometheusAddress)",
                     "mode KEDA needs prometheusAddress (the Prometheus that scrapes the runtime pods)",
                     reason="FieldValueRequired"),
            ]
        }
    )

    mode: AutoscalingMode = Field(default=AutoscalingMode.OPERATOR, description=(
        "Operator (its own loop, from the pods' queue metrics), HPA (an autoscaling/v2 HPA per role on the "
        "omni_queue_depth Pods metric), KEDA (a ScaledObject per role) or Disabled (minReplicas)."))
    target_queue_depth: TargetQueueDepth = Field(default_factory=TargetQueueDepth,
                                                 description="Waiting requests per ready replica to aim for.")
    poll_seconds: int = Field(default=5, ge=1, le=300, description="How often the pods' metrics are read.")
    scale_up_stabilization_seconds: int = Field(default=15, ge=0, le=3600,
                                                description="A rise must last this long before replicas are added.")
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=86400, description=(
        "Replicas go down only to the highest need of this window."))
    max_step: int = Field(default=2, ge=1, le=100, description="Most replicas added or removed per decision.")
    gpu_budget: int | None = Field(default=None, ge=0, le=100000,
                                   description="Most GPUs thinker and talker may hold together.")
    scale_to_zero: bool = Field(default=False, description="Allow roles with minReplicas 0 to reach zero when idle.")
    prometheus_address: str | None = Field(
        default=None, pattern=r"^https?://[A-Za-z0-9.:\[\]_-]+(/[A-Za-z0-9._~/-]*)?$", max_length=512,
        description="Prometheus base URL for mode KEDA, e.g. http://prometheus-operated.monitoring:9090.")

    @model_validator(mode="after")
    def _windows(self) -> "AutoscalingSpec":
        if self.scale_down_stabilization_seconds < self.scale_up_stabilization_seconds:
            raise ValueError("scaleDownStabilizationSeconds must be at least scaleUpStabilizationSeconds")
        if self.mode == AutoscalingMode.KEDA.value and not self.prometheus_address:
            raise ValueError("mode KEDA needs prometheusAddress (the Prometheus that scrapes the runtime pods)")
        return self


class OmniDeploymentSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("!has(self.talker) || self.variant == 'Instruct'",
                     "talker is only available for variant Instruct (Thinking and Captioner have no speech output)",
                     reason="FieldValueForbidden"),
                _cel("!has(self.replicas) || (self.replicas >= self.thinker.minReplicas && "
                     "self.replicas <= self.thinker.maxReplicas)",
                     "replicas must lie within thinker.minReplicas..thinker.maxReplicas",
                     reason="FieldValueInvalid"),
            ]
        }
    )

    variant: Variant = Variant.INSTRUCT
    model: ModelSource = Field(default_factory=ModelSource)
    workload: WorkloadProfile = Field(default_factory=WorkloadProfile)
    thinker: ThinkerSpec = Field(default_factory=ThinkerSpec)
    talker: TalkerSpec | None = Field(default=None, description="Instruct only; defaults apply when omitted.")
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    replicas: int | None = Field(
        default=None, ge=0, le=1000,
        description="Pins thinker replicas (the scale subresource writes it); unset lets the autoscaler decide.")

    @model_validator(mode="after")
    def _cross_field(self) -> "OmniDeploymentSpec":
        if self.talker is not None and self.variant != Variant.INSTRUCT.value:
            raise ValueError("talker is only available for variant Instruct "
                             "(Thinking and Captioner have no speech output)")
        if self.replicas is not None and not (self.thinker.min_replicas <= self.replicas <= self.thinker.max_replicas):
            raise ValueError("replicas must lie within thinker.minReplicas..thinker.maxReplicas")
        return self

    @property
    def external_autoscaler(self) -> bool:
        """An HPA or KEDA writes replicas: the operator must not."""
        return self.autoscaling.mode in (AutoscalingMode.HPA.value, AutoscalingMode.KEDA.value)

    @property
    def has_talker(self) -> bool:
        return self.variant == Variant.INSTRUCT.value

    @property
    def effective_talker(self) -> TalkerSpec | None:
        """The talker spec with defaults, or None for variants without speech output."""
        if not self.has_talker:
            return None
        return self.talker or TalkerSpec()

    @property
    def model_repo(self) -> str | None:
        if self.model.pvc:
            return None
        return self.model.repo or DEFAULT_REPOS[self.variant]


def parse_spec(spec: dict[str, Any]) -> OmniDeploymentSpec:
    """Parse a custom resource's spec; raises pydantic.ValidationError."""
    return OmniDeploymentSpec.model_validate(spec or {})


def describe_validation_error(err: Exception) -> str:
    """One readable line per problem: 'spec.thinker.minReplicas: ...'."""
    from pydantic import ValidationError

    if not isinstance(err, ValidationError):
        return str(err)
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"] if not str(p).startswith("function-after"))
        msg = problem["msg"].removeprefix("Value error, ")
        lines.append(f"spec.{where}: {msg}" if where else f"spec: {msg}")
    return "; ".join(lines)
