"""GPUs per replica: one request from the model card plus the KV cache of every further
concurrent sequence, fitted onto the smallest power-of-two GPU count (pure)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from omni_operator.api.spec import MODEL_CONTEXT_TOKENS, OmniDeploymentSpec
from omni_operator.api.status import RoleSizing, SizingStatus
from omni_operator.sizing.kv_cache import QWEN3_OMNI_30B_A3B, ModelArchitecture, kv_shapes
from omni_operator.sizing.model_card import GIB_IN_GB, Role, Variant, estimate_gb, max_model_len

# The talker pod decodes its streams with fixed shapes (omni_runtime.talker.fixed): a KV slot per
# stream at the full context, and CUDA graphs per batch bucket up to 64 streams. Unless
# talker.maxInflight says otherwise, a talker pod takes as many streams as its one GPU holds.
TALKER_MAX_STREAMS = 64  # the largest batch bucket
# The memory pools of the talker's CUDA graphs (64 step and code-predictor shapes, code2wav up to
# 8 chunks x 64 frames). An estimate from the shapes (docs/concepts/talker.md) until
# bench.talker_device_bench measures it on a GPU.
TALKER_GRAPHS_GB = 2.0


@dataclass(frozen=True)
class MemoryNeed:
    """What a replica of ``gpus`` GPUs in one layout (tensor x pipeline parallel) must hold: the
    table's one request spread over its GPUs, plus the KV cache of the further concurrent sequences."""

    table_gb: float
    context_tokens: int
    concurrent_sequences: int
    kv_bytes_per_token: int  # the whole model's KV cache of one token
    kv_bytes_per_token_per_gpu: int  # what one GPU holds of it in this layout
    gpus: int
    graphs_gb: float = 0.0  # what the talker's CUDA graphs hold besides (per GPU; one GPU per talker pod)

    @property
    def concurrent_kv_tokens(self) -> int:
        """The first sequence's KV is in the table; the others each add a full context."""
        return (self.concurrent_sequences - 1) * self.context_tokens

    @property
    def gb_per_gpu(self) -> float:
        return (self.table_gb / self.gpus + self.graphs_gb
                + self.concurrent_kv_tokens * self.kv_bytes_per_token_per_gpu / 1e9)

    @property
    def concurrent_kv_gb(self) -> float:
        """Across the replica's GPUs (more than tokens x bytes per token when KV heads are replicated)."""
        return self.concurrent_kv_tokens * self.kv_bytes_per_token_per_gpu * self.gpus / 1e9

    @property
    def total_gb(self) -> float:
        return self.table_gb + self.graphs_gb * self.gpus + self.concurrent_kv_gb

    def fits(self, usable_gb_per_gpu: float) -> bool:
        return self.gb_per_gpu <= usable_gb_per_gpu + 1e-9

    def sequences_that_fit(self, usable_gb_per_gpu: float) -> int:
        """Concurrent sequences at this context that fit in this layout (0: not even one request)."""
        room = usable_gb_per_gpu - self.table_gb / self.gpus - self.graphs_gb
        if room < -1e-9:
            return 0
        per_sequence = self.context_tokens * self.kv_bytes_per_token_per_gpu / 1e9
        return 1 + math.floor((room + 1e-9) / per_sequence)


