"""Load only part of a Qwen3-Omni checkpoint (the talker pod never reads the 30B thinker).

A checkpoint directory holds `model.safetensors` or shards listed in
`model.safetensors.index.json`; tensors are named `thinker.*`, `talker.*`, `code2wav.*`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local directory as is; a hub repo id only if it is already in the local cache.

    Runtime pods get their weights from a volume or a pre-populated cache: nothing is
    downloaded here.
    """
    p = Path(model)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision or None, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - report one clear message
        raise FileNotFoundError(
            f"model {model!r} is neither a directory nor in the local Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}): {exc}"
        ) from exc


def _shards(model_dir: Path) -> dict[str, list[str]]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        return by_file
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors or index in {model_dir}")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {"model.safetensors": list(f.keys())}


def load_prefixed(model_dir: Path, prefixes: dict[str, str], device="cpu", dtype=None) -> dict[str, dict]:
    """Read the tensors whose names start with each prefix.

    `prefixes` maps a result name to a key prefix (e.g. {"talker": "talker."}); the
    result maps the same names to state dicts with the prefix stripped. Shards that
    hold none of the wanted tensors are never opened.
    """
    from safetensors import safe_open

    out: dict[str, dict] = {name: {} for name in prefixes}
    for fname, keys in _shards(model_dir).items():
        wanted = [(k, name, pre) for k in keys for name, pre in prefixes.items() if k.startswith(pre)]
        if not wanted:
            continue
        with safe_open(str(model_dir / fname), "pt", device=str(device)) as f:
            for key, name, pre in wanted:
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[name][key[len(pre):]] = t
    return out


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(state: dict) -> dict:
    """Checkpoints store MoE experts one by one (`experts.{i}.gate_proj.weight`, ...);
    the transformers modules hold them fused: `experts.gate_up_proj` [E, 2I, H] (gate
    rows then up rows per expert) and `experts.down_proj` [E, H, I]."""
    import torch

    groups: dict[str, dict[int, dict[str, object]]] = {}
    out = {}
    for key, t in state.items():
        m = _EXPERT.match(key)
        if m is None:
            out[key] = t
            continue
        groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
    for base, experts in groups.items():
        order = sorted(experts)
        if order != list(range(len(order))):
            raise RuntimeError(f"{base}: expert indices are not contiguous")
        out[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat((experts[i]["gate_proj"], experts[i]["up_proj"]), dim=0) for i in order]
        )
        out[f"{base}.down_proj"] = torch.stack([experts[i]["down_proj"] for i in order])
    return out


def load_module(module, state: dict, what: str) -> None:
    """load_state_dict that tolerates only tied weights being absent."""
    state = fuse_experts(state)
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied = set()
    for attr in ("_tied_weights_keys",):
        keys = getattr(module, attr, None) or {}
        tied |= {f"{k}.weight" if not k.endswith("weight") else k for k in keys}
    real_missing = [k for k in missing if k not in tied]
    if real_missing:
        raise RuntimeError(f"{what}: checkpoint lacks {len(real_missing)} tensors, e.g. {real_missing[:5]}")
    if unexpected:
        raise RuntimeError(f"{what}: checkpoint has unexpected tensors, e.g. {unexpected[:5]}")
