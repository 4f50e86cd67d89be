"""GPU sizing: the Qwen3-Omni model card's memory table plus the KV cache of concurrent sequences.

Pure functions only. The table (Transformers, BF16, FlashAttention-2, video input)
gives the memory of ONE request of a given video length (weights, activations and
that request's KV cache):

    Instruct (thinker + talker) and Thinking (thinker alone).

The thinker costs the Thinking row, the talker the difference of the rows.
Between table points we interpolate linearly; below 15 s we use the 15 s figure;
beyond 120 s we extrapolate with the last slope and say so.

A replica serves several sequences at once (vLLM --max-num-seqs for the thinker, the
talker's batch); each further sequence at the declared context adds its KV cache,
computed from the checkpoint's architecture:
2 (K and V) x layers x KV heads x head dim x dtype bytes per token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .api import MODEL_CONTEXT_TOKENS, OmniDeploymentSpec, RoleSizing, SizingStatus

GIB_IN_GB = 1024 ** 3 / 1e9  # the table is in GB (1e9 bytes); GPUs are sold in GiB

# (video seconds, GB) — Qwen3-Omni-30B-A3B model card.
TABLE_SECONDS = (15.0, 30.0, 60.0, 120.0)
TABLE_GB = {
    "instruct": (78.85, 88.52, 107.74, 144.81),
    "thinking": (68.74, 77.79, 95.76, 131.65),
}

# Token budget behind --max-model-len (Qwen3-Omni encoders):
# AuT audio encoder emits 12.5 tokens per second of audio;
# video is sampled at 2 fps with 2-frame temporal merge and 2x2 spatial merge,
# about 256 visual tokens per second at the serving resolution, plus its audio track.
AUDIO_TOKENS_PER_SECOND = 12.5
VIDEO_TOKENS_PER_SECOND = 256 + AUDIO_TOKENS_PER_SECOND
IMAGE_TOKENS = 1280  # one image at the default max pixels
TEXT_TOKENS = 8192  # prompt text and the response
MODEL_LEN_ROUNDING = 1024

Role = Literal["thinker", "talker", "combined"]
Variant = Literal["instruct", "thinking", "captioner"]


def table_row(role: Role, variant: Variant) -> tuple[float, ...]:
    """The memory curve (GB per table point) a pod of this role loads."""
    if role == "talker":
        return tuple(i - t for i, t in zip(TABLE_GB["instruct"], TABLE_GB["thinking"]))
    if role == "combined" and variant == "instruct":
        return TABLE_GB["instruct"]
    # The thinker alone, and every variant without a talker (Thinking, Captioner).
    return TABLE_GB["thinking"]


@dataclass(frozen=True)
class Estimate:
    gigabytes: float
    extrapolated: bool
    note: str | None = None


def estimate_gb(role: Role, variant: Variant, video_seconds: float) -> Estimate:
    """Memory (GB) for one request with a video of ``video_seconds``."""
    if video_seconds < 0 or math.isnan(video_seconds):
        raise ValueError(f"video seconds must be >= 0, got {video_seconds}")
    row = table_row(role, variant)
    xs = TABLE_SECONDS
    if video_seconds <= xs[0]:
        return Estimate(round(row[0], 2), False)
    for i in range(1, len(xs)):
        if video_seconds <= xs[i]:
            frac = (video_seconds - xs[i - 1]) / (xs[i] - xs[i - 1])
            return Estimate(round(row[i - 1] + frac * (row[i] - row[i - 1]), 2), False)
    slope = (row[-1] - row[-2]) / (xs[-1] - xs[-2])
    gb = row[-1] + slope * (video_seconds - xs[-1])
    note = (f"{video_seconds:g} s is beyond the model card's 120 s point: "
            f"extrapolated at {slope:.3f} GB per second from {row[-1]:.2f} GB")
    return Estimate(round(gb, 2), True, note)


def max_model_len(video_seconds: float, audio_minutes: float, images: int) -> int:
    """Context tokens for the largest request, rounded up to a multiple of 1024."""
    tokens = (video_seconds * VIDEO_TOKENS_PER_SECOND
              + audio_minutes * 60 * AUDIO_TOKENS_PER_SECOND
              + images * IMAGE_TOKENS
              + TEXT_TOKENS)
    return int(math.ceil(tokens / MODEL_LEN_ROUNDING) * MODEL_LEN_ROUNDING)


# ----------------------------------------------------------------------------- KV cache


@dataclass(frozen=True)
class KvCacheShape:
    """What one token of a decoder's KV cache is made of."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # bf16

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"KV cache {name} must be >= 1, got {getattr(self, name)}")

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def bytes_per_token_per_gpu(self, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> int:
        """The share of one token's KV cache that one GPU holds. vLLM splits the KV heads over the
        tensor-parallel ranks but keeps at least one per rank (heads are replicated when TP exceeds
        them), and pipeline stages split the layers."""
        heads = max(1, math.ceil(self.kv_heads / tensor_parallel))
        layers = math.ceil(self.layers / pipeline_parallel)
        return 2 * layers * heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class ModelArchitecture:
    """The KV-cache shapes of the thinker's and the talker's language models."""

    thinker: KvCacheShape
    talker: KvCacheShape


# Qwen/Qwen3-Omni-30B-A3B-Instruct config.json (the Thinking and Captioner checkpoints share the thinker):
# thinker_config.text_config: num_hidden_layers 48, num_key_value_heads 4, head_dim 128;
# talker_config.text_config: num_hidden_layers 20, num_key_value_heads 2, head_dim 128; dtype bfloat16.
# (transformers 5.24's Qwen3OmniMoeTalkerTextConfig defaults agree for the talker: 20 layers, 2 KV heads.)
# The talker's code predictor (MTP, 5 layers) only attends within one codec frame: negligible.
QWEN3_OMNI_30B_A3B = ModelArchitecture(
    thinker=KvCacheShape(layers=48, kv_heads=4, head_dim=128, dtype_bytes=2),  # 96 KiB per token
    talker=KvCacheShape(layers=20, kv_heads=2, head_dim=128, dtype_bytes=2),   # 20 KiB per token
)

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4,
               "float8_e4m3fn": 1, "float8_e5m2": 1}


