"""GPU sizing from the Qwen3-Omni model card's memory table.

Pure functions only. The table (Transformers, BF16, FlashAttention-2, video input)
gives the memory for one request of a given video length:

    Instruct (thinker + talker) and Thinking (thinker alone).

The thinker costs the Thinking row, the talker the difference of the rows.
Between table points we interpolate linearly; below 15 s we use the 15 s figure;
beyond 120 s we extrapolate with the last slope and say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

from .api import MODEL_CONTEXT_TOKENS, OmniDeploymentSpec

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
    max_num_seqs: int = 8
    max_model_len: int | None = None  # override of the derived context length


@dataclass(frozen=True)
class Sizing:
    role: Role
    variant: Variant
    video_seconds: float
    estimated_gb: float
    gpu_memory_gib: float
    usable_gb_per_gpu: float
    fits: bool
    reason: str
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


def size(req: SizingRequest) -> Sizing:
    """Smallest power-of-two GPU count whose usable memory holds the estimate, or a refusal."""
    if req.gpu_memory_gib <= 0:
        raise ValueError(f"GPU memory must be > 0 GiB, got {req.gpu_memory_gib}")
    if req.gpus_per_node < 1 or req.max_nodes_per_replica < 1:
        raise ValueError("gpus per node and nodes per replica must be >= 1")
    if not 0 < req.utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {req.utilization}")
    if req.role == "talker" and req.variant != "instruct":
        raise ValueError(f"variant {req.variant} has no talker: only instruct produces speech")

    est = estimate_gb(req.role, req.variant, req.video_seconds)
    usable = round(req.gpu_memory_gib * GIB_IN_GB * req.utilization, 2)
    notes = [est.note] if est.note else []
    base = dict(role=req.role, variant=req.variant, video_seconds=req.video_seconds,
                estimated_gb=est.gigabytes, gpu_memory_gib=req.gpu_memory_gib,
                usable_gb_per_gpu=usable, notes=notes)

    uses_vllm = req.role != "talker"
    model_len = 0
    if uses_vllm:
        model_len = req.max_model_len or max_model_len(req.video_seconds, req.audio_minutes, req.images_per_prompt)
        if model_len > MODEL_CONTEXT_TOKENS:
            return Sizing(**base, fits=False, max_model_len=model_len, reason=(
                f"the largest request needs {model_len} context tokens "
                f"({req.video_seconds:g} s video, {req.audio_minutes:g} min audio, {req.images_per_prompt} images) "
                f"but the model's context is {MODEL_CONTEXT_TOKENS} tokens"))

    # Tensor parallelism within a node must be a power of two (attention heads split evenly);
    # a single node holds at most the largest power of two <= gpus_per_node.
    per_node = max(_powers_of_two(req.gpus_per_node))
    candidates = [g for g in _powers_of_two(per_node * req.max_nodes_per_replica)]
    if not uses_vllm:  # the talker server runs on one GPU per pod; more pods are more replicas
        candidates = [1]
    for gpus in candidates:
        if gpus * usable >= est.gigabytes:
            break
    else:
        biggest = candidates[-1]
        where = (f"a node of this pool has {req.gpus_per_node} GPUs"
                 + (f" and a replica may span {req.max_nodes_per_replica} nodes" if req.max_nodes_per_replica > 1 else ""))
        if not uses_vllm:
            where = "the talker runs on one GPU per pod"
        return Sizing(**base, fits=False, max_model_len=model_len, reason=(
            f"needs {est.gigabytes:.2f} GB but the largest replica allowed, {biggest} x {req.gpu_memory_gib:g} GiB "
            f"GPUs at {req.utilization:g} utilization, holds {biggest * usable:.2f} GB ({where}); "
            f"use larger GPUs, allow more nodes per replica, or lower maxVideoSeconds"))

    pods = max(1, gpus // per_node)
    gpus_per_pod = gpus // pods
    tp = gpus_per_pod if uses_vllm else 0
    pp = pods if uses_vllm else 0
    reason = (f"{est.gigabytes:.2f} GB fits on {gpus} x {req.gpu_memory_gib:g} GiB GPU"
              f"{'s' if gpus > 1 else ''} ({gpus * usable:.2f} GB usable at {req.utilization:g})"
              + (f" across {pods} nodes" if pods > 1 else ""))
    vllm_args: list[str] = []
    if uses_vllm:
        vllm_args = vllm_arguments(
            tensor_parallel=tp, pipeline_parallel=pp, model_len=model_len, max_num_seqs=req.max_num_seqs,
            limits=mm_limits(req.video_seconds, req.audio_minutes, req.images_per_prompt),
            utilization=req.utilization)
    return Sizing(**base, fits=True, reason=reason, gpus_per_replica=gpus, pods_per_replica=pods,
                  gpus_per_pod=gpus_per_pod, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                  max_model_len=model_len, vllm_args=vllm_args)


def mm_limits(video_seconds: float, audio_minutes: float, images: int) -> dict[str, int]:
    """--limit-mm-per-prompt: one video and one audio when the workload has them."""
    return {"image": images, "video": 1 if video_seconds > 0 else 0, "audio": 1 if audio_minutes > 0 else 0}


def vllm_arguments(*, tensor_parallel: int, pipeline_parallel: int, model_len: int, max_num_seqs: int,
                   limits: dict[str, int], utilization: float) -> list[str]:
    args = [
        "--tensor-parallel-size", str(tensor_parallel),
        "--max-model-len", str(model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--limit-mm-per-prompt", json.dumps(limits, separators=(",", ":"), sort_keys=True),
        "--gpu-memory-utilization", f"{utilization:g}",
    ]
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


def size_deployment(spec: OmniDeploymentSpec) -> DeploymentSizing:
    """Size the thinker (Thinking row) and, for Instruct, the talker (row difference)."""
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
        max_num_seqs=workload.max_concurrent_sequences, max_model_len=workload.max_model_len))
    talker = None
    talker_spec = spec.effective_talker
    if talker_spec is not None:
        tgpu = talker_spec.gpu
        talker = size(SizingRequest(
            role="talker", variant=variant, video_seconds=video, gpu_memory_gib=tgpu.memory_gib,
            gpus_per_node=tgpu.count_per_node, max_nodes_per_replica=1, utilization=tgpu.utilization))
    return DeploymentSizing(thinker=thinker, talker=talker)
