"""Speech for multimodal input across processes: the transformers thinker publishes the
layer-`accept_hidden_layer` states of a request on its metrics port
(`GET /v1/omni/mm-states/<X-Request-Id>`), the gateway fetches them from the endpoint that
served the request and hands them to the talker. A recording proxy in front of the talker
shows what the talker received; the states are checked against a forward pass of the
same checkpoint in this process."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import aiohttp
import pytest
import torch
from aiohttp import web

from e2e.procs import free_port
from omni_runtime.audio import parse_wav_header
from omni_runtime.payload import parse

from .helpers import b64, post_stream, run, sine_wav, sse_events

pytestmark = pytest.mark.runtime

CLIP = sine_wav(0.5)
AUDIO_PART = {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + b64(CLIP)}}
QUESTION = {"type": "text", "text": "What is this sound?"}
GENERATION = {"max_codes": 12, "min_codes": 12, "seed": 3}


class TalkerTap:
    """A forwarding proxy in front of a talker that keeps every payload it passes on."""

    def __init__(self, target: str):
        self.target = target
        self.port = free_port()
        self.payloads: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        assert ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        ready.set()
        self.loop.run_forever()

    async def _start(self):
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/talker/synthesize", self._forward)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _forward(self, request):
        raw = await request.read()
        # a streamed hand-off (ndjson): its head line is the payload with the ids known by then
        self.payloads.append(raw.split(b"\n", 1)[0] + b"\n" if request.content_type == "application/x-ndjson" else raw)
        async with aiohttp.ClientSession() as s:
            async with s.post(self.target + "/v1/talker/synthesize", data=raw,
                              headers={"Content-Type": request.content_type}) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.startswith("X-Omni-") or k == "Content-Type"})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def stack(tiny_model, module_spawn):
    common = {"OMNI_MODEL": str(tiny_model), "OMNI_DEVICE": "cpu", "OMNI_SERVED_MODEL_NAME": "qwen3-omni-tiny"}
    thinker = module_spawn("thinker", {**common, "OMNI_ROLE": "thinker"}, args=("--engine", "transformers"))
    talker = module_spawn("talker", common)
    tap = TalkerTap(talker.url)
    gen = json.dumps(GENERATION)

    def gateway(thinker_metrics_port: int, **extra):
        return module_spawn("gateway", {
            **common, "OMNI_TALKER_GENERATION": gen, "OMNI_SCRAPE_SECONDS": "0",
            "OMNI_THINKER_SERVICE": f"127.0.0.1:{thinker.port}|{thinker_metrics_port}",
            "OMNI_TALKER_SERVICE": f"127.0.0.1:{tap.port}|{talker.metrics_port}", **extra})

    gateways = {
        "ok": gateway(thinker.metrics_port),
        # the thinker "serves" its states on a port where nothing ever publishes them (the
        # talker's metrics port answers 404 for the path), or has no metrics port at all
        "lost": gateway(talker.metrics_port, OMNI_MM_STATES_WAIT_SECONDS="0.5"),
        "no_port": gateway(0),
    }
    for p in (thinker, talker, *gateways.values()):
        p.wait_ready()
    yield {"thinker": thinker, "talker": talker, "tap": tap, **gateways}
    tap.close()


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The prompt and the layer-`accept_hidden_layer` rows at its audio positions, computed
    here with transformers on the same checkpoint and input."""
    from omni_runtime.thinker.transformers_server import ThinkerEngine

    engine = ThinkerEngine(str(tiny_model))
    prep = engine.prepare([{"role": "user", "content": [AUDIO_PART, QUESTION]}])
    layer = engine.config.talker_config.accept_hidden_layer
    ids = torch.tensor([prep["ids"]])
    with torch.inference_mode():
        out = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                           **prep["inputs"])
    positions = [i for i, t in enumerate(prep["ids"]) if t == engine.audio_token_id]
    return {"ids": prep["ids"], "layer": layer, "states": out.hidden_states[layer][0, positions].float(),
            "audio_feature_lengths": prep["audio_feature_lengths"]}


def states_of(mm: dict) -> torch.Tensor:
    return parse({"prompt_ids": [1], "response_ids": [1], "mm": mm}).mm.tensor().float()


def speech(content, stream=False) -> dict:
    return {"model": "qwen3-omni-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 5,
            "temperature": 0, "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "wav"},
            "stream": stream}