def _layout(gpus: int, per_node: int) -> tuple[int, int]:
    """(pods, GPUs per pod) of a replica: one node's worth of GPUs per pod."""
    pods = max(1, gpus // per_node)
    return pods, gpus // pods


@dataclass(frozen=True)
class SizingRequest:
    role: Role
    variant: Variant
    video_seconds: float
    gpu_memory_gib: float
    gpus_per_node: int = 8
    max_nodes_per_replica: int = 1
    utilization: float = 0.9
    audio_minutes: float = 0.0
    images_per_prompt: int = 4
    # concurrent sequences per replica (the talker: syntheses decoded together; None: what one GPU holds)
    max_num_seqs: int | None = 8
    max_model_len: int | None = None  # override of the derived context length
    architecture: ModelArchitecture = QWEN3_OMNI_30B_A3B
    concurrency_setting: str = "--max-num-seqs"  # what the user turns to change the concurrency


@dataclass(frozen=True)
class Sizing:
    role: Role
    variant: Variant
    video_seconds: float
    estimated_gb: float  # the total: table_gb + concurrent_kv_gb
    gpu_memory_gib: float
    usable_gb_per_gpu: float
    fits: bool
    reason: str
    table_gb: float = 0.0  # the model card's one request
    graphs_gb: float = 0.0  # the talker's CUDA graphs
    concurrent_sequences: int = 1
    context_tokens: int = 0
    kv_bytes_per_token: int = 0
    concurrent_kv_tokens: int = 0
    concurrent_kv_gb: float = 0.0
    sequences_that_fit: int = 0  # at this context on the chosen (or, refused, the largest allowed) GPUs
    kv_cache_bytes_per_gpu: int = 0  # vLLM --kv-cache-memory-bytes (0: not a vLLM role, or refused)
    gpus_per_replica: int = 0
    pods_per_replica: int = 0
    gpus_per_pod: int = 0
    tensor_parallel_size: int = 0
    pipeline_parallel_size: int = 0
    max_model_len: int = 0
    vllm_args: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The CLI's JSON shape (camelCase, like the API)."""
        return {
            "role": self.role,
            "variant": self.variant,
            "videoSeconds": self.video_seconds,
            "estimatedGB": self.estimated_gb,
            "tableGB": self.table_gb,
            "graphsGB": self.graphs_gb,
            "concurrentSequences": self.concurrent_sequences,
            "contextTokens": self.context_tokens,
            "kvCacheBytesPerToken": self.kv_bytes_per_token,
            "concurrentKvTokens": self.concurrent_kv_tokens,
            "concurrentKvGB": self.concurrent_kv_gb,
            "sequencesThatFit": self.sequences_that_fit,
            "kvCacheBytesPerGPU": self.kv_cache_bytes_per_gpu,
            "gpuMemoryGiB": self.gpu_memory_gib,
            "usableGBPerGPU": self.usable_gb_per_gpu,
            "gpusPerReplica": self.gpus_per_replica,
            "podsPerReplica": self.pods_per_replica,
            "gpusPerPod": self.gpus_per_pod,
            "tensorParallelSize": self.tensor_parallel_size,
            "pipelineParallelSize": self.pipeline_parallel_size,
            "maxModelLen": self.max_model_len,
            "fits": self.fits,
            "reason": self.reason,
            "notes": list(self.notes),
            "vllmArgs": list(self.vllm_args),
        }


def _powers_of_two(limit: int) -> list[int]:
    return [2 ** i for i in range(0, int(math.log2(limit)) + 1)] if limit >= 1 else []


def _gpus(n: int, gib: float) -> str:
    return f"{n} x {gib:g} GiB GPU{'s' if n > 1 else ''}"


def _sequences(n: int) -> str:
    return f"{n} concurrent sequence{'s' if n != 1 else ''}"


def _breakdown(need: MemoryNeed) -> str:
    """'80.72 GB (68.74 GB for one request + 11.98 GB KV cache of 7 more sequences x 17408 tokens)'."""
    graphs = f" + {need.graphs_gb * need.gpus:.2f} GB CUDA graphs" if need.graphs_gb else ""
    if need.concurrent_sequences == 1:
        return f"{need.total_gb:.2f} GB (one request{graphs})"
    more = need.concurrent_sequences - 1
    copies = need.kv_bytes_per_token_per_gpu * need.gpus / need.kv_bytes_per_token
    replicated = f", {copies:.3g}x as each GPU keeps whole KV heads and layers" if copies > 1 else ""
    return (f"{need.total_gb:.2f} GB ({need.table_gb:.2f} GB for one request{graphs} + {need.concurrent_kv_gb:.2f} GB "
            f"KV cache of {more} more sequence{'s' if more > 1 else ''} x {need.context_tokens} tokens{replicated})")


def size(req: SizingRequest) -> Sizing:
    """Smallest power-of-two GPU count whose usable memory holds the table's request plus the KV cache
    of the further concurrent sequences, or a refusal that says what would fit."""
    if req.gpu_memory_gib <= 0:
        raise ValueError(f"GPU memory must be > 0 GiB, got {req.gpu_memory_gib}")
    if req.gpus_per_node < 1 or req.max_nodes_per_replica < 1:
        raise ValueError("gpus per node and nodes per replica must be >= 1")
    if not 0 < req.utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {req.utilization}")
    if req.max_num_seqs is None and req.role != "talker":
        raise ValueError("only the talker sizes its concurrency from its GPU; give the thinker's")
    if req.max_num_seqs is not None and req.max_num_seqs < 1:
        raise ValueError(f"concurrent sequences must be >= 1, got {req.max_num_seqs}")
    if req.role == "talker" and req.variant != "instruct":
        raise ValueError(f"variant {req.variant} has no talker: only instruct produces speech")

    est = estimate_gb(req.role, req.variant, req.video_seconds)
    usable = round(req.gpu_memory_gib * GIB_IN_GB * req.utilization, 2)
    notes = [est.note] if est.note else []
    uses_vllm = req.role != "talker"
    # The talker's prompt holds the same conversation (text and every multimodal position of the
    # user turn), and it writes about one codec frame per response token: the same context.
    context = req.max_model_len or max_model_len(req.video_seconds, req.audio_minutes, req.images_per_prompt)
    shapes = kv_shapes(req.role, req.variant, req.architecture)

    # Tensor parallelism within a node must be a power of two (attention heads split evenly);
    # a single node holds at most the largest power of two <= gpus_per_node.
    per_node = max(_powers_of_two(req.gpus_per_node))
    candidates = _powers_of_two(per_node * req.max_nodes_per_replica)
    if not uses_vllm:  # the talker server runs on one GPU per pod; more pods are more replicas
        candidates = [1]

    def layout(gpus: int) -> tuple[int, int]:
        return _layout(gpus, per_node) if uses_vllm else (1, 1)

    sequences = req.max_num_seqs or 1

    def need_on(gpus: int) -> MemoryNeed:
        pods, per_pod = layout(gpus)
        return MemoryNeed(
            table_gb=est.gigabytes, context_tokens=context, concurrent_sequences=sequences,
            kv_bytes_per_token=sum(s.bytes_per_token for s in shapes),
            kv_bytes_per_token_per_gpu=sum(s.bytes_per_token_per_gpu(per_pod, pods) for s in shapes), gpus=gpus,
            graphs_gb=TALKER_GRAPHS_GB if req.role == "talker" else 0.0)

    def result(need: MemoryNeed, notes: list[str], **kw: Any) -> Sizing:
        return Sizing(
            role=req.role, variant=req.variant, video_seconds=req.video_seconds,
            estimated_gb=round(need.total_gb, 2), gpu_memory_gib=req.gpu_memory_gib, usable_gb_per_gpu=usable,
            table_gb=est.gigabytes, graphs_gb=need.graphs_gb * need.gpus, concurrent_sequences=sequences,
            context_tokens=context,
            kv_bytes_per_token=need.kv_bytes_per_token, concurrent_kv_tokens=need.concurrent_kv_tokens,
            concurrent_kv_gb=round(need.concurrent_kv_gb, 2), sequences_that_fit=need.sequences_that_fit(usable),
            notes=notes, **kw)

    if context > MODEL_CONTEXT_TOKENS:
        return result(need_on(candidates[-1]), notes, fits=False, max_model_len=context if uses_vllm else 0, reason=(
            f"the largest request needs {context} context tokens "
            f"({req.video_seconds:g} s video, {req.audio_minutes:g} min audio, {req.images_per_prompt} images) "
            f"but the model's context is {MODEL_CONTEXT_TOKENS} tokens"))

    if req.max_num_seqs is None:  # the talker: as many streams as its GPU holds, up to the largest bucket
        held = need_on(1).sequences_that_fit(usable)
        sequences = min(TALKER_MAX_STREAMS, max(held, 1))
        if held >= 1:
            why = (f"the largest batch bucket; the GPU holds {held}" if held > sequences else "what the GPU holds")
            notes = notes + [f"talker.maxInflight unset: {sequences} concurrent streams per {req.gpu_memory_gib:g} GiB "
                             f"GPU ({why} at {context} tokens each, with {TALKER_GRAPHS_GB:g} GB for CUDA graphs)"]

    chosen = next((g for g in candidates if need_on(g).fits(usable)), None)
    if chosen is None:
        biggest = need_on(candidates[-1])
        where = (f"a node of this pool has {req.gpus_per_node} GPUs"
                 + (f" and a replica may span {req.max_nodes_per_replica} nodes" if req.max_nodes_per_replica > 1 else ""))
        if not uses_vllm:
            where = "the talker runs on one GPU per pod"
        n_fit = biggest.sequences_that_fit(usable)
        if n_fit >= 1:  # one request fits: name the concurrency that does
            remedy = (f"fits {_sequences(n_fit)} at this context on {biggest.gpus} x {req.gpu_memory_gib:g} GiB; "
                      f"asked for {req.max_num_seqs} ({req.concurrency_setting}); lower it, use larger GPUs"
                      + (", or allow more nodes per replica" if uses_vllm else ""))
        else:
            remedy = "use larger GPUs, allow more nodes per replica, or lower maxVideoSeconds"
        return result(biggest, notes, fits=False, max_model_len=context if uses_vllm else 0, reason=(
            f"needs {_breakdown(biggest)} but the largest replica allowed, {biggest.gpus} x {req.gpu_memory_gib:g} GiB "
            f"GPUs at {req.utilization:g} utilization, holds {biggest.gpus * usable:.2f} GB ({where}); {remedy}"))

    need = need_on(chosen)
    pods, gpus_per_pod = layout(chosen)
    tp = gpus_per_pod if uses_vllm else 0
    pp = pods if uses_vllm else 0
    reason = (f"{_breakdown(need)} fits on {_gpus(chosen, req.gpu_memory_gib)} "
              f"({chosen * usable:.2f} GB usable at {req.utilization:g})"
              + (f" across {pods} nodes" if pods > 1 else ""))
    # Say so when the concurrency, not the one request, decided the GPU count.
    table_alone = next(g for g in candidates if est.gigabytes / g <= usable + 1e-9)
    if table_alone < chosen:
        fewer = need_on(table_alone)
        notes = notes + [f"{_gpus(table_alone, req.gpu_memory_gib)} would hold "
                         f"{_sequences(fewer.sequences_that_fit(usable))} at {context} tokens; "
                         f"{req.max_num_seqs} ({req.concurrency_setting}) need {chosen}"]
    kv_cache_bytes = 0
    vllm_args: list[str] = []
    if uses_vllm:
        # vLLM serves the thinker: reserve on each GPU exactly its share of every sequence's full context,
        # so the replica runs the concurrency asked for (or fails at start-up), never quietly fewer.
        kv_cache_bytes = req.max_num_seqs * context * req.architecture.thinker.bytes_per_token_per_gpu(tp, pp)
        vllm_args = vllm_arguments(
            tensor_parallel=tp, pipeline_parallel=pp, model_len=context, max_num_seqs=req.max_num_seqs,
            limits=mm_limits(req.video_seconds, req.audio_minutes, req.images_per_prompt),
            utilization=req.utilization, kv_cache_memory_bytes=kv_cache_bytes)
    return result(need, notes, fits=True, reason=reason, kv_cache_bytes_per_gpu=kv_cache_bytes, gpus_per_replica=chosen,
                  pods_per_replica=pods, gpus_per_pod=gpus_per_pod, tensor_parallel_size=tp,
                  pipeline_parallel_size=pp, max_model_len=context if uses_vllm else 0, vllm_args=vllm_args)


def mm_limits(video_seconds: float, audio_minutes: float, images: int) -> dict[str, int]:
    """--limit-mm-per-prompt: one video and one audio when the workload has them."""
    return {"image": images, "video": 1 if video_seconds > 0 else 0, "audio": 1 if audio_minutes > 0 else 0}


def vllm_arguments(*, tensor_parallel: int, pipeline_parallel: int, model_len: int, max_num_seqs: int,
                   limits: dict[str, int], utilization: float, kv_cache_memory_bytes: int = 0) -> list[str]:
    args = [
        "--tensor-parallel-size", str(tensor_parallel),
        "--max-model-len", str(model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--limit-mm-per-prompt", json.dumps(limits, separators=(",", ":"), sort_keys=True),
        # Still checked by vLLM at start-up (the GPU must have this much free); the KV cache itself
        # is the planned size below, and what the plan leaves is headroom for what the table misses.
        "--gpu-memory-utilization", f"{utilization:g}",
    ]
    if kv_cache_memory_bytes:
        args += ["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)]
    if pipeline_parallel > 1:
        args += ["--pipeline-parallel-size", str(pipeline_parallel)]
    return args


@dataclass(frozen=True)
class DeploymentSizing:
    """Sizing of every GPU role of one OmniDeployment."""

    thinker: Sizing
    talker: Sizing | None

    @property
    def fits(self) -> bool:
        return self.thinker.fits and (self.talker is None or self.talker.fits)

    @property
    def reason(self) -> str:
        parts = [f"{s.role}: {s.reason}" for s in (self.thinker, self.talker) if s is not None]
        failing = [f"{s.role}: {s.reason}" for s in (self.thinker, self.talker) if s is not None and not s.fits]
        return "; ".join(failing or parts)


def size_deployment(spec: OmniDeploymentSpec, architecture: ModelArchitecture = QWEN3_OMNI_30B_A3B) -> DeploymentSizing:
    """Size the thinker (Thinking row) and, for Instruct, the talker (row difference), each with the
    KV cache of its concurrency: workload.maxConcurrentSequences and talker.maxInflight."""
    variant = spec.variant.lower()
    workload = spec.workload
    # The Captioner takes audio only: video and images don't apply.
    video = 0.0 if variant == "captioner" else workload.max_video_seconds
    images = 0 if variant == "captioner" else workload.max_images_per_prompt
    gpu = spec.thinker.gpu
    thinker = size(SizingRequest(
        role="thinker", variant=variant, video_seconds=video, gpu_memory_gib=gpu.memory_gib,
        gpus_per_node=gpu.count_per_node, max_nodes_per_replica=gpu.max_nodes_per_replica,
        utilization=gpu.utilization, audio_minutes=workload.max_audio_minutes, images_per_prompt=images,
        max_num_seqs=workload.max_concurrent_sequences, max_model_len=workload.max_model_len,
        architecture=architecture, concurrency_setting="workload.maxConcurrentSequences"))
    talker = None
    talker_spec = spec.effective_talker
    if talker_spec is not None:
        tgpu = talker_spec.gpu
        talker = size(SizingRequest(
            role="talker", variant=variant, video_seconds=video, gpu_memory_gib=tgpu.memory_gib,
            gpus_per_node=tgpu.count_per_node, max_nodes_per_replica=1, utilization=tgpu.utilization,
            audio_minutes=workload.max_audio_minutes, images_per_prompt=images,
            max_num_seqs=talker_spec.max_inflight, max_model_len=workload.max_model_len,
            architecture=architecture, concurrency_setting="talker.maxInflight"))
    return DeploymentSizing(thinker=thinker, talker=talker)


def role_sizing_status(s: Sizing) -> RoleSizing:
    """status.sizing.<role>: the GPU layout and the memory breakdown behind it."""
    return RoleSizing(
        estimated_gb=s.estimated_gb, table_gb=s.table_gb, graphs_gb=s.graphs_gb or None,
        concurrent_sequences=s.concurrent_sequences,
        context_tokens=s.context_tokens, kv_cache_bytes_per_token=s.kv_bytes_per_token,
        concurrent_kv_tokens=s.concurrent_kv_tokens, concurrent_kv_gb=s.concurrent_kv_gb,
        kv_cache_bytes_per_gpu=s.kv_cache_bytes_per_gpu or None,
        gpus_per_replica=s.gpus_per_replica, pods_per_replica=s.pods_per_replica, gpus_per_pod=s.gpus_per_pod,
        tensor_parallel_size=s.tensor_parallel_size or None,
        pipeline_parallel_size=s.pipeline_parallel_size if s.tensor_parallel_size else None,
        vllm_args=list(s.vllm_args), notes=list(s.notes))


def sizing_status(sizing: DeploymentSizing, gpus_total: int) -> SizingStatus:
    return SizingStatus(thinker=role_sizing_status(sizing.thinker),
                        talker=role_sizing_status(sizing.talker) if sizing.talker is not None else None,
                        max_model_len=sizing.thinker.max_model_len, gpus_total=gpus_total)
