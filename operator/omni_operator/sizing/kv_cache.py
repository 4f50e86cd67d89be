"""The KV cache of one sequence, from the checkpoint's architecture (pure):
2 (K and V) x layers x KV heads x head dim x dtype bytes per token, with the copies tensor
parallelism makes when it exceeds the KV heads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omni_operator.sizing.model_card import Role, Variant


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
