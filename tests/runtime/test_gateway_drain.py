"""SIGTERM in real processes: the gateway serves through its shutdown delay, then refuses new
requests while in-flight streams finish; a terminating thinker or talker behind a gateway loses
no request, since it refuses new work with a 503 the gateway fails over on. The same stops on a
cluster, under load, are tests/runtime/test_failure_drills.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp
import pytest

from e2e.procs import free_port

from .helpers import answered, run, sse_events, text_payload

pytestmark = pytest.mark.runtime

DELAY = 1.5  # OMNI_SHUTDOWN_DELAY_SECONDS of the gateways here


def common(model) -> dict:
    return {"OMNI_MODEL": str(model), "OMNI_DEVICE": "cpu", "OMNI_SERVED_MODEL_NAME": "tiny",
            "OMNI_DRAIN_SECONDS": "60"}


def endpoints(*procs) -> str:
    return ",".join(f"127.0.0.1:{p.port}|{p.metrics_port}" for p in procs)


def chat(max_tokens: int = 4, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}


@pytest.fixture(scope="module")
def replicas(tiny_model, module_spawn):
    """Two thinkers and two talkers (a transformers thinker answers one request at a time: a
    request sent while another streams goes to the other thinker). The last test stops the a's."""
    procs = {f"{role}_{x}": module_spawn(role, {**common(tiny_model), "OMNI_MAX_INFLIGHT": "4"},
                                         args=("--engine", "transformers") if role == "thinker" else ())
             for role in ("thinker", "talker") for x in "ab"}
    for p in procs.values():
        p.wait_ready(300)
    return procs


async def _post(session, url, body, **kw):
    async with session.post(url + "/v1/chat/completions", json=body, **kw) as r:
        return r.status, dict(r.headers), await r.read()


def test_the_gateway_serves_through_its_shutdown_delay_then_refuses_while_in_flight_streams_finish(
        tiny_model, replicas, spawn):
    gateway = spawn("gateway", {**common(tiny_model),
                                "OMNI_THINKER_SERVICE": endpoints(replicas["thinker_a"], replicas["thinker_b"]),
                                "OMNI_SHUTDOWN_DELAY_SECONDS": str(DELAY)}).wait_ready()

    async def scenario():
        out = {}
        async with aiohttp.ClientSession() as s:
            stream = await s.post(gateway.url + "/v1/chat/completions",
                                  json=chat(800, ignore_eos=True, stream=True))
            assert stream.status == 200
            head = await stream.content.readany()  # the stream has started
            gateway.terminate()
            sigterm = time.monotonic()
            await asyncio.sleep(0.2)
            async with s.get(gateway.url + "/health") as h:
                out["health"] = h.status
            # within the delay: a new request on a new connection is served in full, and told to reconnect
            async with aiohttp.ClientSession() as fresh:
                out["window"] = await _post(fresh, gateway.url, chat())
            await asyncio.sleep(max(0.0, sigterm + DELAY + 0.3 - time.monotonic()))
            async with aiohttp.ClientSession() as fresh:
                out["after"] = await _post(fresh, gateway.url, chat())
            out["running_then"] = gateway.metrics()["omni_requests_running"]
            out["stream"] = head + await stream.read()
        return out

    out = run(scenario())
    assert out["health"] == 503
    status, headers, body = out["window"]
    assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    assert headers.get("Connection", "").lower() == "close"
    status, headers, body = out["after"]
    assert status == 503 and headers["Retry-After"] == "1" and headers.get("Connection", "").lower() == "close"
    assert "shutting down" in json.loads(body)["error"]["message"]
    assert out["running_then"] == 1, "the stream was still in flight when new requests were refused"
    events = sse_events(out["stream"])
    # finished whole: all of max_tokens (ignore_eos) and the end of the stream
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert gateway.popen.wait(timeout=60) == 0


def test_a_request_held_for_a_replica_gets_a_retryable_503_at_the_drain_deadline(tiny_model, spawn):
    nobody = free_port()  # no thinker: the request is held
    gateway = spawn("gateway", {**common(tiny_model), "OMNI_THINKER_SERVICE": f"127.0.0.1:{nobody}|{free_port()}",
                                "OMNI_SHUTDOWN_DELAY_SECONDS": "0.5", "OMNI_DRAIN_SECONDS": "1.5"}).wait_ready()

    async def scenario():
        async with aiohttp.ClientSession() as s:
            held = asyncio.ensure_future(_post(s, gateway.url, chat()))
            await asyncio.sleep(1.0)
            assert gateway.metrics()["omni_gateway_waiting_requests"] == 1
            gateway.terminate()
            began = time.monotonic()
            result = await held
            return result, time.monotonic() - began

    (status, headers, body), took = run(scenario())
    assert status == 503 and headers["Retry-After"] == "1", body
    assert "drain deadline" in json.loads(body)["error"]["message"]
    assert 1.5 <= took < 6, "held until the deadline (delay + drain seconds), then answered"
    assert gateway.popen.wait(timeout=30) == 0