def architecture_from_config(config: dict[str, Any],
                             defaults: ModelArchitecture = QWEN3_OMNI_30B_A3B) -> ModelArchitecture:
    """The KV-cache shapes read from a Qwen3-Omni checkpoint's config.json (already parsed):
    ``thinker_config.text_config`` and ``talker_config.text_config``. A checkpoint without a talker
    (Thinking, Captioner) keeps the default talker shape."""
    if not isinstance(config, dict) or not isinstance((config.get("thinker_config") or {}).get("text_config"), dict):
        raise ValueError("not a Qwen3-Omni config.json: it has no thinker_config.text_config")
    checkpoint_dtype = config.get("dtype") or config.get("torch_dtype")
    thinker = _kv_shape(config["thinker_config"], checkpoint_dtype, "thinker_config")
    talker_config = config.get("talker_config")
    talker = (_kv_shape(talker_config, checkpoint_dtype, "talker_config")
              if isinstance(talker_config, dict) and isinstance(talker_config.get("text_config"), dict)
              else defaults.talker)
    return ModelArchitecture(thinker=thinker, talker=talker)


def _kv_shape(role_config: dict[str, Any], checkpoint_dtype: str | None, where: str) -> KvCacheShape:
    text = role_config["text_config"]
    if not isinstance(text.get("num_hidden_layers"), int):
        raise ValueError(f"{where}.text_config has no num_hidden_layers")
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads") or heads  # no GQA: every head has its own K and V
    head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads and text.get("hidden_size") else None)
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise ValueError(f"{where}.text_config needs num_key_value_heads (or num_attention_heads) and head_dim "
                         "(or hidden_size)")
    # vLLM's KV cache takes the model's dtype unless --kv-cache-dtype says otherwise (we never set it).
    dtype = text.get("dtype") or text.get("torch_dtype") or role_config.get("dtype") or checkpoint_dtype or "bfloat16"
    if str(dtype) not in DTYPE_BYTES:
        raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_BYTES))})")
    return KvCacheShape(layers=text["num_hidden_layers"], kv_heads=kv_heads, head_dim=head_dim,
                        dtype_bytes=DTYPE_BYTES[str(dtype)])


