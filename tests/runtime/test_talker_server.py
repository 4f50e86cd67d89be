"""The talker speech server as a real process on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from omni_runtime.audio import parse_wav_header

from .helpers import b64, post_stream, run, text_payload

pytestmark = pytest.mark.runtime


def talker_env(model, **kw):
    env = {"OMNI_ROLE": "talker", "OMNI_MODEL": str(model), "OMNI_DEVICE": "cpu", "OMNI_MAX_INFLIGHT": "1",
           "OMNI_MAX_QUEUE": "1", "OMNI_DRAIN_SECONDS": "30"}
    env.update({k: str(v) for k, v in kw.items()})
    return env


def test_streams_valid_wav_and_pcm(tiny_model, spawn):
    talker = spawn("talker", talker_env(tiny_model)).wait_ready()
    url = talker.url + "/v1/talker/synthesize"
    status, headers, body, nchunks = run(post_stream(url, text_payload(tiny_model, codes=30)))
    assert status == 200, body[:300]
    assert headers["Content-Type"] == "audio/wav"
    hdr = parse_wav_header(body)
    assert hdr["sample_rate"] == 24000 == int(headers["X-Omni-Sample-Rate"])
    assert hdr["channels"] == 1 and hdr["bits"] == 16 and hdr["format_tag"] == 1
    pcm = body[hdr["data_offset"]:]
    assert len(pcm) % 2 == 0
    samples = len(pcm) // 2
    # 30 codes at 1920 samples per code, less what each causal chunk drops at its edge
    assert 0.8 * 30 * 1920 < samples <= 30 * 1920
    assert nchunks >= 2, "audio must be streamed in several packets, not at the end"
    assert any(pcm[i:i + 2] != b"\x00\x00" for i in range(0, len(pcm), 2)), "silence only"

    status, headers, raw, _ = run(post_stream(url, text_payload(tiny_model, codes=12, fmt="pcm")))
    assert status == 200 and headers["Content-Type"] == "audio/pcm"
    assert headers["X-Omni-Sample-Format"] == "s16le" and raw[:4] != b"RIFF"
    assert 0.7 * 12 * 1920 < len(raw) // 2 <= 12 * 1920

    info = run(_get_json(talker.url + "/v1/talker/info"))
    assert info["sample_rate"] == 24000 and "ethan" in info["speakers"] and info["codes_per_second"] == 12.5

    # The client can read the end of the stream a moment before the handler's bookkeeping runs.
    deadline = time.monotonic() + 5
    while (m := talker.metrics())["omni_requests_running"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m["omni_talker_time_to_first_audio_seconds_count"] == 2
    assert m["omni_talker_real_time_factor_count"] == 2
    assert m["omni_queue_depth"] == 0 and m["omni_requests_running"] == 0


async def _get_json(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.json()


@pytest.fixture(scope="module")
def shared_talker(tiny_model, module_spawn):
    return module_spawn("talker", talker_env(tiny_model)).wait_ready()


@pytest.mark.parametrize("mutate, needle", [
    (lambda p: "{not json", "bad talker payload"),
    (lambda p: {**p, "prompt_ids": "hello"}, "prompt_ids must be a list"),
    (lambda p: {**p, "response_ids": []}, "nothing to speak"),
    (lambda p: {**p, "speaker": "Nobody"}, "unknown speaker"),
    (lambda p: {**p, "format": "mp3"}, "format must be one of"),
    (lambda p: {**p, "generation": {"beam_width": 3}}, "unknown generation option"),
    (lambda p: {**p, "mm": {"dtype": "bfloat16", "shape": [1, 32], "data": "!!notbase64"}}, "not valid base64"),
    (lambda p: {**p, "mm": {"dtype": "bfloat16", "shape": [2, 32], "data": "AAAA"}}, "needs 128"),
    (lambda p: {**p, "mm": {"dtype": "float32", "shape": [1, 32], "data": b64(bytes(128))}}, "multimodal tokens"),
    (lambda p: {**p, "prompt_ids": p["prompt_ids"][:-3]}, "assistant"),
    (lambda p: {**p, "prompt_ids": [10 ** 6]}, "out of range"),
])
def test_bad_payloads_answer_400(shared_talker, tiny_model, mutate, needle):
    talker = shared_talker
    body = mutate(text_payload(tiny_model, codes=4))
    status, _, raw, _ = run(post_stream(talker.url + "/v1/talker/synthesize", body))
    assert status == 400, raw[:300]
    assert needle in json.loads(raw)["error"]["message"]


def test_queue_depth_metrics_and_429(tiny_model, spawn):
    talker = spawn("talker", talker_env(tiny_model, OMNI_MAX_INFLIGHT=1, OMNI_MAX_QUEUE=1)).wait_ready()
    url = talker.url + "/v1/talker/synthesize"
    seen = {"max_queue": 0, "max_running": 0}

    async def watch(stop):
        while not stop.is_set():
            m = await asyncio.get_running_loop().run_in_executor(None, talker.metrics)
            seen["max_queue"] = max(seen["max_queue"], m["omni_queue_depth"])
            seen["max_running"] = max(seen["max_running"], m["omni_requests_running"])
            await asyncio.sleep(0.05)

    async def until(pred, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = await asyncio.get_running_loop().run_in_executor(None, talker.metrics)
            if pred(m):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("metrics never reached the expected state")

    async def scenario():
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(watch(stop))
        first = asyncio.ensure_future(post_stream(url, text_payload(tiny_model, codes=160)))
        await until(lambda m: m["omni_requests_running"] == 1)
        second = asyncio.ensure_future(post_stream(url, text_payload(tiny_model, codes=10)))
        await until(lambda m: m["omni_queue_depth"] == 1)
        third = await post_stream(url, text_payload(tiny_model, codes=10))
        results = [await first, await second]
        stop.set()
        await watcher
        return results, third

    (r1, r2), r3 = run(scenario())
    assert r1[0] == 200 and r2[0] == 200
    assert r3[0] == 429 and int(r3[1]["Retry-After"]) >= 1
    assert seen["max_queue"] == 1 and seen["max_running"] == 1
    m = talker.metrics()
    assert m["omni_queue_depth"] == 0 and m["omni_requests_running"] == 0
    assert 'code="429"' in talker.metrics_text()


def test_sigterm_drains_in_flight_and_refuses_new(tiny_model, spawn):
    talker = spawn("talker", talker_env(tiny_model, OMNI_MAX_INFLIGHT=1, OMNI_DRAIN_SECONDS=60)).wait_ready()
    url = talker.url + "/v1/talker/synthesize"

    async def scenario():
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=text_payload(tiny_model, codes=150)) as r:
                assert r.status == 200
                got = await r.content.read(64)  # the stream has started
                talker.terminate()
                await asyncio.sleep(0.3)
                async with aiohttp.ClientSession() as s2:
                    async with s2.get(talker.url + "/health") as h:
                        health = h.status
                    async with s2.post(url, json=text_payload(tiny_model, codes=4)) as r2:
                        refused = r2.status
                rest = await r.read()
                return got + rest, health, refused

    body, health, refused = run(scenario())
    assert health == 503 and refused == 503
    hdr = parse_wav_header(body)
    samples = (len(body) - hdr["data_offset"]) // 2
    assert samples > 0.8 * 150 * 1920, "the in-flight stream must complete"
    assert talker.popen.wait(timeout=30) == 0
    assert "SIGTERM: draining" in talker.log_text()


def _ndjson_body(head: dict, ids: list[int], end: bool = True, pause: float = 0.0, hold=None):
    """The streaming hand-off's body: the head, one line per id (`pause` apart), the end line.
    `hold` (an asyncio.Event) is awaited before the body ends."""

    async def body():
        yield (json.dumps(head) + "\n").encode()
        for tok in ids:
            await asyncio.sleep(pause)
            yield (json.dumps({"ids": [tok]}) + "\n").encode()
        if hold is not None:
            await hold.wait()
        if end:
            yield b'{"end": true}\n'

    return body()


async def _post_ndjson(url, body):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async with s.post(url, data=body, headers={"Content-Type": "application/x-ndjson"}) as r:
            return r.status, await r.read()


def test_streamed_text_gives_the_same_audio_as_the_whole_payload(shared_talker, tiny_model):
    url = shared_talker.url + "/v1/talker/synthesize"
    whole = text_payload(tiny_model, codes=30, fmt="pcm", response_ids=list(range(40, 60)))
    status, _, expected, _ = run(post_stream(url, whole))
    assert status == 200 and expected
    head = {**whole, "response_ids": whole["response_ids"][:1]}
    status, got = run(_post_ndjson(url, _ndjson_body(head, whole["response_ids"][1:], pause=0.03)))
    assert status == 200
    assert got == expected, "a seeded synthesis must not depend on how its text arrived"


def test_text_stream_that_ends_without_end_line(shared_talker, tiny_model):
    url = shared_talker.url + "/v1/talker/synthesize"
    # before any audio: a clear 400
    head = text_payload(tiny_model, codes=30, fmt="pcm", response_ids=[40])
    status, raw = run(_post_ndjson(url, _ndjson_body(head, [41, 42], end=False)))
    assert status == 400 and b"without" in raw

    # after audio started: the connection is cut, so the answer cannot pass for a finished one
    async def cut():
        hold = asyncio.Event()
        body = _ndjson_body({**head, "response_ids": list(range(40, 52))}, [], end=False, hold=hold)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async with s.post(url, data=body, headers={"Content-Type": "application/x-ndjson"}) as r:
                assert r.status == 200
                first = await r.content.readany()
                assert first, "audio starts before the text is complete"
                hold.set()
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()

    run(cut())
    assert run(_post_ndjson(url, _ndjson_body(head, [], end=True)))[0] == 200, "the talker keeps serving"


def test_concurrent_syntheses_share_decode_steps(tiny_model, spawn):
    talker = spawn("talker", talker_env(tiny_model, OMNI_MAX_INFLIGHT=4, OMNI_MAX_QUEUE=4)).wait_ready()
    url = talker.url + "/v1/talker/synthesize"

    async def four():
        return await asyncio.gather(*(post_stream(url, text_payload(tiny_model, codes=60, fmt="pcm",
                                                                    generation={"max_codes": 60, "min_codes": 60,
                                                                                "seed": i}))
                                      for i in range(4)))

    results = run(four())
    assert all(r[0] == 200 and r[2] for r in results)
    text = talker.metrics_text()
    count = float(next(line.split()[-1] for line in text.splitlines()
                       if line.startswith("omni_talker_decode_batch_rows_count")))
    up_to_two = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith('omni_talker_decode_batch_rows_bucket{le="2.0"}')))
    assert count - up_to_two > 20, "most steps must have carried more than two syntheses"
    assert "omni_talker_batch_size" in text and "omni_talker_waiting_for_text" in text