def get(url: str) -> tuple[int, dict]:
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                return r.status, await r.json()
    return run(go())


def test_thinker_publishes_states_once_before_its_first_token(stack, reference):
    thinker = stack["thinker"]
    states_url = f"http://127.0.0.1:{thinker.metrics_port}/v1/omni/mm-states/"
    body = {"model": "m", "messages": [{"role": "user", "content": [AUDIO_PART, QUESTION]}], "max_tokens": 4,
            "stream": True, "temperature": 0}

    async def go():
        seen = {}
        async with aiohttp.ClientSession() as s:
            async with s.post(thinker.url + "/v1/chat/completions", json=body,
                              headers={"X-Request-Id": "probe-1"}) as r:
                assert r.status == 200
                buf = b""
                async for chunk in r.content.iter_any():
                    buf += chunk
                    events = sse_events(buf.rsplit(b"\n\n", 1)[0]) if b"\n\n" in buf else []
                    tokens = [e for e in events
                              if e != "[DONE]" and (e["choices"] or [{}])[0].get("delta", {}).get("content")]
                    if tokens and "first" not in seen:
                        # states are out before the first token is: no retry needed here
                        async with s.get(states_url + "probe-1") as g:
                            seen["first"] = (g.status, await g.json())
                        seen["id"] = events[0]["id"]
            async with s.get(states_url + "probe-1") as g:
                seen["again"] = g.status
        return seen

    seen = run(go())
    assert seen["id"] == "chatcmpl-probe-1"  # the id vLLM would give it too
    status, mm = seen["first"]
    assert status == 200, mm
    assert seen["again"] == 404, "states are served once"
    assert mm["layer"] == reference["layer"] and mm["dtype"] == "float32"
    assert mm["shape"] == list(reference["states"].shape) and mm["shape"][0] == 7
    assert mm["audio_feature_lengths"] == reference["audio_feature_lengths"]
    assert torch.allclose(states_of(mm), reference["states"], atol=1e-5, rtol=1e-5)


