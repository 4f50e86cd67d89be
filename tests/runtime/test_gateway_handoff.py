"""The streamed thinker -> talker hand-off: the replayable ndjson body (handoff.py), full
duplex over aiohttp on loopback, and the gateway's speech flow against stand-in thinker
and talker servers (no model: these stand-ins only speak the protocols)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

import aiohttp
import pytest
from aiohttp import web

from e2e.procs import free_port
from omni_runtime.config import GatewaySettings
from omni_runtime.gateway.app import Gateway
from omni_runtime.gateway.handoff import END_LINE, NDJSON, IdFeed

from .helpers import b64, run, sine_wav, sse_events

pytestmark = pytest.mark.runtime

HEAD = {"v": 1, "speaker": "Ethan", "prompt_ids": [1, 2], "response_ids": [10], "format": "pcm"}


async def _drain(body) -> list[bytes]:
    return [chunk async for chunk in body]


# -- IdFeed -----------------------------------------------------------------------------

def test_every_body_replays_from_the_first_id_and_ends_with_the_end_line():
    async def go():
        feed = IdFeed(HEAD)
        feed.add([11, 12])
        first = feed.body()
        assert json.loads(await first.__anext__()) == HEAD
        assert json.loads(await first.__anext__()) == {"ids": [11, 12]}
        feed.add([13])
        assert json.loads(await first.__anext__()) == {"ids": [13]}
        later = asyncio.ensure_future(_drain(feed.body()))  # a failover's body, started mid-answer
        await asyncio.sleep(0.01)
        assert not later.done(), "a body waits for more ids until the text ends"
        feed.add([14])
        feed.end()
        feed.add([99])  # after the end: ignored
        rest = await _drain(first)
        assert [json.loads(x) for x in rest] == [{"ids": [14]}, {"end": True}]
        lines = await later
        assert lines[-1] == END_LINE and all(x.endswith(b"\n") for x in lines)
        ids = [i for x in lines[1:-1] for i in json.loads(x)["ids"]]
        assert ids == [11, 12, 13, 14]

    run(go())


def test_abort_ends_every_body_without_the_end_line():
    async def go():
        feed = IdFeed(HEAD)
        waiting = asyncio.ensure_future(_drain(feed.body()))
        feed.add([11])
        await asyncio.sleep(0.01)
        feed.abort()
        feed.end()  # too late: abandoned stays abandoned
        lines = await asyncio.wait_for(waiting, 1)
        assert [json.loads(x) for x in lines] == [HEAD, {"ids": [11]}]
        assert await _drain(feed.body()) == [feed.head]
        with pytest.raises(ValueError):
            IdFeed({**HEAD, "response_ids": []})

    run(go())


# -- full duplex over aiohttp -----------------------------------------------------------

@contextlib.asynccontextmanager
async def _serve(app: web.Application):
    port = free_port()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_aiohttp_reads_the_response_while_the_request_body_is_still_being_written():
    async def echo(request: web.Request):
        assert request.content_type == NDJSON
        await request.content.readline()  # the head line is enough to start answering
        resp = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        await resp.prepare(request)
        while line := await request.content.readline():
            await resp.write(b"got " + line)
            if json.loads(line).get("end"):
                break
        await resp.write_eof()
        return resp

    async def go():
        app = web.Application()
        app.router.add_post("/echo", echo)
        feed = IdFeed(HEAD)
        async with _serve(app) as url, aiohttp.ClientSession() as s:
            async with s.post(url + "/echo", data=feed.body(), headers={"Content-Type": NDJSON}) as r:
                # the headers are here while the body is still open
                assert r.status == 200 and not feed.closed
                for n in (11, 12):
                    feed.add([n])
                    echoed = await asyncio.wait_for(r.content.readline(), 5)
                    assert json.loads(echoed[4:]) == {"ids": [n]}, "each line is answered before the next is sent"
                feed.end()
                assert await r.content.read() == b"got " + END_LINE

    run(go())


# -- the gateway's speech flow against stand-in upstreams --------------------------------

PROMPT = [151644, 872, 198]
TOKENS = list(range(1000, 1012))
STATES = {"layer": 24, "dtype": "float32", "shape": [1, 2], "data": base64.b64encode(bytes(8)).decode()}


class Stack:
    """A stand-in thinker (SSE with token ids, paced) and talkers (ndjson in, PCM out), and
    a real gateway in this process in front of them."""

    def __init__(self, thinker="ok", talkers=("ok",), gap=0.03, streamed=True):
        self.thinker_mode, self.talker_modes, self.gap = thinker, list(talkers), gap
        self.streamed = streamed and thinker != "no_ids"  # the talker is called mid-answer
        self.talks: list[dict] = []  # one per talker request: content type, lines, how it ended
        self.thinker_cut = asyncio.Event()  # a write to the gateway failed: it closed the stream
        self.answered = asyncio.Event()  # a talker wrote audio or an error
        self.states_out = asyncio.Event()  # the thinker published the multimodal states

    async def thinker(self, request: web.Request):
        await request.json()
        ids = self.thinker_mode != "no_ids"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def event(obj):
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        try:
            first = {"model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            await resp.write(event({**first, "prompt_token_ids": PROMPT} if ids else first))
            for i, tok in enumerate(TOKENS):
                if i == 3 and self.streamed:  # the talker answers before the rest of the text comes
                    await asyncio.wait_for(self.answered.wait(), 5)
                if i == 6 and self.thinker_mode == "break":
                    request.transport.close()  # cut mid-answer, without the chunked body's end
                    return resp
                choice = {"index": 0, "delta": {"content": f"w{i} "}}
                await resp.write(event({"choices": [{**choice, "token_ids": [tok]} if ids else choice]}))
                if i == 2:
                    self.states_out.set()  # later than a real thinker would: the talker must wait for them
                await asyncio.sleep(self.gap)
            await resp.write(event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                    "usage": {"completion_tokens": len(TOKENS)}}))
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            self.thinker_cut.set()
        return resp

    async def mm_states(self, request: web.Request):
        if not self.states_out.is_set():
            return web.json_response({"error": "not published yet"}, status=404)
        return web.json_response(STATES)

    async def tokenize(self, request: web.Request):
        body = await request.json()
        return web.json_response({"tokens": PROMPT if "messages" in body else TOKENS})

    async def talker(self, request: web.Request):
        mode = self.talker_modes[len(self.talks) % len(self.talker_modes)]
        rec = {"type": request.content_type, "lines": [], "end": "open"}
        self.talks.append(rec)
        if request.content_type == "application/json":
            rec["lines"].append(await request.json())
            rec["end"] = "whole"
            return web.Response(body=b"\1\0" * 64, headers={"Content-Type": "audio/pcm", "X-Omni-Sample-Rate": "24000"})
        rec["lines"].append(json.loads(await request.content.readline()))
        if mode in ("429", "400"):
            self.answered.set()
            return web.json_response({"error": {"message": "no"}}, status=int(mode))
        resp = web.StreamResponse(headers={"Content-Type": "audio/pcm", "X-Omni-Sample-Rate": "24000"})
        await resp.prepare(request)
        try:
            await resp.write(b"\1\0" * 32)
            self.answered.set()
            while True:
                raw = await request.content.readline()
                if not raw:
                    rec["end"] = "abandoned"
                    break
                rec["lines"].append(json.loads(raw))
                if rec["lines"][-1].get("end"):
                    rec["end"] = "end line"
                    break
                if mode == "die" and len(rec["lines"]) == 3:
                    request.transport.close()  # audio started: the response breaks off
                    rec["end"] = "died"
                    return resp
                await resp.write(b"\1\0" * 32)
            await resp.write_eof()
        except (Exception, asyncio.CancelledError):  # the gateway closed the connection
            rec["end"] = "closed"
        return resp

    @contextlib.asynccontextmanager
    async def up(self, **env):
        thinker = web.Application()
        thinker.router.add_post("/v1/chat/completions", self.thinker)
        thinker.router.add_post("/tokenize", self.tokenize)
        thinker_metrics = web.Application()
        thinker_metrics.router.add_get("/v1/omni/mm-states/{rid}", self.mm_states)
        talker = web.Application()
        talker.router.add_post("/v1/talker/synthesize", self.talker)
        async with contextlib.AsyncExitStack() as stack:
            t_url = await stack.enter_async_context(_serve(thinker))
            m_port = (await stack.enter_async_context(_serve(thinker_metrics))).rsplit(":", 1)[1]
            k_urls = [await stack.enter_async_context(_serve(talker)) for _ in self.talker_modes]
            cfg = GatewaySettings.from_env({
                "OMNI_THINKER_SERVICE": f"{t_url[7:]}|{m_port}",
                "OMNI_TALKER_SERVICE": ",".join(u[7:] + "|0" for u in k_urls),
                "OMNI_UPSTREAM_METRICS_PORT": "0", "OMNI_SCRAPE_SECONDS": "0", "OMNI_UPSTREAM_WAIT_SECONDS": "0",
                **env})
            gw = Gateway(cfg)
            await gw.start()
            stack.push_async_callback(gw.upstreams.close)
            self.gateway = gw
            yield await stack.enter_async_context(_serve(gw.app()))


def speech(stream=True, fmt="pcm16"):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
            "audio": {"voice": "Ethan", "format": fmt}, "stream": stream}


async def _chat(url: str, body: dict) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, await r.read()


def _ids_sent(rec: dict) -> list[int]:
    head, rest = rec["lines"][0], rec["lines"][1:]
    return head["response_ids"] + [i for line in rest for i in line.get("ids", [])]


def test_speech_streams_audio_while_the_thinker_still_writes():
    async def go():
        st = Stack()
        async with st.up() as url:
            status, raw = await _chat(url, speech())
        assert status == 200, raw[:300]
        events = sse_events(raw)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
        deltas = [e["choices"][0]["delta"].get("audio", {}) for e in events[1:-2]]
        kinds = ["text" if "transcript" in d else "audio" for d in deltas]
        assert kinds.index("audio") < len(kinds) - 1 - kinds[::-1].index("text"), f"not interleaved: {kinds}"
        assert "".join(d.get("transcript", "") for d in deltas) == "".join(f"w{i} " for i in range(len(TOKENS)))
        (rec,) = st.talks
        assert rec["type"] == NDJSON and rec["end"] == "end line"
        head = rec["lines"][0]
        assert head["prompt_ids"] == PROMPT and head["format"] == "pcm" and 1 <= len(head["response_ids"]) < 4
        assert _ids_sent(rec) == TOKENS
        registry = st.gateway.metrics.registry
        assert registry.get_sample_value("omni_gateway_talker_payload_bytes_count") == 1
        assert registry.get_sample_value("omni_gateway_talker_payload_bytes_sum") == len(json.dumps(head,
                                                                                              separators=(",", ":"))) + 1

    run(go())


def test_media_input_opens_the_talker_once_the_states_are_there():
    async def go():
        st = Stack()
        body = speech()
        body["messages"][0]["content"] = [{"type": "text", "text": "what is this?"},
                                          {"type": "input_audio", "input_audio": {"data": b64(sine_wav(0.1)),
                                                                                  "format": "wav"}}]
        async with st.up() as url:
            status, raw = await _chat(url, body)
        assert status == 200 and sse_events(raw)[-1] == "[DONE]", raw[-300:]
        (rec,) = st.talks
        head = rec["lines"][0]
        assert head["mm"] == STATES and len(head["response_ids"]) >= 3, "opened before the states were there"
        assert rec["end"] == "end line" and _ids_sent(rec) == TOKENS
        assert st.gateway.metrics.registry.get_sample_value("omni_gateway_mm_states_bytes_total") > 0

    run(go())


def test_non_stream_client_gets_one_answer_with_the_whole_audio():
    async def go():
        st = Stack()
        async with st.up() as url:
            status, raw = await _chat(url, speech(stream=False, fmt="wav"))
        assert status == 200, raw[:300]
        audio = json.loads(raw)["choices"][0]["message"]["audio"]
        wav = base64.b64decode(audio["data"])
        assert wav[:4] == b"RIFF" and len(wav) > 44 and audio["transcript"].startswith("w0 w1")
        assert st.talks[0]["end"] == "end line"

    run(go())


def test_whole_payload_when_streaming_is_off_or_the_engine_gives_no_ids():
    async def go():
        for st, env in ((Stack(streamed=False), {"OMNI_SPEECH_STREAMING": "off"}), (Stack(thinker="no_ids"), {})):
            async with st.up(**env) as url:
                status, raw = await _chat(url, speech())
            assert status == 200, raw[:300]
            (rec,) = st.talks
            assert rec["type"] == "application/json" and rec["lines"][0]["response_ids"] == TOKENS
            assert any("data" in e["choices"][0]["delta"].get("audio", {}) for e in sse_events(raw)[1:-1])

    run(go())


def test_failover_replays_the_body_from_its_first_line():
    async def go():
        st = Stack(talkers=("429", "ok"))
        async with st.up() as url:
            status, raw = await _chat(url, speech())
        assert status == 200 and sse_events(raw)[-1] == "[DONE]"
        full, taken = st.talks
        assert full["lines"][0] == taken["lines"][0], "the same head line on both"
        assert taken["end"] == "end line" and _ids_sent(taken) == TOKENS

    run(go())


def test_thinker_breaking_mid_answer_abandons_the_talker_body():
    async def go():
        st = Stack(thinker="break")
        async with st.up() as url:
            status, raw = await _chat(url, speech())
            status2, raw2 = await _chat(url, speech(stream=False))
        events = sse_events(raw)
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 502 and "thinker" in events[-2]["error"]["message"]
        assert status2 == 502 and "thinker" in json.loads(raw2)["error"]["message"]
        assert all(rec["end"] in ("abandoned", "closed") for rec in st.talks) and st.talks

    run(go())


def test_talker_failing_ends_the_stream_and_closes_the_thinker():
    async def go():
        for mode in ("die", "400"):
            st = Stack(talkers=(mode,), gap=0.1)
            async with st.up() as url:
                status, raw = await _chat(url, speech())
                await asyncio.wait_for(st.thinker_cut.wait(), 5)
            events = sse_events(raw)
            assert status == 200 and events[-1] == "[DONE]", mode
            err = events[-2]["error"]
            assert "talker" in err["message"] and err["code"] == (502 if mode == "die" else 400), err
            transcript = "".join(e["choices"][0]["delta"].get("audio", {}).get("transcript", "")
                                 for e in events[1:-2])
            assert not transcript.endswith(f"w{len(TOKENS) - 1} "), "the thinker was stopped mid-answer"

    run(go())


def test_client_leaving_closes_both_upstreams():
    async def go():
        st = Stack(gap=0.1)
        async with st.up() as url:
            async with aiohttp.ClientSession() as s:
                r = await s.post(url + "/v1/chat/completions", json=speech())
                await asyncio.wait_for(st.answered.wait(), 5)
                r.close()  # the client hangs up mid-answer
            await asyncio.wait_for(st.thinker_cut.wait(), 5)
            for _ in range(50):
                if st.talks[0]["end"] != "open":
                    break
                await asyncio.sleep(0.05)
        assert st.talks[0]["end"] in ("abandoned", "closed")

    run(go())
