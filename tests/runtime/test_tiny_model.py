"""The tiny checkpoint every runtime test loads: each weight is drawn, none left as whatever
memory the allocator returned (transformers' init skips the talker's MoE router and experts,
which then held zeros here and NaN on another machine)."""

from __future__ import annotations

import pytest
import torch  # the runtime extra; `make test` installs it
from safetensors import safe_open

pytestmark = pytest.mark.runtime


def test_every_weight_matrix_is_drawn(tiny_model):
    undrawn = []
    for shard in sorted(tiny_model.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                # Matrices and expert stacks only: biases and norm offsets start at zero by design.
                if t.is_floating_point() and t.dim() >= 2 and (not torch.isfinite(t).all() or t.abs().max() < 1e-6):
                    undrawn.append(key)
    assert not undrawn, f"weights left undrawn: {undrawn[:8]}"


def test_the_talker_experts_take_part(tiny_model):
    """Loaded as a talker pod loads it, each expert of the talker's MoE block adds to the output
    (undrawn experts gave zeros here)."""
    from omni_runtime.talker.engine import TalkerEngine

    engine = TalkerEngine(str(tiny_model), device="cpu")
    experts = engine.talker.model.layers[0].mlp.experts
    tokens = torch.randn(experts.num_experts, experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(1))
    one_each = torch.arange(experts.num_experts).view(-1, 1)  # token i goes to expert i alone
    with torch.no_grad():
        out = experts(tokens, one_each, torch.ones(experts.num_experts, 1))
    assert torch.isfinite(out).all()
    assert (out.abs().amax(dim=-1) > 1e-4).all(), "an expert contributes nothing"


def test_the_sizing_kv_cache_per_token_is_what_the_model_holds(capsys):
    """bench.model_memory_bench rehearsed on the tiny dimensions (its GPU run measures the full
    model): the KV cache transformers keeps per token equals the sizing's formula read from the
    same config, for the thinker and the talker."""
    from bench.model_memory_bench import parse_args, run

    rows = run(parse_args(["--scale", "tiny", "--seconds", "2", "--device", "cpu"]))
    assert len(rows) == 1 and rows[0]["context"] > 2 * 256  # the 2 s video's tokens and its audio track
    assert rows[0]["thinker_kv_per_token"] == rows[0]["sizing_thinker_kv_per_token"]
    assert rows[0]["talker_kv_per_token"] == rows[0]["sizing_talker_kv_per_token"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("ratio measured/table")
