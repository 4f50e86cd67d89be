"""vLLM's sampling extensions on the transformers thinker: `ignore_eos` and `min_tokens`
(benchmarks need long answers from the random-weight tiny model)."""

from __future__ import annotations

import json

import pytest

from omni_runtime.thinker.transformers_server import BadRequest, _params

from .helpers import post_stream, run

pytestmark = pytest.mark.runtime


def ask(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Count."}], "temperature": 0, **extra}


def test_params_take_them_as_vllm_does():
    p = _params(ask())
    assert (p["ignore_eos"], p["min_tokens"]) == (False, 0)
    p = _params(ask(ignore_eos=True, min_tokens=8, max_tokens=8))
    assert (p["ignore_eos"], p["min_tokens"], p["max_tokens"]) == (True, 8, 8)
    for extra, needle in [({"ignore_eos": "yes"}, "ignore_eos"), ({"ignore_eos": None}, "ignore_eos"),
                          ({"min_tokens": -1}, "greater than or equal to 0"), ({"min_tokens": 2.5}, "integer"),
                          ({"min_tokens": 9, "max_tokens": 8}, "less than or equal to max_tokens=8")]:
        with pytest.raises(BadRequest, match=needle):
            _params(ask(**extra))


def test_generation_goes_past_eos_only_when_asked(tiny_model):
    """A thinker that wants to say EOS at every step: it stops at once, unless ignore_eos
    (runs to max_tokens) or min_tokens (EOS held back until then)."""
    from omni_runtime.thinker.transformers_server import ThinkerEngine

    engine = ThinkerEngine(str(tiny_model))
    eos = engine.eos

    def prefer_eos(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 1e4
        return logits

    engine.model.lm_head.register_forward_hook(prefer_eos)
    prep = engine.prepare(ask()["messages"])

    def generate(**extra):
        return engine.generate(prep, _params(ask(max_tokens=12, **extra)), lambda _ids: None, False)["token_ids"]

    assert generate() == [eos]
    assert generate(ignore_eos=True) == [eos] * 12
    ids = generate(min_tokens=5)
    assert len(ids) == 6 and eos not in ids[:5] and ids[5] == eos


def test_the_server_answers_at_full_length_with_ignore_eos(tiny_model, spawn):
    thinker = spawn("thinker", {"OMNI_MODEL": str(tiny_model), "OMNI_DEVICE": "cpu", "OMNI_ROLE": "thinker"},
                    args=("--engine", "transformers")).wait_ready()
    url = thinker.url + "/v1/chat/completions"
    status, _, raw, _ = run(post_stream(url, ask(max_tokens=40, ignore_eos=True, min_tokens=40)))
    assert status == 200, raw[:300]
    out = json.loads(raw)
    assert out["usage"]["completion_tokens"] == 40 and out["choices"][0]["finish_reason"] == "length"
    status, _, raw, _ = run(post_stream(url, ask(max_tokens=4, min_tokens=5)))
    assert status == 400 and "min_tokens" in json.loads(raw)["error"]["message"]
