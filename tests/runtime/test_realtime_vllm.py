"""A realtime session over the REAL vLLM thinker (vLLM's CPU build, .venv-vllm), a real talker
and gateway, driven by the OpenAI SDK's realtime client with espeak-ng speech: every turn sends
the whole conversation to the same replica, whose prefix cache serves the earlier turns
(`vllm:prefix_cache_hits_total`), and the talker still gets the thinker's states for the
earlier turn's audio, which vLLM did not compute again."""

from __future__ import annotations

import base64
import json

import pytest

from e2e.speech import espeak_pcm16, silence

from .helpers import run
from .vllm_procs import SERVED, start_speech_stack

pytestmark = pytest.mark.vllm

BLOCK = 128  # tokens per KV block of vLLM's CPU backend: the prefix cache reuses whole blocks
SPEECH_GEN = {"max_codes": 12, "min_codes": 12, "seed": 3}


@pytest.fixture(scope="module")
def stack(vllm_thinkers, tiny_model, module_spawn):
    thinker = vllm_thinkers.get("shared", max_num_seqs=2)  # the same thinker test_vllm_thinker.py uses
    stack = {"thinker": thinker, **start_speech_stack(thinker, tiny_model, module_spawn, SPEECH_GEN)}
    yield stack
    stack["tap"].close()


def test_turns_reuse_the_thinkers_prefix_cache_and_speak_every_turn(stack, tiny_model):
    from openai import AsyncOpenAI

    thinker, gw, tap = stack["thinker"], stack["gw"], stack["tap"]
    audio_token = json.loads((tiny_model / "config.json").read_text())["thinker_config"]["audio_token_id"]
    # turn 1's audio is long enough to fill the first KV block, so turn 2 finds it in the cache
    long_turn = espeak_pcm16("What is the weather like today in the mountains, and will it rain tomorrow "
                             "afternoon when we walk to the lake? We would like to leave early in the morning "
                             "and come back before the evening, so please tell us when the sun sets.")
    short_turn = espeak_pcm16("And what about the weekend?")

    async def go():
        client = AsyncOpenAI(api_key="unused", base_url=gw.url + "/v1")
        turns = []
        async with client.realtime.connect(model=SERVED) as conn:
            await conn.session.update(session={"type": "realtime", "instructions": "Answer briefly.",
                                               "audio": {"input": {"turn_detection": None}}})
            for pcm in (long_turn, short_turn):
                hits = thinker.vllm_metrics().get("vllm:prefix_cache_hits_total", 0.0)
                for i in range(0, len(pcm), 4800):
                    await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + 4800]).decode())
                await conn.input_audio_buffer.append(audio=base64.b64encode(silence(0.2)).decode())
                await conn.input_audio_buffer.commit()
                await conn.response.create(response={"max_output_tokens": 4})
                events = []
                while True:
                    ev = await conn.recv()
                    events.append(ev)
                    assert ev.type != "error", ev
                    if ev.type == "response.done":
                        break
                turns.append({"done": ev.response, "events": events, "payload": json.loads(tap.payloads[-1]),
                              "hits": thinker.vllm_metrics()["vllm:prefix_cache_hits_total"] - hits})
        return turns

    first, second = run(go())
    for turn in (first, second):
        assert turn["done"].status in ("completed", "incomplete")
        audio = b"".join(base64.b64decode(e.delta) for e in turn["events"] if e.type == "response.output_audio.delta")
        assert len(audio) > 0.8 * 12 * 1920 * 2, "the turn was spoken"
        # the talker got one state row for every audio token of the conversation so far
        payload = turn["payload"]
        assert payload["mm"]["shape"][0] == payload["prompt_ids"].count(audio_token) > 0
    prompt1 = first["payload"]["prompt_ids"]
    prompt2 = second["payload"]["prompt_ids"]
    assert prompt2[:len(prompt1)] == prompt1, "turn 2's prompt starts with all of turn 1's"
    assert prompt2.count(audio_token) > prompt1.count(audio_token) >= BLOCK // 2
    # turn 1's prompt filled at least one whole block, which turn 2 found in the cache
    assert len(prompt1) >= BLOCK
    assert second["hits"] >= BLOCK * (len(prompt1) // BLOCK), (second["hits"], len(prompt1))
    assert second["done"].usage.input_tokens == len(prompt2)
