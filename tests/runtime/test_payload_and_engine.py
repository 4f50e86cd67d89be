"""The thinker -> talker payload, and the talker input it produces, checked against
transformers' in-process Qwen3-Omni pipeline on the tiny model."""

from __future__ import annotations

import base64
import json

import pytest
import torch  # the runtime extra; `make test` installs it

from omni_runtime.payload import PayloadError, encode_states, parse

pytestmark = pytest.mark.runtime


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 1e-2), ("float16", 1e-3), ("float32", 0.0)])
def test_states_roundtrip(dtype, tol):
    x = torch.randn(7, 48)
    mm = encode_states(x, layer=18, dtype=dtype, audio_feature_lengths=[50])
    req = parse({"prompt_ids": [1, 2], "response_ids": [3], "mm": json.loads(json.dumps(mm))})
    y = req.mm.tensor().float()
    assert y.shape == (7, 48) and req.mm.layer == 18 and req.mm.audio_feature_lengths == [50]
    assert torch.allclose(x, y, atol=tol * 8, rtol=tol)
    # little-endian on the wire whatever the host
    raw = base64.b64decode(mm["data"])
    assert len(raw) == 7 * 48 * {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def test_parse_rejects_bad_structure():
    with pytest.raises(PayloadError, match="version"):
        parse({"v": 2, "prompt_ids": [1], "response_ids": [2]})
    with pytest.raises(PayloadError, match="negative"):
        parse({"prompt_ids": [-1], "response_ids": [2]})
    with pytest.raises(PayloadError, match="generation.max_codes must be an integer"):
        parse({"prompt_ids": [1], "response_ids": [2], "generation": {"max_codes": "many"}})
    with pytest.raises(PayloadError, match="mm.dtype"):
        parse({"prompt_ids": [1], "response_ids": [2], "mm": {"dtype": "int8", "shape": [1, 1], "data": ""}})


def payload_bytes(n_prompt: int, n_response: int, n_mm: int, hidden: int = 2048) -> int:
    """Size of a JSON payload with realistic token ids (6-digit ids) and bf16 states."""
    body = {"v": 1, "request_id": "chatcmpl-0123456789abcdef01234567", "speaker": "Ethan",
            "prompt_ids": [151644] * n_prompt, "response_ids": [151643] * n_response, "format": "pcm",
            "generation": {"max_codes": 4096}}
    if n_mm:
        body["mm"] = encode_states(torch.zeros(n_mm, hidden), 18, "bfloat16", audio_feature_lengths=[n_mm])
    return len(json.dumps(body).encode())


def test_payload_sizes_for_typical_requests():
    """Figures quoted in runtime/README.md (Qwen3-Omni-30B-A3B thinker hidden size 2048)."""
    text_only = payload_bytes(n_prompt=60, n_response=200, n_mm=0)
    audio_30s = payload_bytes(n_prompt=60 + 390, n_response=200, n_mm=390)  # AuT: 13 tokens per second of audio
    assert text_only < 4_000
    assert 2_000_000 < audio_30s < 2_300_000  # 390 x 2048 x 2 B = 1.6 MB raw, 4/3 for base64
    print(f"\npayload: text-only {text_only} B, 30 s audio input {audio_30s} B")


def _reference_talker_kwargs(model, input_ids, **extra):
    """Run transformers' Qwen3OmniMoeForConditionalGeneration.generate and capture the
    arguments it hands to the talker (then stop)."""
    captured = {}

    class Captured(Exception):
        pass

    def fake_generate(**kw):
        captured.update(kw)
        raise Captured

    model.talker.generate = fake_generate
    torch.manual_seed(0)
    with pytest.raises(Captured):
        model.generate(input_ids=input_ids, thinker_max_new_tokens=5, thinker_eos_token_id=-1, **extra)
    torch.manual_seed(0)
    out = model.thinker.generate(input_ids=input_ids, max_new_tokens=5, eos_token_id=-1, **extra)
    return captured, out[0, input_ids.shape[1]:].tolist()


KEYS = ("inputs_embeds", "trailing_text_hidden", "tts_pad_embed", "talker_input_ids")


def test_talker_inputs_match_in_process_pipeline_text(tiny_model):
    from transformers import AutoTokenizer, Qwen3OmniMoeForConditionalGeneration

    from omni_runtime.talker.engine import TalkerEngine

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok.apply_chat_template([{"role": "system", "content": "sys"}, {"role": "user", "content": "hello there"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ref, generated = _reference_talker_kwargs(model, torch.tensor([ids]))
    engine = TalkerEngine(str(tiny_model), device="cpu")
    # transformers speaks the text the thinker fed back (all but the last generated
    # token); a payload that ends with <|im_end|> there gives the same talker input
    for response in (generated[:-1], generated[:-1] + [tok.convert_tokens_to_ids("<|im_end|>"), 5, 6]):
        mine = engine.build_inputs(parse({"prompt_ids": ids, "response_ids": response}))
        for k in KEYS:
            assert mine[k].shape == ref[k].shape, k
            assert torch.allclose(mine[k].float(), ref[k].float(), atol=1e-6), k


def test_talker_inputs_match_in_process_pipeline_audio(tiny_model):
    """Audio input: the thinker engine's layer-`accept_hidden_layer` states, shipped as a
    payload, rebuild the talker input transformers builds in one process."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from omni_runtime.talker.engine import TalkerEngine
    from omni_runtime.thinker.transformers_server import ThinkerEngine

    from .helpers import b64, sine_wav

    thinker = ThinkerEngine(str(tiny_model))
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": b64(sine_wav(0.6)), "format": "wav"}},
        {"type": "text", "text": "what is it?"}]}]
    prep = thinker.prepare(messages)
    result = thinker.generate(prep, {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0}, lambda t: None, True)
    mm = result["mm_states"]
    n_audio = sum(1 for t in prep["ids"] if t == thinker.audio_token_id)
    assert mm["shape"] == [n_audio, 32] and n_audio > 0

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_model).eval()
    ids = torch.tensor([prep["ids"]])
    ref, generated = _reference_talker_kwargs(model, ids, **prep["inputs"])
    engine = TalkerEngine(str(tiny_model), device="cpu")
    payload = parse({"prompt_ids": prep["ids"], "response_ids": generated[:-1],
                     "mm": {**mm, "dtype": "float32"} if mm["dtype"] == "float32" else mm})
    mine = engine.build_inputs(payload)
    for k in KEYS:
        assert mine[k].shape == ref[k].shape, k
        assert torch.allclose(mine[k].float(), ref[k].float(), atol=1e-5), k
    assert torch.equal(mine["audio_feature_lengths"], ref["audio_feature_lengths"])