def kv_shapes(role: Role, variant: Variant, arch: ModelArchitecture) -> tuple[KvCacheShape, ...]:
    """The decoders whose KV cache a pod of this role holds (mirrors table_row)."""
    if role == "talker":
        return (arch.talker,)
    if role == "combined" and variant == "instruct":
        return (arch.thinker, arch.talker)
    return (arch.thinker,)


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

    @property
    def concurrent_kv_tokens(self) -> int:
        """The first sequence's KV is in the table; the others each add a full context."""
        return (self.concurrent_sequences - 1) * self.context_tokens

    @property
    def gb_per_gpu(self) -> float:
        return self.table_gb / self.gpus + self.concurrent_kv_tokens * self.kv_bytes_per_token_per_gpu / 1e9

    @property
    def concurrent_kv_gb(self) -> float:
        """Across the replica's GPUs (more than tokens x bytes per token when KV heads are replicated)."""
        return self.concurrent_kv_tokens * self.kv_bytes_per_token_per_gpu * self.gpus / 1e9

    @property
    def total_gb(self) -> float:
        return self.table_gb + self.concurrent_kv_gb

    def fits(self, usable_gb_per_gpu: float) -> bool:
        return self.gb_per_gpu <= usable_gb_per_gpu + 1e-9

    def sequences_that_fit(self, usable_gb_per_gpu: float) -> int:
        """Concurrent sequences at this context that fit in this layout (0: not even one request)."""
        room = usable_gb_per_gpu - self.table_gb / self.gpus
        if room < -1e-9:
            return 0
        per_sequence = self.context_tokens * self.kv_bytes_per_token_per_gpu / 1e9
        return 1 + math.floor((room + 1e-9) / per_sequence)


def _layout(gpus: int, per_node: int) -> tuple[int, int]:
    """(pods, GPUs per pod) of a replica: one node's worth of GPUs per pod."""
    pods = max(1, gpus // per_node)
    return pods, gpus // pods


# ----------------------------------------------------------------------------- sizing


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
    max_num_seqs: int = 8  # concurrent sequences per replica (the talker: syntheses decoded together)
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
    if need.concurrent_sequences == 1:
        return f"{need.total_gb:.2f} GB (one request)"
    more = need.concurrent_sequences - 1
    copies = need.kv_bytes_per_token_per_gpu * need.gpus / need.kv_bytes_per_token
    replicated = f", {copies:.3g}x as each GPU keeps whole KV heads and layers" if copies > 1 else ""
    return (f"{need.total_gb:.2f} GB ({need.table_gb:.2f} GB for one request + {need.concurrent_kv_gb:.2f} GB "
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
    if req.max_num_seqs < 1:
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

    def need_on(gpus: int) -> MemoryNeed:
        pods, per_pod = layout(gpus)
        return MemoryNeed(
            table_gb=est.gigabytes, context_tokens=context, concurrent_sequences=req.max_num_seqs,
            kv_bytes_per_token=sum(s.bytes_per_token for s in shapes),
            kv_bytes_per_token_per_gpu=sum(s.bytes_per_token_per_gpu(per_pod, pods) for s in shapes), gpus=gpus)

    def result(need: MemoryNeed, notes: list[str], **kw: Any) -> Sizing:
        return Sizing(
            role=req.role, variant=req.variant, video_seconds=req.video_seconds,
            estimated_gb=round(need.total_gb, 2), gpu_memory_gib=req.gpu_memory_gib, usable_gb_per_gpu=usable,
            table_gb=est.gigabytes, concurrent_sequences=req.max_num_seqs, context_tokens=context,
            kv_bytes_per_token=need.kv_bytes_per_token, concurrent_kv_tokens=need.concurrent_kv_tokens,
            concurrent_kv_gb=round(need.concurrent_kv_gb, 2), sequences_that_fit=need.sequences_that_fit(usable),
            notes=notes, **kw)

    if context > MODEL_CONTEXT_TOKENS:
        return result(need_on(candidates[-1]), notes, fits=False, max_model_len=context if uses_vllm else 0, reason=(
            f"the largest request needs {context} context tokens "
            f"({req.video_seconds:g} s video, {req.audio_minutes:g} min audio, {req.images_per_prompt} images) "
            f"but the model's context is {MODEL_CONTEXT_TOKENS} tokens"))

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


# ----------------------------------------------------------------------------- status


def role_sizing_status(s: Sizing) -> RoleSizing:
    """status.sizing.<role>: the GPU layout and the memory breakdown behind it."""
    return RoleSizing(
        estimated_gb=s.estimated_gb, table_gb=s.table_gb, concurrent_sequences=s.concurrent_sequences,
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
