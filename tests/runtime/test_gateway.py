"""Gateway -> thinker (transformers engine) -> talker, all real processes on loopback."""

from __future__ import annotations

import base64
import json

import pytest

from e2e.procs import free_port
from omni_runtime.audio import parse_wav_header

from .helpers import b64, post_stream, run, sine_wav, sse_events

pytestmark = pytest.mark.runtime

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def stack(tiny_model, module_spawn, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# api keys\n{KEY}\n")
    common = {"OMNI_MODEL": str(tiny_model), "OMNI_DEVICE": "cpu", "OMNI_SERVED_MODEL_NAME": "qwen3-omni-tiny"}
    thinker = module_spawn("thinker", {**common, "OMNI_ROLE": "thinker"}, args=("--engine", "transformers"))
    talker = module_spawn("talker", {**common, "OMNI_ROLE": "talker", "OMNI_MAX_INFLIGHT": "2", "OMNI_MAX_QUEUE": "4"})
    dead = free_port()  # nothing listens there: the gateway must fail over
    gateway = module_spawn("gateway", {
        **common, "OMNI_ROLE": "gateway",
        "OMNI_THINKER_SERVICE": f"127.0.0.1:{dead}|{free_port()},127.0.0.1:{thinker.port}|{thinker.metrics_port}",
        "OMNI_TALKER_SERVICE": f"localhost:{talker.port}|{talker.metrics_port}",
        "OMNI_API_KEYS_FILE": str(keys), "OMNI_MAX_REQUEST_BYTES": "200000", "OMNI_MAX_MEDIA_BYTES": "60000",
        "OMNI_TALKER_GENERATION": json.dumps({"max_codes": 24, "min_codes": 24, "seed": 5}),
    })
    # the same stack, speaking whole answers (the path without the streaming hand-off)
    whole = module_spawn("gateway", {
        **common, "OMNI_ROLE": "gateway", "OMNI_SPEECH_STREAMING": "0",
        "OMNI_THINKER_SERVICE": f"127.0.0.1:{thinker.port}|{thinker.metrics_port}",
        "OMNI_TALKER_SERVICE": f"localhost:{talker.port}|{talker.metrics_port}",
        "OMNI_TALKER_GENERATION": json.dumps({"max_codes": 24, "min_codes": 24, "seed": 5}),
    })
    for p in (thinker, talker, gateway, whole):
        p.wait_ready()
    return {"thinker": thinker, "talker": talker, "gateway": gateway, "whole": whole}


def chat(stack, body, headers=AUTH):
    return run(post_stream(stack["gateway"].url + "/v1/chat/completions", body, headers=headers))


def user(content):
    return {"model": "qwen3-omni-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6}


def test_models_and_auth(stack):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(stack["gateway"].url + "/v1/models", headers=AUTH)
    with urllib.request.urlopen(req) as r:
        assert json.load(r)["data"][0]["id"] == "qwen3-omni-tiny"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(stack["gateway"].url + "/v1/models")
    assert e.value.code == 401
    status, _, body, _ = chat(stack, user("hi"), headers={"Authorization": "Bearer wrong"})
    assert status == 401 and "API key" in json.loads(body)["error"]["message"]


def test_text_non_stream_and_stream_with_failover(stack):
    status, _, body, _ = chat(stack, user("hello"))
    assert status == 200, body[:300]
    out = json.loads(body)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] >= 1

    status, headers, body, _ = chat(stack, {**user("hello"), "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    m = stack["gateway"].metrics()
    assert m["omni_gateway_upstream_errors_total"] >= 1, "the dead thinker endpoint was tried and skipped"
    assert m["omni_gateway_request_duration_seconds_count"] >= 2
    assert "omni_queue_depth" in m and m["omni_requests_running"] == 0
    assert m["omni_gateway_waiting_requests"] == 0, "a live thinker was there: nothing was held"


def _audio_request(content, stream=False, fmt="wav"):
    return {**user(content), "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": fmt},
            "stream": stream}


def test_audio_non_stream_returns_wav(stack):
    status, _, body, _ = chat(stack, _audio_request("Tell me something."))
    assert status == 200, body[:300]
    msg = json.loads(body)["choices"][0]["message"]
    wav = base64.b64decode(msg["audio"]["data"])
    hdr = parse_wav_header(wav)
    assert hdr["sample_rate"] == 24000 and hdr["data_size"] == len(wav) - 44
    assert hdr["data_size"] // 2 > 0.8 * 24 * 1920
    assert isinstance(msg["audio"]["transcript"], str)


def test_audio_stream_text_then_audio(stack):
    status, _, body, _ = chat(stack, _audio_request("Stream it.", stream=True))
    assert status == 200, body[:300]
    events = [e for e in sse_events(body) if e != "[DONE]"]
    kinds = []
    pcm = b""
    for e in events:
        audio = e["choices"][0]["delta"].get("audio") or {}
        if "transcript" in audio:
            kinds.append("text")
        if "data" in audio:
            kinds.append("audio")
            pcm += base64.b64decode(audio["data"])
    assert "audio" in kinds and kinds.index("audio") > (kinds.index("text") if "text" in kinds else -1)
    assert kinds[-1] == "audio" and kinds.count("audio") >= 2
    assert len(pcm) % 2 == 0 and len(pcm) // 2 > 0.8 * 24 * 1920
    final = events[-1]["choices"][0]
    assert final["finish_reason"] in ("stop", "length") and final["delta"]["audio"]["sample_rate"] == 24000


def _speech_events(raw: bytes) -> tuple[list[str], str, bytes]:
    """(kinds in order, transcript, pcm) of a streamed speech answer."""
    kinds, text, pcm = [], "", b""
    for e in sse_events(raw):
        if e == "[DONE]":
            continue
        audio = e["choices"][0]["delta"].get("audio") or {}
        if audio.get("transcript"):
            kinds.append("text")
            text += audio["transcript"]
        if audio.get("data"):
            kinds.append("audio")
            pcm += base64.b64decode(audio["data"])
    return kinds, text, pcm


def test_streamed_hand_off_speaks_before_the_answer_ends_and_sounds_the_same(stack):
    """A long answer: with the hand-off, audio starts while the transcript is still coming;
    the audio equals what the whole-answer path makes of the same answer and seed."""
    body = {**_audio_request("Tell me a long story.", stream=True), "max_tokens": 160, "ignore_eos": True,
            "temperature": 0}
    answers = {}
    for name in ("gateway", "whole"):
        status, _, raw, _ = run(post_stream(stack[name].url + "/v1/chat/completions", body, headers=AUTH))
        assert status == 200, raw[:300]
        answers[name] = _speech_events(raw)
    kinds, text, pcm = answers["gateway"]
    whole_kinds, whole_text, whole_pcm = answers["whole"]
    assert text == whole_text and len(text) > 0
    assert pcm == whole_pcm and len(pcm) > 0
    assert kinds.index("audio") < len(kinds) - 1 - kinds[::-1].index("text"), "audio must start mid-answer"
    assert whole_kinds.index("audio") > len(whole_kinds) - 1 - whole_kinds[::-1].index("text")


def test_audio_input_carries_thinker_states_to_talker(stack):
    content = [{"type": "input_audio", "input_audio": {"data": b64(sine_wav(0.5)), "format": "wav"}},
               {"type": "text", "text": "What is this sound?"}]
    status, _, body, _ = chat(stack, _audio_request(content, fmt="pcm16"))
    assert status == 200, body[:300]
    audio = json.loads(body)["choices"][0]["message"]["audio"]
    pcm = base64.b64decode(audio["data"])
    assert pcm[:4] != b"RIFF" and len(pcm) // 2 > 0.8 * 24 * 1920


@pytest.mark.parametrize("body, needle", [
    (user([{"type": "video_clip", "url": "x"}]), "unknown content part type"),
    (user([{"type": "input_audio", "input_audio": {"data": "%%%not-base64%%%", "format": "wav"}}]), "not valid base64"),
    (user([{"type": "input_audio", "input_audio": {"data": b64(b"1234"), "format": "aiff"}}]), "unsupported audio format"),
    (user([{"type": "input_audio", "input_audio": {"data": b64(b"just bytes"), "format": "wav"}}]), "not a WAV"),
    (user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]), "not valid base64"),
    (user([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]), "http(s) or data: URL"),
    (user([{"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}]), "http(s) or data: URL"),
    (user([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,!!"}}]), "not valid base64"),
    (user([{"type": "audio_url", "audio_url": {"url": "data:image/png;base64," + b64(b"x")}}]), "data:audio/<type>"),
    (user([{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + b64(sine_wav(2.0))}}]),
     "more than the 60000 allowed per media item"),
    ({**_audio_request("hi"), "audio": {"voice": "Ethan", "format": "mp3"}}, "unsupported output audio format"),
    ({"model": "m", "messages": []}, "non-empty list"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "not a chat role"),
    ("{broken json", "not valid JSON"),
])
def test_bad_input_answers_400(stack, body, needle):
    status, _, raw, _ = chat(stack, body)
    assert status == 400, raw[:300]
    assert needle in json.loads(raw)["error"]["message"]


def test_request_size_limit_413(stack):
    big = user([{"type": "input_audio", "input_audio": {"data": b64(sine_wav(8.0)), "format": "wav"}}])
    status, _, raw, _ = chat(stack, big)
    assert status == 413, raw[:300]


def test_speech_request_is_held_while_no_talker_is_reachable(stack, spawn):
    """The thinker answers; the talker role has no reachable replica (scaled to zero):
    the request waits on the talker side, counted in omni_gateway_waiting_requests{role="talker"},
    and after OMNI_UPSTREAM_WAIT_SECONDS ends with a clear error (JSON 503, or an SSE error
    event once the transcript is already streaming)."""
    import re
    import threading
    import time

    thinker = stack["thinker"]
    gw = spawn("gateway", {
        "OMNI_MODEL": "m", "OMNI_UPSTREAM_WAIT_SECONDS": "1",
        "OMNI_THINKER_SERVICE": f"127.0.0.1:{thinker.port}|{thinker.metrics_port}",
        "OMNI_TALKER_SERVICE": f"127.0.0.1:{free_port()}|{free_port()}",
    }).wait_ready()

    def gauges():
        text = gw.metrics_text()
        return {role: float(re.search(r'^omni_gateway_waiting_requests\{role="%s"\} (\S+)$' % role, text, re.M)[1])
                for role in ("thinker", "talker")}

    seen = []

    def watch():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not seen:
            if gauges()["talker"] == 1:
                seen.append(gauges())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    status, _, body, _ = run(post_stream(gw.url + "/v1/chat/completions", _audio_request("Say it.")))
    watcher.join()
    assert status == 503, body[:300]
    assert "no talker replica became available within 1 s" in json.loads(body)["error"]["message"]
    assert seen == [{"thinker": 0.0, "talker": 1.0}]

    status, _, body, _ = run(post_stream(gw.url + "/v1/chat/completions", _audio_request("Say it.", stream=True)))
    assert status == 200
    events = sse_events(body)
    assert events[-1] == "[DONE]" and "no talker replica became available" in events[-2]["error"]["message"]
    assert gauges() == {"thinker": 0.0, "talker": 0.0}
    assert gw.metrics()["omni_gateway_upstream_scrape_errors_total"] >= 1  # the talker's metrics port is dead too


def test_audio_url_reaches_the_thinker_and_adds_audio_tokens(stack):
    """An audio_url data: URL passes the gateway and the transformers thinker reads it: the
    prompt grows by the AuT tokens of the clip (7 for 0.5 s)."""
    text = {"type": "text", "text": "What is this sound?"}
    audio = {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + b64(sine_wav(0.5))}}
    sizes = []
    for content in ([text], [audio, text]):
        status, _, body, _ = chat(stack, user(content))
        assert status == 200, body[:300]
        sizes.append(json.loads(body)["usage"]["prompt_tokens"])
    assert sizes[1] - sizes[0] == 2 + 7  # <|audio_start|><|audio_end|> and the 7 audio pads


@pytest.mark.parametrize("part, needle", [
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(b"\0\0\0\x18ftypmp42")}},
     "video_url input is not supported by the transformers engine"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
     "image_url input is not supported by the transformers engine"),
    ({"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}, "fetches no URLs"),
    ({"type": "audio_url", "audio_url": {"url": "data:audio/mpeg;base64," + b64(b"ID3...")}}, "WAV audio only"),
])
def test_media_the_transformers_engine_cannot_read_is_a_clear_400(stack, part, needle):
    """Valid for the gateway (vLLM takes it), so it is forwarded; the dev engine says why not."""
    for body in (user([part]), _audio_request([part])):
        status, _, raw, _ = chat(stack, body)
        assert status == 400, raw[:300]
        assert needle in json.loads(raw)["error"]["message"]
