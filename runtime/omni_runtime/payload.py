"""The thinker -> talker payload (version 1): what a talker needs to speak a response.

JSON object, `Content-Type: application/json`:

    {
      "v": 1,
      "request_id": "chatcmpl-...",            # optional, echoed in logs and headers
      "speaker": "Ethan",                      # a key of talker_config.speaker_id (case-insensitive)
      "prompt_ids": [int, ...],                # the conversation as the thinker saw it, chat template
                                               #   applied, ending with "<|im_start|>assistant\n"
      "response_ids": [int, ...],              # the ids the thinker generated (may end with <|im_end|>)
      "mm": null | {                           # only when the prompt has audio/image/video tokens
        "layer": 24,                           # talker_config.accept_hidden_layer (24 in the real checkpoint)
        "dtype": "bfloat16",                   # bfloat16 | float16 | float32, little-endian
        "shape": [n_mm_tokens, thinker_hidden],
        "data": "<base64>",                    # rows in the order the mm tokens appear in prompt_ids
        "audio_feature_lengths": [int, ...],   # per audio input (3D RoPE of the talker)
        "image_grid_thw": [[t, h, w], ...],
        "video_grid_thw": [[t, h, w], ...],
        "video_second_per_grid": [float, ...]
      },
      "generation": {"max_codes": 4096, "min_codes": 0, "do_sample": true, "temperature": 0.9,
                     "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.05, "seed": null},
      "format": "wav"                          # wav (streamed header + PCM16) | pcm (raw PCM16)
    }

Text positions need no tensors at all: the talker embeds the token ids with its own
copy of the thinker's embedding table. Only multimodal positions carry hidden states.
This module is import-light (no torch) so the gateway can validate and forward payloads.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}
GENERATION_KEYS = {
    "max_codes": int, "min_codes": int, "do_sample": bool, "temperature": float,
    "top_k": int, "top_p": float, "repetition_penalty": float, "seed": int,
}
FORMATS = ("wav", "pcm")


class PayloadError(ValueError):
    """A payload that cannot be spoken; the message is safe to return to the client."""


@dataclass
class MMStates:
    layer: int
    dtype: str
    shape: tuple[int, int]
    raw: bytes
    audio_feature_lengths: list[int] = field(default_factory=list)
    image_grid_thw: list[list[int]] = field(default_factory=list)
    video_grid_thw: list[list[int]] = field(default_factory=list)
    video_second_per_grid: list[float] = field(default_factory=list)

    def tensor(self):
        """The states as a torch tensor of shape `shape` (torch imported lazily)."""
        import numpy as np
        import torch

        if self.dtype == "bfloat16":
            arr = np.frombuffer(self.raw, dtype="<i2").copy()
            t = torch.from_numpy(arr).view(torch.bfloat16)
        else:
            arr = np.frombuffer(self.raw, dtype="<f2" if self.dtype == "float16" else "<f4").copy()
            t = torch.from_numpy(arr)
        return t.reshape(self.shape)


@dataclass
class TalkerRequest:
    prompt_ids: list[int]
    response_ids: list[int]
    speaker: str = "Ethan"
    mm: MMStates | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    format: str = "wav"
    request_id: str = ""


def _int_list(value, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise PayloadError(f"{name} must be a list of integers")
    if any(x < 0 for x in value):
        raise PayloadError(f"{name} has negative token ids")
    return value


def parse(obj: Any) -> TalkerRequest:
    """Validate a decoded JSON payload (structure and sizes, not model-specific ids)."""
    if not isinstance(obj, dict):
        raise PayloadError("payload must be a JSON object")
    if obj.get("v", 1) != 1:
        raise PayloadError(f"unsupported payload version {obj.get('v')!r}; this talker speaks v1")
    prompt = _int_list(obj.get("prompt_ids"), "prompt_ids")
    response = _int_list(obj.get("response_ids"), "response_ids")
    if not prompt:
        raise PayloadError("prompt_ids is empty")
    if not response:
        raise PayloadError("response_ids is empty: nothing to speak")
    speaker = obj.get("speaker") or "Ethan"
    if not isinstance(speaker, str):
        raise PayloadError("speaker must be a string")
    fmt = obj.get("format") or "wav"
    if fmt not in FORMATS:
        raise PayloadError(f"format must be one of {', '.join(FORMATS)}")
    gen_in = obj.get("generation") or {}
    if not isinstance(gen_in, dict):
        raise PayloadError("generation must be an object")
    gen: dict[str, Any] = {}
    for key, value in gen_in.items():
        typ = GENERATION_KEYS.get(key)
        if typ is None:
            raise PayloadError(f"unknown generation option {key!r}")
        if value is None:
            continue
        if typ is bool:
            if not isinstance(value, bool):
                raise PayloadError(f"generation.{key} must be a boolean")
        elif typ is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise PayloadError(f"generation.{key} must be an integer")
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PayloadError(f"generation.{key} must be a number")
        gen[key] = typ(value)
    mm = None
    if obj.get("mm") is not None:
        mm = _parse_mm(obj["mm"])
    rid = obj.get("request_id") or ""
    return TalkerRequest(prompt, response, speaker, mm, gen, fmt, str(rid)[:128])


def _parse_mm(m: Any) -> MMStates:
    if not isinstance(m, dict):
        raise PayloadError("mm must be an object")
    dtype = m.get("dtype")
    if dtype not in DTYPE_SIZES:
        raise PayloadError(f"mm.dtype must be one of {', '.join(DTYPE_SIZES)}")
    shape = m.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x >= 0 for x in shape)):
        raise PayloadError("mm.shape must be [n_tokens, hidden_size]")
    try:
        raw = base64.b64decode(m.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise PayloadError(f"mm.data is not valid base64: {exc}") from exc
    if len(raw) != shape[0] * shape[1] * DTYPE_SIZES[dtype]:
        raise PayloadError(
            f"mm.data has {len(raw)} bytes, shape {shape} in {dtype} needs {shape[0] * shape[1] * DTYPE_SIZES[dtype]}"
        )
    layer = m.get("layer", -1)
    if not isinstance(layer, int):
        raise PayloadError("mm.layer must be an integer")

    def grids(name):
        v = m.get(name) or []
        if not isinstance(v, list) or not all(
            isinstance(g, list) and len(g) == 3 and all(isinstance(x, int) and x > 0 for x in g) for g in v
        ):
            raise PayloadError(f"mm.{name} must be a list of [t, h, w]")
        return v

    afl = m.get("audio_feature_lengths") or []
    if not isinstance(afl, list) or not all(isinstance(x, int) and x > 0 for x in afl):
        raise PayloadError("mm.audio_feature_lengths must be a list of positive integers")
    spg = m.get("video_second_per_grid") or []
    if not isinstance(spg, list) or not all(isinstance(x, (int, float)) for x in spg):
        raise PayloadError("mm.video_second_per_grid must be a list of numbers")
    return MMStates(layer, dtype, (shape[0], shape[1]), raw, afl, grids("image_grid_thw"),
                    grids("video_grid_thw"), [float(x) for x in spg])


def states_bytes(tensor, dtype: str = "bfloat16") -> bytes:
    """The rows of a [n, hidden] torch tensor as `mm.data` holds them before base64
    (little-endian `dtype`)."""
    import torch

    if dtype not in DTYPE_SIZES:
        raise ValueError(dtype)
    t = tensor.detach().to("cpu")
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    if dtype == "float16":
        return t.to(torch.float16).numpy().astype("<f2").tobytes()
    return t.to(torch.float32).numpy().astype("<f4").tobytes()


def encode_states(tensor, layer: int, dtype: str = "bfloat16", **meta) -> dict:
    """The `mm` object for a [n, hidden] torch tensor (little-endian)."""
    raw = states_bytes(tensor, dtype)
    out = {"layer": layer, "dtype": dtype, "shape": list(tensor.shape), "data": base64.b64encode(raw).decode("ascii")}
    out.update({k: v for k, v in meta.items() if v})
    return out
