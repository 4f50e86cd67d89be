"""The Qwen3-Omni model card's GPU memory table, and the context a request of the declared media
needs (pure).

The table (Transformers, BF16, FlashAttention-2, video input) gives the memory of ONE request
of a given video length (weights, activations and that request's KV cache): Instruct (thinker +
talker) and Thinking (thinker alone). The thinker costs the Thinking row, the talker the
difference of the rows. Between table points we interpolate linearly; below 15 s we use the
15 s figure; beyond 120 s we extrapolate with the last slope and say so."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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
