"""Realtime sessions end to end: the official OpenAI SDK's realtime client against a real
gateway, thinker (transformers engine) and talker on loopback, the tiny model, real speech
from espeak-ng and the real Silero VAD. The same over vLLM: test_realtime_vllm.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request

import aiohttp
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from e2e.procs import wait_until
from e2e.speech import espeak_pcm16, silence

from .helpers import answered, run

pytestmark = pytest.mark.runtime

KEY = "sk-realtime-test"
MODEL = "qwen3-omni-tiny"
CHUNK = 960  # 20 ms of 24 kHz PCM16
# how an answer of the random-weight model ends: at EOS, or at its token limit
ANSWERED = {"completed", "incomplete"}


@pytest.fixture(scope="module")
def speech():
    return {"weather": espeak_pcm16("What is the weather like today?"),
            "hello": espeak_pcm16("Hello there, how are you doing?"),
            "stop": espeak_pcm16("Wait, stop, I have another question.")}


@pytest.fixture(scope="module")
def stack(tiny_model, module_spawn, tmp_path_factory):
    keys = tmp_path_factory.mktemp("rt-keys") / "keys"
    keys.write_text(KEY + "\n")
    common = {"OMNI_MODEL": str(tiny_model), "OMNI_DEVICE": "cpu", "OMNI_SERVED_MODEL_NAME": MODEL}
    thinker = module_spawn("thinker", common, args=("--engine", "transformers"))
    talker = module_spawn("talker", {**common, "OMNI_MAX_INFLIGHT": "4"})
    upstreams = {"OMNI_THINKER_SERVICE": f"127.0.0.1:{thinker.port}|{thinker.metrics_port}",
                 "OMNI_TALKER_SERVICE": f"127.0.0.1:{talker.port}|{talker.metrics_port}",
                 "OMNI_API_KEYS_FILE": str(keys)}
    short = {"OMNI_TALKER_GENERATION": json.dumps({"max_codes": 24, "min_codes": 24, "seed": 5})}
    gw = module_spawn("gateway", {**common, **upstreams, **short, "OMNI_REALTIME_MAX_EVENT_BYTES": str(256 << 10)})
    # answers far longer than any test waits for: what barge-in and cancel cut short
    long = module_spawn("gateway", {
        **common, **upstreams, "OMNI_TALKER_GENERATION": json.dumps({"max_codes": 3000, "min_codes": 3000}),
        "OMNI_REALTIME_THINKER_PARAMS": json.dumps({"ignore_eos": True})})
    tight = module_spawn("gateway", {
        **common, **upstreams, **short, "OMNI_REALTIME_MAX_SESSIONS": "2", "OMNI_REALTIME_IDLE_SECONDS": "2",
        "OMNI_REALTIME_MAX_SESSION_SECONDS": "6", "OMNI_REALTIME_MAX_BUFFER_SECONDS": "1"})
    for p in (thinker, talker, gw, long, tight):
        p.wait_ready()
    return {"thinker": thinker, "talker": talker, "gw": gw, "long": long, "tight": tight, "common": common,
            "upstreams": upstreams, "short": short}


def client(gateway):
    from openai import AsyncOpenAI

    return AsyncOpenAI(api_key=KEY, base_url=gateway.url + "/v1")


async def stream_audio(conn, pcm: bytes) -> None:
    for i in range(0, len(pcm), CHUNK):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + CHUNK]).decode())


async def until(conn, kind: str, seen: list | None = None, timeout: float = 120):
    """Events up to and including the first of type `kind` (collected into `seen` too)."""
    got = []

    async def read():
        while True:
            ev = await conn.recv()
            got.append(ev)
            if seen is not None:
                seen.append(ev)
            if ev.type == kind:
                return got

    return await asyncio.wait_for(read(), timeout)


def types(events) -> list[str]:
    return [e.type for e in events]


def manual():
    return {"type": "realtime", "audio": {"input": {"turn_detection": None}}}


def pcm_of(events) -> bytes:
    return b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")


def tracebacks(process) -> int:
    return process.log.read_text(errors="replace").count("Traceback (most recent call last)")


def transcript_of(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")


# -- the protocol over real processes -------------------------------------------------------

def test_spoken_turn_with_server_vad_streams_the_transcript_and_the_audio(stack, speech):
    """Real speech, the real VAD finds the turn, the answer streams back as text and audio."""
    pcm = silence(0.4) + speech["weather"] + silence(1.0)
    speech_end_ms = (len(silence(0.4)) + len(speech["weather"])) * 1000 // 48000

    async def go():
        async with client(stack["gw"]).realtime.connect(model=MODEL) as conn:
            created = await conn.recv()
            assert created.type == "session.created" and created.session.model == MODEL
            td = created.session.audio.input.turn_detection
            assert td.type == "server_vad" and created.session.audio.output.format.rate == 24000
            await stream_audio(conn, pcm)
            return await until(conn, "response.done")

    events = run(go())
    kinds = types(events)
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "response.created", "response.output_audio.delta", "response.done"]
    firsts = [kinds.index(k) for k in order]
    assert firsts == sorted(firsts), kinds
    started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
    assert 0 <= started.audio_start_ms <= 400  # speech begins at 400 ms; 300 ms of padding before it
    assert speech_end_ms <= stopped.audio_end_ms <= speech_end_ms + 900  # 500 ms of silence ends the turn
    assert started.item_id == stopped.item_id
    done = events[-1].response
    assert done.status in ANSWERED
    spoken = done.output[0].content[0].transcript
    assert spoken == transcript_of(events) and spoken
    audio = np.frombuffer(pcm_of(events), "<i2")
    assert len(audio) > 0.8 * 24 * 1920 and np.abs(audio).max() > 0  # 24 codec frames of 80 ms, not silence
    assert done.usage.output_token_details.audio_tokens >= 20


def test_manual_turns_keep_the_whole_conversation(stack, speech):
    """Each turn sends the whole conversation: the second turn's prompt holds the first turn,
    its answer and the new audio."""

    async def go():
        async with client(stack["gw"]).realtime.connect(model=MODEL) as conn:
            await conn.session.update(session={**manual(), "instructions": "Answer briefly."})
            await until(conn, "session.updated")
            usages = []
            for utterance in ("weather", "hello"):
                await stream_audio(conn, speech[utterance])
                await conn.input_audio_buffer.commit()
                await until(conn, "conversation.item.done")
                await conn.response.create(response={"max_output_tokens": 6})
                done = (await until(conn, "response.done"))[-1].response
                assert done.status == "incomplete" and done.status_details.reason == "max_output_tokens"
                usages.append(done.usage)
            return usages

    first, second = run(go())
    assert first.output_token_details.text_tokens == 6
    # the first turn's prompt and its answer, plus the new audio turn
    assert second.input_tokens > first.input_tokens + first.output_token_details.text_tokens + 10


def test_text_responses_priming_and_per_response_instructions(stack):
    async def go():
        async with client(stack["gw"]).realtime.connect(model=MODEL) as conn:
            await conn.conversation.item.create(item={
                "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi! Ask me."}]})
            await conn.conversation.item.create(item={
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a color."}]})
            out = []
            for instructions in ("", "Reply with one word. " * 8):
                await conn.response.create(response={"output_modalities": ["text"], "instructions": instructions,
                                                     "max_output_tokens": 4})
                out.append(await until(conn, "response.done"))
            return out

    plain, instructed = run(go())
    for events in (plain, instructed):
        assert "response.output_text.delta" in types(events) and "response.output_audio.delta" not in types(events)
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].response.output[0].content[0].text == text
    # the response's instructions went to the thinker as the system message
    assert instructed[-1].response.usage.input_tokens >= plain[-1].response.usage.input_tokens + 150


def test_barge_in_stops_thinker_and_talker_and_keeps_the_text_that_was_heard(stack, speech):
    talker, thinker, gw = stack["talker"], stack["thinker"], stack["long"]
    audio_before = talker.metrics().get("omni_talker_audio_seconds_total", 0.0)
    tracebacks_before = {p.role: tracebacks(p) for p in (thinker, talker)}
    left_before = {p.role: answered(p, 499) for p in (thinker, talker)}  # 499: the client went away

    async def go():
        async with client(gw).realtime.connect(model=MODEL) as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                               "max_output_tokens": 4000})
            await until(conn, "session.updated")
            await stream_audio(conn, silence(0.3) + speech["weather"] + silence(0.9))
            first = await until(conn, "response.output_audio.delta")
            loop = asyncio.get_running_loop()
            # the talker and the thinker are both working on the answer
            await loop.run_in_executor(None, lambda: wait_until(
                "the talker synthesizing", lambda: talker.metrics()["omni_requests_running"] == 1, 30))
            await loop.run_in_executor(None, lambda: wait_until(
                "the thinker generating", lambda: thinker.metrics()["omni_requests_running"] == 1, 30))
            more = await until(conn, "response.output_audio.delta")
            # the interruption is not answered by itself, so that nothing new runs while the slots are watched
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
                "type": "server_vad", "create_response": False}}}})
            more += await until(conn, "session.updated")
            await stream_audio(conn, speech["stop"] + silence(0.9))  # the user speaks over the answer
            cut = await until(conn, "response.done")
            await loop.run_in_executor(None, lambda: wait_until(
                "the talker's slot freed", lambda: talker.metrics()["omni_requests_running"] == 0, 15))
            await loop.run_in_executor(None, lambda: wait_until(
                "the thinker's slot freed", lambda: thinker.metrics()["omni_requests_running"] == 0, 15))
            item_id = cut[-1].response.output[0].id
            await conn.conversation.item.retrieve(item_id=item_id)
            kept = await until(conn, "conversation.item.retrieved")
            item = next(e.item for e in kept if e.type == "conversation.item.retrieved")
            # the new turn is answered on request; the client cancels that answer
            await conn.response.create()
            nxt = await until(conn, "response.created")
            await conn.response.cancel()
            cancelled = await until(conn, "response.done")
            return first + more, cut, item, nxt + cancelled

    before_cut, cut, kept_item, second = run(go())
    kinds = types(cut)
    assert "input_audio_buffer.speech_started" in kinds
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
    done = cut[-1].response
    assert done.status == "cancelled" and done.status_details.reason == "turn_detected"
    heard = done.output[0].content[0].transcript
    deltas = [e.delta for e in before_cut + cut if e.type == "response.output_audio_transcript.delta"]
    written = "".join(deltas)
    # the talker speaks one token per codec frame: the text kept is the thinker's first deltas
    # (a token each on this engine), no more of them than the frames that were sent
    frames = done.usage.output_token_details.audio_tokens
    kept = next((k for k in range(len(deltas) + 1) if "".join(deltas[:k]) == heard), None)
    assert kept is not None and kept <= frames, (heard, written, frames)
    if len(deltas) > frames:  # the thinker had written ahead of the speech (as it usually does)
        assert len(heard) < len(written)
    assert kept_item.content[0].transcript == heard  # what the conversation keeps for the next turn
    assert "response.output_audio.delta" not in types(cut[kinds.index("response.done"):])
    # the talker stopped long before the 3000 codes (240 s of audio) it was asked for
    assert talker.metrics()["omni_talker_audio_seconds_total"] - audio_before < 120
    last = second[-1].response
    assert last.status == "cancelled" and last.status_details.reason == "client_cancelled"
    m = gw.metrics()
    assert m["omni_gateway_realtime_barge_ins_total"] == 1
    assert m["omni_gateway_realtime_voice_to_voice_seconds_count"] >= 1
    assert 'omni_gateway_realtime_turns_total{status="cancelled"} 2.0' in gw.metrics_text()
    # a client that leaves mid-stream is routine for the thinker and the talker, not an error
    assert {p.role: tracebacks(p) for p in (thinker, talker)} == tracebacks_before
    assert all(answered(p, 499) > left_before[p.role] for p in (thinker, talker))


def test_sessions_count_as_running_requests_for_the_autoscaler(stack):
    gw = stack["gw"]
    finished = gw.metrics()["omni_requests_finished_total"]

    async def go():
        async with client(gw).realtime.connect(model=MODEL) as a, client(gw).realtime.connect(model=MODEL) as b:
            await a.recv()
            await b.recv()
            m = gw.metrics()
            return m["omni_gateway_realtime_sessions"], m["omni_requests_running"]

    assert run(go()) == (2.0, 2.0)
    m = wait_until("sessions closed", lambda: (lambda m: m if m["omni_gateway_realtime_sessions"] == 0 else None)(
        gw.metrics()), 10)
    assert m["omni_requests_running"] == 0 and m["omni_requests_finished_total"] == finished + 2


# -- bad input, limits, drain ---------------------------------------------------------------

async def raw_session(url: str, headers=None):
    s = aiohttp.ClientSession()
    ws = await s.ws_connect(url.replace("http", "ws") + f"/v1/realtime?model={MODEL}",
                            headers={"Authorization": f"Bearer {KEY}", **(headers or {})}, max_msg_size=0)
    assert json.loads((await ws.receive()).data)["type"] == "session.created"
    return s, ws


async def next_event(ws, timeout: float = 30) -> dict:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


HOSTILE = [
    ("not json {", "invalid_json"),
    ("[]", "invalid_json"),
    ("[" * 50000 + "]" * 50000, "invalid_json"),
    (json.dumps({"type": 7}), "missing_required_parameter"),
    (json.dumps({"type": "session.delete"}), "invalid_value"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%not-base64%%%"}), "invalid_base64"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01").decode()}), "invalid_audio"),
    (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm",
                                                                                      "rate": 8000}}}}}),
     "unsupported_parameter"),
    (json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": {"id": "custom"}}}}}),
     "unsupported_parameter"),
    (json.dumps({"type": "session.update", "session": "everything"}), "invalid_type"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                              "content": [{"type": "input_image"}]}}), "invalid_value"),
    (json.dumps({"type": "conversation.item.delete", "item_id": "x" * 10000}), "invalid_value"),
    (json.dumps({"type": "response.create", "response": {"max_output_tokens": 10 ** 30}}), "invalid_value"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    (json.dumps({"type": "input_audio_buffer.commit", "event_id": "evt_42"}), "input_audio_buffer_commit_empty"),
]


def test_a_hostile_client_gets_errors_and_no_other_session_notices(stack, speech):
    gw = stack["gw"]

    async def good_session():
        async with client(gw).realtime.connect(model=MODEL) as conn:
            await conn.session.update(session=manual())
            await stream_audio(conn, speech["hello"])
            await conn.input_audio_buffer.commit()
            await conn.response.create(response={"max_output_tokens": 4})
            return (await until(conn, "response.done"))[-1].response.status

    async def hostile():
        s, ws = await raw_session(gw.url)
        try:
            codes = []
            for frame, _ in HOSTILE:
                await ws.send_str(frame)
                ev = await next_event(ws)
                assert ev["type"] == "error", ev
                codes.append(ev["error"]["code"])
            await ws.send_bytes(b"\x00\x01binary audio")
            binary = await next_event(ws)
            # the session still serves this client
            await ws.send_str(json.dumps({"type": "session.update", "session": {"instructions": "ok"}}))
            updated = await next_event(ws)
            last_event_id = None
            await ws.send_str(HOSTILE[-1][0])
            last_event_id = (await next_event(ws))["error"]["event_id"]
        finally:
            await s.close()
        # a frame over OMNI_REALTIME_MAX_EVENT_BYTES (256 KiB) closes that connection: 1009
        s, ws = await raw_session(gw.url)
        try:
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (300 << 10)}))
            closing = await ws.receive(timeout=30)
        finally:
            await s.close()
        return codes, binary, updated, last_event_id, (closing.type, ws.close_code)

    async def go():
        return await asyncio.gather(good_session(), hostile())

    status, (codes, binary, updated, event_id, closed) = run(go())
    assert codes == [code for _, code in HOSTILE]
    assert binary["error"]["code"] == "invalid_frame" and updated["type"] == "session.updated"
    assert event_id == "evt_42"  # the offending event is named
    assert closed == (aiohttp.WSMsgType.CLOSE, 1009) or closed[1] == 1009
    assert status in ANSWERED
    assert gw.popen.poll() is None
    with urllib.request.urlopen(gw.url + "/health", timeout=5) as r:
        assert r.status == 200
    assert gw.metrics()["omni_gateway_realtime_errors_total"] >= len(HOSTILE) + 1


def test_authentication_and_what_is_not_a_websocket(stack):
    gw = stack["gw"]

    async def go():
        async with aiohttp.ClientSession() as s:
            try:
                await s.ws_connect(gw.url.replace("http", "ws") + "/v1/realtime", headers={"Authorization": "Bearer no"})
                refused = None
            except aiohttp.WSServerHandshakeError as e:
                refused = e.status
            async with s.get(gw.url + "/v1/realtime", headers={"Authorization": f"Bearer {KEY}"}) as r:
                return refused, r.status, await r.json()

    refused, status, body = run(go())
    assert refused == 401 and status == 400 and "WebSocket" in body["error"]["message"]


def test_limits_sessions_per_pod_idle_length_and_buffer(stack):
    tight = stack["tight"]

    async def go():
        async with aiohttp.ClientSession() as s:
            a = await s.ws_connect(tight.url.replace("http", "ws") + "/v1/realtime",
                                   headers={"Authorization": f"Bearer {KEY}"})
            b = await s.ws_connect(tight.url.replace("http", "ws") + "/v1/realtime",
                                   headers={"Authorization": f"Bearer {KEY}"})
            for ws in (a, b):
                assert (await next_event(ws))["type"] == "session.created"

            async def idle_end():  # b sends nothing: it is closed after 2 s idle
                error = await next_event(b)
                await b.receive(timeout=10)
                return error

            idle_task = asyncio.ensure_future(idle_end())
            full = await s.ws_connect(tight.url.replace("http", "ws") + "/v1/realtime",
                                      headers={"Authorization": f"Bearer {KEY}"})
            refusal = await next_event(full)
            await full.receive(timeout=10)
            # a: manual turns, more than the 1 s buffer; then it stays busy until the 6 s session ends
            await a.send_str(json.dumps({"type": "session.update", "session": manual()}))
            await next_event(a)
            await a.send_str(json.dumps({"type": "input_audio_buffer.append",
                                         "audio": base64.b64encode(silence(1.5)).decode()}))
            overflow = await next_event(a)
            t0 = time.monotonic()
            expired = None
            while expired is None:  # a client that never pauses: the session still ends at 6 s
                assert time.monotonic() - t0 < 60, "the session outlived OMNI_REALTIME_MAX_SESSION_SECONDS"
                await a.send_str(json.dumps({"type": "session.update", "session": {"instructions": "x"}}))
                ev = await next_event(a)
                if ev["type"] == "error":
                    expired = (ev["error"]["code"], time.monotonic() - t0)
            await a.receive(timeout=10)
            idle = await idle_task
            return refusal, full.close_code, overflow, expired, a.close_code, idle, b.close_code

    refusal, full_code, overflow, expired, a_code, idle, b_code = run(go())
    assert refusal["error"]["code"] == "session_limit_reached" and full_code == 1013
    assert overflow["error"]["code"] == "input_audio_buffer_full"
    assert expired[0] == "session_expired" and a_code == 1000
    assert idle["error"]["code"] == "idle_timeout" and b_code == 1000
    assert 'omni_gateway_realtime_sessions_refused_total{reason="session_limit_reached"} 1.0' in tight.metrics_text()


def test_sigterm_closes_idle_sessions_and_finishes_the_response_in_progress(stack, speech, spawn):
    """Drain: idle sessions close with 1012 at once, the response in progress completes and
    then its session closes with 1012, new sessions are refused, the process exits 0."""
    gw = spawn("gateway", {**stack["common"], **stack["upstreams"], "OMNI_DRAIN_SECONDS": "60",
                           "OMNI_TALKER_GENERATION": json.dumps({"max_codes": 60, "min_codes": 60}),
                           "OMNI_REALTIME_THINKER_PARAMS": json.dumps({"ignore_eos": True})}).wait_ready()

    async def closed_code(conn) -> int:
        try:
            while True:
                await conn.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else -1

    async def go():
        async with client(gw).realtime.connect(model=MODEL) as idle, client(gw).realtime.connect(model=MODEL) as busy:
            await idle.recv()
            await busy.session.update(session=manual())
            await stream_audio(busy, speech["hello"])
            await busy.input_audio_buffer.commit()
            await busy.response.create(response={"max_output_tokens": 40})
            events = await until(busy, "response.output_audio.delta")
            gw.terminate()
            idle_code = await asyncio.wait_for(closed_code(idle), 30)
            done = await until(busy, "response.done", seen=events)
            busy_code = await asyncio.wait_for(closed_code(busy), 30)
            try:
                async with client(gw).realtime.connect(model=MODEL) as late:
                    late_result = (await late.recv()).type
            except Exception as exc:  # noqa: BLE001 - refused at the handshake while draining
                late_result = type(exc).__name__
            return idle_code, done[-1].response.status, busy_code, late_result

    idle_code, status, busy_code, late = run(go())
    assert idle_code == 1012 and busy_code == 1012
    assert status == "incomplete"  # ran to the end: its 40 tokens (ignore_eos), not cut
    assert late != "session.created"
    assert gw.popen.wait(timeout=60) == 0


def test_turns_of_a_session_stay_on_one_thinker_until_it_leaves(stack, spawn):
    """Session affinity: every turn goes to the thinker that served the first (its prefix
    cache holds the conversation); when that thinker goes away, the next turn goes to the
    other one and the session goes on."""
    other = spawn("thinker", stack["common"], args=("--engine", "transformers")).wait_ready()
    first = stack["thinker"]
    gw = spawn("gateway", {**stack["common"], **stack["short"], "OMNI_API_KEYS_FILE": stack["upstreams"]["OMNI_API_KEYS_FILE"],
                           "OMNI_THINKER_SERVICE": f"127.0.0.1:{other.port}|{other.metrics_port},"
                                                   f"127.0.0.1:{first.port}|{first.metrics_port}",
                           "OMNI_TALKER_SERVICE": stack["upstreams"]["OMNI_TALKER_SERVICE"]}).wait_ready()
    served = {p: p.metrics()["omni_requests_finished_total"] for p in (other, first)}

    def count(p):
        return p.metrics()["omni_requests_finished_total"] - served[p]

    async def turn(conn, text):
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": text}]})
        await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 3})
        return (await until(conn, "response.done"))[-1].response.status

    async def go():
        async with client(gw).realtime.connect(model=MODEL) as conn:
            statuses = [await turn(conn, t) for t in ("one", "two", "three")]
            counts = (count(other), count(first))
            pinned = other if counts[0] else first
            if pinned is other:
                other.stop()  # not Ready any more: gone from the service
                statuses.append(await turn(conn, "four"))
            return statuses, counts, pinned is other

    statuses, counts, moved = run(go())
    assert set(statuses[:3]) <= ANSWERED and sorted(counts) == [0, 3], counts
    assert moved, "the first turn went to the first listed (idle) thinker"
    assert statuses[3] in ANSWERED and count(first) == 1
    assert gw.metrics()["omni_gateway_affinity_moves_total"] == 1


def test_the_example_client_streams_a_wav_file_and_writes_the_spoken_answer(stack, speech, tmp_path):
    import subprocess
    import sys
    import wave

    from .vllm_procs import REPO

    question = tmp_path / "question.wav"
    with wave.open(str(question), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(silence(0.3) + speech["weather"])
    answer = tmp_path / "answer.wav"
    out = subprocess.run([sys.executable, str(REPO / "examples" / "realtime_client.py"), str(question),
                          "--url", stack["gw"].url, "--api-key", KEY, "--model", MODEL, "--out", str(answer)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "end of question heard" in out.stdout and "output tokens" in out.stdout
    with wave.open(str(answer)) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0.8 * 24 * 1920