def test_thinker_states_endpoint_edges(stack):
    thinker = stack["thinker"]
    base = f"http://127.0.0.1:{thinker.metrics_port}/v1/omni/mm-states/"
    # a text-only prompt has no multimodal states: nothing is published for it
    status, _, raw, _ = run(post_stream(thinker.url + "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"X-Request-Id": "text-only-1"}))
    assert status == 200 and json.loads(raw)["id"] == "chatcmpl-text-only-1"
    assert get(base + "text-only-1")[0] == 404
    status, body = get(base + "never-sent")
    assert status == 404 and "no multimodal states" in body["error"] and not body.get("final")
    assert get(base + "bad_id")[0] == 400
    status, _, raw, _ = run(post_stream(thinker.url + "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}, headers={"X-Request-Id": "../etc"}))
    assert status == 400 and "X-Request-Id" in json.loads(raw)["error"]["message"]


def test_thinker_states_endpoint_holds_a_reader_until_published(stack):
    """`?wait=` holds the GET until the states are there: a reader that asks before the
    request is even sent gets them in one answer, and an unknown id is answered 404 once the
    wait is over (never earlier)."""
    thinker = stack["thinker"]
    base = f"http://127.0.0.1:{thinker.metrics_port}/v1/omni/mm-states/"
    body = {"model": "m", "messages": [{"role": "user", "content": [AUDIO_PART, QUESTION]}], "max_tokens": 2}

    async def go():
        async with aiohttp.ClientSession() as s:
            async def held():
                async with s.get(base + "held-1", params={"wait": "2"}) as g:
                    return g.status, await g.json()

            reader = asyncio.ensure_future(held())
            await asyncio.sleep(0.2)  # the reader is waiting before the request exists
            assert not reader.done()
            async with s.post(thinker.url + "/v1/chat/completions", json=body,
                              headers={"X-Request-Id": "held-1"}) as r:
                assert r.status == 200
                await r.read()
            return await reader

    status, mm = run(go())
    assert status == 200, mm
    assert mm["dtype"] == "float32" and mm["shape"][0] == 7
    started = time.monotonic()
    status, body = get(base + "never-sent-2?wait=0.3")
    assert status == 404 and "no multimodal states" in body["error"]
    assert time.monotonic() - started >= 0.3
    assert get(base + "held-1?wait=nan")[0] == 400
    status, body = get(base + "held-1?wait=soon")
    assert status == 400 and "wait must be a number of seconds" in body["error"]


def test_speech_for_audio_input_end_to_end(stack, reference):
    """audio in -> thinker -> gateway fetches the states -> talker -> WAV out; the talker got
    the states the thinker computed."""
    gw, tap = stack["ok"], stack["tap"]
    before = len(tap.payloads)
    status, _, raw, _ = run(post_stream(gw.url + "/v1/chat/completions", speech([AUDIO_PART, QUESTION])))
    assert status == 200, raw[:400]
    audio = json.loads(raw)["choices"][0]["message"]["audio"]
    wav = base64.b64decode(audio["data"])
    hdr = parse_wav_header(wav)
    assert hdr["sample_rate"] == 24000 and hdr["data_size"] == len(wav) - 44
    assert hdr["data_size"] // 2 > 0.8 * 12 * 1920  # 12 codes of 1920 samples, less the decoder's edges

    assert len(tap.payloads) == before + 1
    payload_bytes = len(tap.payloads[-1])
    payload = json.loads(tap.payloads[-1])
    assert payload["prompt_ids"] == reference["ids"]
    mm = payload["mm"]
    assert mm["layer"] == reference["layer"] and mm["audio_feature_lengths"] == reference["audio_feature_lengths"]
    assert torch.allclose(states_of(mm), reference["states"], atol=1e-5, rtol=1e-5)

    # bytes moved: the mm object once from the thinker, then inside the talker payload
    m = gw.metrics()
    rows, hidden = mm["shape"]
    raw_bytes = rows * hidden * 4  # float32 on CPU
    assert len(mm["data"]) == 4 * -(-raw_bytes // 3)
    assert len(mm["data"]) < m["omni_gateway_mm_states_bytes_total"] < len(mm["data"]) + 400
    assert m["omni_gateway_talker_payload_bytes_sum"] == payload_bytes
    print(f"\ntiny model, 0.5 s audio: {rows} x {hidden} states, {raw_bytes} B raw, "
          f"{int(m['omni_gateway_mm_states_bytes_total'])} B fetched from the thinker, "
          f"{payload_bytes} B posted to the talker")

    status, _, raw, _ = run(post_stream(gw.url + "/v1/chat/completions", speech([AUDIO_PART, QUESTION], stream=True)))
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert not any("error" in e for e in events[:-1]), events[-2]
    pcm = b"".join(base64.b64decode(e["choices"][0]["delta"]["audio"]["data"]) for e in events[:-1]
                   if "data" in e["choices"][0]["delta"].get("audio", {}))
    assert len(pcm) == hdr["data_size"]  # same states, same seed: as much audio as without streaming
    assert torch.allclose(states_of(json.loads(tap.payloads[-1])["mm"]), reference["states"], atol=1e-5, rtol=1e-5)


def test_states_that_never_appear_end_in_502_naming_the_thinker(stack):
    thinker, tap = stack["thinker"], stack["tap"]
    before = len(tap.payloads)
    status, _, raw, _ = run(post_stream(stack["lost"].url + "/v1/chat/completions", speech([AUDIO_PART, QUESTION])))
    assert status == 502, raw[:300]
    msg = json.loads(raw)["error"]["message"]
    assert f"thinker http://127.0.0.1:{thinker.port}" in msg and "/v1/omni/mm-states/" in msg, msg
    assert "within 0.5 s" in msg and "404" in msg, msg

    status, _, raw, _ = run(post_stream(stack["lost"].url + "/v1/chat/completions",
                                        speech([AUDIO_PART, QUESTION], stream=True)))
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["code"] == 502 and f"thinker http://127.0.0.1:{thinker.port}" in err["message"]

    status, _, raw, _ = run(post_stream(stack["no_port"].url + "/v1/chat/completions", speech([AUDIO_PART])))
    assert status == 502 and "has no metrics port configured" in json.loads(raw)["error"]["message"]
    assert len(tap.payloads) == before, "no payload without the states reached the talker"

    # text-only input needs no states: the same gateway speaks it
    status, _, raw, _ = run(post_stream(stack["lost"].url + "/v1/chat/completions", speech([QUESTION])))
    assert status == 200, raw[:300]
    assert json.loads(tap.payloads[-1])["mm"] is None
