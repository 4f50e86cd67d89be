"""The OmniDeployment's status (written by the operator).

The operator builds status through these models: a misspelled field is an error here,
where the apiserver would silently prune it (ApiModel forbids unknown fields)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from omni_operator.api.resource import ApiModel


class Condition(ApiModel):
    """metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: str | None = None
    observed_generation: int | None = None


class RoleSizing(ApiModel):
    estimated_gb: float = Field(alias="estimatedGB", description=(
        "Memory one replica needs, GB: tableGB plus graphsGB plus concurrentKvGB."))
    table_gb: float | None = Field(default=None, alias="tableGB", description=(
        "The model card's figure for one request (weights, activations, its KV cache), GB."))
    graphs_gb: float | None = Field(default=None, alias="graphsGB", description=(
        "Memory of the talker's CUDA graphs (an estimate), GB."))
    concurrent_sequences: int | None = Field(default=None, description=(
        "Sequences one replica holds at once (thinker: workload.maxConcurrentSequences; talker: maxInflight, "
        "or when unset the concurrent streams one talker GPU holds)."))
    context_tokens: int | None = Field(default=None, description="Context every sequence is sized for, tokens.")
    kv_cache_bytes_per_token: int | None = Field(default=None, description=(
        "KV cache of one token: 2 x layers x KV heads x head dim x dtype bytes."))
    concurrent_kv_tokens: int | None = Field(default=None, description=(
        "KV-cache tokens beyond the table's request: (concurrentSequences - 1) x contextTokens."))
    concurrent_kv_gb: float | None = Field(default=None, alias="concurrentKvGB", description=(
        "Memory of those tokens across the replica's GPUs, GB."))
    kv_cache_bytes_per_gpu: int | None = Field(default=None, alias="kvCacheBytesPerGPU", description=(
        "KV cache vLLM reserves on each GPU (--kv-cache-memory-bytes): every sequence at full context."))
    gpus_per_replica: int
    pods_per_replica: int = 1
    gpus_per_pod: int
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    vllm_args: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class SizingStatus(ApiModel):
    thinker: RoleSizing | None = None
    talker: RoleSizing | None = None
    max_model_len: int | None = None
    gpus_total: int | None = Field(default=None, description="GPUs held by the desired replicas of all roles.")


class RoleStatus(ApiModel):
    desired_replicas: int = 0
    replicas: int = 0
    ready_replicas: int = 0
    ready: str | None = Field(default=None, description="'ready/desired' replicas (printer column).")
    reason: str | None = Field(default=None, description=(
        "Why the role's pods are not running, once it has been short of ready replicas for a while: "
        "FailedCreate, Unschedulable, ImagePullBackOff, MissingSecret, CreateContainerConfigError, "
        "CreateContainerError or CrashLoopBackOff."))
    message: str | None = Field(default=None, description=(
        "The pod and the cause, as the scheduler or kubelet said (FailedCreate: as the workload controller said)."))


class ScaleDecision(ApiModel):
    time: str
    role: str
    from_replicas: int
    to_replicas: int
    reason: str
    arrival_rate: float | None = Field(default=None, description=(
        "Requests per second arriving when it was decided (from the pods' counters), if known."))
    service_seconds: float | None = Field(default=None, description=(
        "Seconds one request spends in service, learned from the pods' counters, if known."))


class WeightsStatus(ApiModel):
    """Where the role pods' weights are, and how far the cache of the requested revision is filled."""

    source: Literal["Cache", "PVC"]
    repo: str | None = None
    revision: str | None = Field(default=None, description="The requested revision (branch, tag or commit).")
    commit: str | None = Field(default=None, description="The commit the cache holds, once complete.")
    claim_name: str = Field(description="The PVC of the requested revision.")
    serving_claim_name: str | None = Field(
        default=None, description="The PVC the role pods mount now (an older revision's while a new one loads).")
    phase: Literal["Pending", "Downloading", "Complete", "Failed"]
    bytes_done: int | None = None
    bytes_total: int | None = None
    files_done: int | None = None
    files_total: int | None = None


class OmniDeploymentStatus(ApiModel):
    observed_generation: int | None = Field(default=None, description=(
        "The metadata.generation this status was computed for (written by every reconcile)."))
    conditions: list[Condition] = Field(default_factory=list, description=(
        "Ready, Progressing, Degraded, SizingValid, WeightsReady (with model.repo); and the kstatus pair "
        "that Flux, kpt and Config Sync read: Reconciling (True while the operator converges: weights "
        "loading, a rollout, replicas short) and Stalled (True when it cannot get further without a "
        "change: an unsizable spec, a refused child, failed weights, a missing Secret or PriorityClass, "
        "an image that cannot be pulled, a crash loop); both False once Ready and settled."))
    thinker: RoleStatus | None = None
    talker: RoleStatus | None = None
    gateway: RoleStatus | None = None
    sizing: SizingStatus | None = None
    weights: WeightsStatus | None = None
    # Scale subresource: thinker replicas and their selector.
    replicas: int | None = None
    selector: str | None = None
    gpus: int | None = Field(default=None, description="GPUs requested by all pods (printer column).")
    last_scale_decisions: list[ScaleDecision] = Field(default_factory=list, max_length=20)