def test_a_request_whose_thinker_is_killed_before_it_answered_is_answered_by_another(tiny_model, replicas, spawn):
    """A thinker sends a whole (non-streamed) answer at the end: killed while generating it, it has
    sent nothing, so the gateway takes the broken connection as any refused one and retries the
    request on the other replica."""
    victim = spawn("thinker", common(tiny_model), args=("--engine", "transformers")).wait_ready(300)
    gateway = spawn("gateway", {**common(tiny_model),
                                "OMNI_THINKER_SERVICE": endpoints(victim, replicas["thinker_b"])}).wait_ready()

    async def scenario():
        async with aiohttp.ClientSession() as s:
            answer = asyncio.ensure_future(_post(s, gateway.url, chat(300, ignore_eos=True)))
            while victim.metrics()["omni_requests_running"] < 1:  # both idle: the first listed takes it
                assert not answer.done(), await answer
                await asyncio.sleep(0.05)
            victim.popen.kill()  # as the OOM killer would
            return await asyncio.wait_for(answer, 120)

    status, _, body = run(scenario())
    assert status == 200, body
    reply = json.loads(body)
    assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 300


def test_a_streamed_speech_answer_whose_talker_is_killed_before_its_first_audio_is_spoken_by_another(
        tiny_model, replicas, spawn):
    """A talker sends its response head with its first audio: killed before that (here it holds
    its first chunk for 200 codes), it has sent nothing, so the gateway replays the talker body
    (the ids so far, then the rest as they come) to the other replica and the client hears a
    whole answer, with no error event."""
    codes = 240
    victim = spawn("talker", {**common(tiny_model), "OMNI_TALKER_FIRST_CHUNK_CODES": "200"}).wait_ready(300)
    gateway = spawn("gateway", {
        **common(tiny_model), "OMNI_SCRAPE_SECONDS": "0", "OMNI_THINKER_SERVICE": endpoints(replicas["thinker_b"]),
        "OMNI_TALKER_SERVICE": endpoints(victim, replicas["talker_b"]),  # the first listed is tried first
        "OMNI_TALKER_GENERATION": json.dumps({"max_codes": codes, "min_codes": codes, "seed": 5})}).wait_ready()
    spoken_by_b = answered(replicas["talker_b"], 200)

    async def scenario():
        async with aiohttp.ClientSession() as s:
            answer = asyncio.ensure_future(_post(s, gateway.url, chat(
                8, stream=True, modalities=["text", "audio"], audio={"voice": "Ethan", "format": "pcm16"})))
            while victim.metrics()["omni_requests_running"] < 1:
                assert not answer.done(), await answer
                await asyncio.sleep(0.05)
            assert victim.metrics().get("omni_talker_time_to_first_audio_seconds_count", 0) == 0
            victim.popen.kill()
            return await asyncio.wait_for(answer, 120)

    status, _, body = run(scenario())
    events = sse_events(body)
    assert status == 200 and events[-1] == "[DONE]", body[-500:]
    assert not any("error" in e for e in events[:-1]), [e for e in events[:-1] if "error" in e]
    pcm = b"".join(base64.b64decode(e["choices"][0]["delta"]["audio"]["data"]) for e in events[:-1]
                   if e.get("choices") and "data" in e["choices"][0]["delta"].get("audio", {}))
    assert len(pcm) // 2 > 0.8 * codes * 1920, "the other talker spoke the whole answer"
    assert answered(replicas["talker_b"], 200) == spoken_by_b + 1


def test_a_terminating_thinker_or_talker_behind_a_gateway_loses_no_request(tiny_model, replicas, spawn):
    """(Last in the module: it stops thinker_a and talker_a.) The worst case of a stale endpoint list: the gateway keeps both replicas configured, and with
    scraping off it tries the stopping one first. Its 503, then its refused connection, move each
    request to the other replica; what the stopping one holds finishes."""
    thinker_a, thinker_b, talker_a, talker_b = (replicas[k] for k in ("thinker_a", "thinker_b", "talker_a", "talker_b"))
    gateway = spawn("gateway", {
        **common(tiny_model), "OMNI_SCRAPE_SECONDS": "0",
        "OMNI_THINKER_SERVICE": endpoints(thinker_a, thinker_b), "OMNI_TALKER_SERVICE": endpoints(talker_a, talker_b),
        "OMNI_TALKER_GENERATION": json.dumps({"max_codes": 8})}).wait_ready()
    speech = chat(modalities=["text", "audio"], audio={"voice": "Ethan", "format": "wav"})

    async def stop_one(stopping, long_path, long_body, body):
        async with aiohttp.ClientSession() as s:
            held = await s.post(stopping.url + long_path, json=long_body)  # in flight on the stopping replica
            assert held.status == 200
            first = await held.content.readany()
            stopping.terminate()
            await asyncio.sleep(0.2)
            statuses = [(await _post(s, gateway.url, body))[0] for _ in range(4)]
            refused = answered(stopping, 503)
            rest = await held.read()
            return statuses, refused, first + rest

    statuses, refused, body = run(stop_one(thinker_a, "/v1/chat/completions",
                                           chat(400, ignore_eos=True, stream=True), chat()))
    assert statuses == [200] * 4 and refused >= 1, (statuses, refused)
    events = sse_events(body)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert thinker_a.popen.wait(timeout=60) == 0

    statuses, refused, body = run(stop_one(talker_a, "/v1/talker/synthesize", text_payload(tiny_model, codes=120),
                                           speech))
    assert statuses == [200] * 4 and refused >= 1, (statuses, refused)
    assert len(body) > 44 + 2 * 0.8 * 120 * 1920, "the synthesis in flight finished whole"
    assert talker_a.popen.wait(timeout=60) == 0
