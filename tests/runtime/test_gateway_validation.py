"""The gateway's pure parts: chat request validation (media URL parts included), reading a
thinker's stream, and the payloads it builds. No processes, no torch."""

from __future__ import annotations

import base64
import json

import pytest

from omni_runtime.gateway.mm_states import check_mm_object, is_final
from omni_runtime.gateway.speech import talker_payload, thinker_request
from omni_runtime.gateway.sse import ThinkerReply, split_events
from omni_runtime.gateway.validation import BadRequest, validate_chat
from omni_runtime.media import MediaError, decode_data_url

from .helpers import sine_wav

pytestmark = pytest.mark.pure

WAV = sine_wav(0.05)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body(*parts, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}], **extra}


def url_part(kind: str, url: str) -> dict:
    return {"type": kind, kind: {"url": url}}


@pytest.mark.parametrize("part", [
    url_part("image_url", "https://example.com/cat.png"),
    url_part("image_url", "data:image/png;base64," + b64(b"\x89PNG....")),
    url_part("audio_url", "http://media.svc:8080/a.mp3?sig=abc"),
    url_part("audio_url", "data:audio/wav;base64," + b64(WAV)),
    url_part("audio_url", "data:audio/mpeg;base64," + b64(b"ID3 not checked here")),
    url_part("video_url", "https://example.com/clip.mp4"),
    url_part("video_url", "data:video/mp4;base64," + b64(b"\x00\x00\x00\x18ftypmp42")),
    # vLLM reads video/jpeg data as comma-separated base64 frames
    url_part("video_url", "data:video/jpeg;base64," + ",".join([b64(b"\xff\xd8frame1"), b64(b"\xff\xd8frame2")])),
    {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}},
])
def test_media_parts_accepted_and_marked_multimodal(part):
    opts = validate_chat(body({"type": "text", "text": "what is this?"}, part))
    assert opts.multimodal and not opts.audio_out


def test_text_only_is_not_multimodal():
    assert not validate_chat(body({"type": "text", "text": "hi"})).multimodal
    assert not validate_chat({"messages": [{"role": "user", "content": "hi"}]}).multimodal


@pytest.mark.parametrize("part, needle", [
    (url_part("video_url", "ftp://example.com/clip.mp4"), "http(s) or data: URL"),
    (url_part("video_url", "file:///etc/passwd"), "http(s) or data: URL"),
    (url_part("audio_url", "/relative/a.wav"), "http(s) or data: URL"),
    (url_part("image_url", "https:///no-host.png"), "no host"),
    (url_part("video_url", "https://example.com/a b.mp4"), "whitespace"),
    (url_part("video_url", "https://example.com/" + "x" * 9000), "longer than 8192"),
    (url_part("video_url", "data:video/mp4;base64,@@@@"), "not valid base64"),
    (url_part("video_url", "data:video/mp4;base64,"), "non-empty base64"),
    (url_part("video_url", "data:video/jpeg;base64," + b64(b"f1") + ",%%%"), "frame 1 of the video/jpeg data"),
    (url_part("audio_url", "data:image/png;base64," + b64(b"png")), "data:audio/<type>;base64"),
    (url_part("video_url", "data:audio/wav;base64," + b64(WAV)), "data:video/<type>;base64"),
    (url_part("audio_url", "data:audio/wav," + b64(WAV)), "must be base64"),
    (url_part("audio_url", "data:audio/wav;base64"), "no ','"),
    (url_part("audio_url", "data:audio/wav;base64," + b64(b"RIFX....WAVE")), "not a WAV file"),
    ({"type": "video_url", "video_url": "https://example.com/clip.mp4"}, "video_url.url must be"),
    ({"type": "audio_url", "audio_url": {}}, "audio_url.url must be"),
    ({"type": "video", "video": "x"}, "unknown content part type 'video'"),
    ({"type": "input_audio", "input_audio": {"data": b64(b"1234"), "format": "flac"}}, "unsupported audio format"),
])
def test_bad_media_parts_name_the_part_and_the_problem(part, needle):
    with pytest.raises(BadRequest) as e:
        validate_chat(body({"type": "text", "text": "x"}, part))
    assert needle in str(e.value)
    assert str(e.value).startswith("messages[0].content[1]")


def test_media_size_limit_per_item():
    big = sine_wav(0.5)  # 16 kB of PCM
    for part in (url_part("audio_url", "data:audio/wav;base64," + b64(big)),
                 {"type": "input_audio", "input_audio": {"data": b64(big), "format": "wav"}},
                 url_part("video_url", "data:video/jpeg;base64," + ",".join([b64(big[:9000]), b64(big[9000:])]))):
        assert validate_chat(body(part), max_media_bytes=len(big)).multimodal
        with pytest.raises(BadRequest, match=f"{len(big)} bytes, more than the {len(big) - 1} allowed"):
            validate_chat(body(part), max_media_bytes=len(big) - 1)
    # http(s) media is fetched by the thinker under its own limits
    assert validate_chat(body(url_part("video_url", "https://e.com/v.mp4")), max_media_bytes=1).multimodal


def test_audio_output_options():
    opts = validate_chat(body({"type": "text", "text": "x"}, modalities=["text", "audio"], stream=True,
                              audio={"voice": "Chelsie", "format": "pcm16"}))
    assert (opts.audio_out, opts.voice, opts.format, opts.stream) == (True, "Chelsie", "pcm16", True)
    with pytest.raises(BadRequest, match="n=1"):
        validate_chat(body({"type": "text", "text": "x"}, modalities=["audio"], n=2))
    with pytest.raises(BadRequest, match="output audio format"):
        validate_chat(body({"type": "text", "text": "x"}, modalities=["audio"], audio={"format": "flac"}))


def test_decode_data_url_reads_types_like_vllm():
    assert decode_data_url("data:Audio/WAV;codecs=1;base64," + b64(b"abc"), "audio") == ("audio/wav", [b"abc"])
    with pytest.raises(MediaError):
        decode_data_url("data:;base64," + b64(b"abc"), "audio")


def test_split_events_keeps_the_incomplete_tail():
    raw = b'data: {"a": 1}\n\ndata: [DONE]\n\ndata: {"b"'
    events, rest = split_events(raw)
    assert events == [b'{"a": 1}'] and rest == b'data: {"b"'
    events, rest = split_events(rest + b': 2}\n\n')
    assert [json.loads(e) for e in events] == [{"b": 2}] and rest == b""


def test_thinker_reply_accumulates_text_ids_and_prefill_signal():
    r = ThinkerReply(model="asked")
    assert r.feed({"model": "m1", "prompt_token_ids": [1, 2, 3],
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) == ""
    assert r.prompt_ids == [1, 2, 3] and not r.tokens_seen and r.model == "m1"
    assert r.feed({"choices": [{"delta": {"content": "Hel"}, "token_ids": [7, 8]}]}) == "Hel"
    assert r.tokens_seen
    r.feed({"choices": [{"delta": {"content": "lo"}, "token_ids": [9], "finish_reason": "stop"}],
            "usage": {"completion_tokens": 3}})
    assert (r.text, r.response_ids, r.finish, r.usage) == ("Hello", [7, 8, 9], "stop", {"completion_tokens": 3})


def test_thinker_request_and_talker_payload():
    b = body({"type": "text", "text": "x"}, modalities=["text", "audio"], audio={"voice": "Ethan"}, max_tokens=5)
    req = thinker_request(b)
    assert "modalities" not in req and "audio" not in req and "audio" in b["modalities"]
    assert req["stream"] is True and req["return_token_ids"] is True and req["max_tokens"] == 5
    reply = ThinkerReply(prompt_ids=[1, 2], response_ids=[3])
    mm = {"layer": 24, "dtype": "bfloat16", "shape": [1, 2], "data": b64(b"\0" * 4)}
    p = talker_payload(reply, "Ethan", "chatcmpl-x", mm, {"max_codes": 8})
    assert p == {"v": 1, "request_id": "chatcmpl-x", "speaker": "Ethan", "prompt_ids": [1, 2], "response_ids": [3],
                 "mm": mm, "format": "pcm", "generation": {"max_codes": 8}}
    assert check_mm_object(mm) is mm
    for bad in (None, [], {"shape": [1, 2]}, {"data": "", "shape": "1x2"}):
        with pytest.raises(ValueError):
            check_mm_object(bad)


def test_a_final_404_means_the_states_will_never_come():
    assert is_final(b'{"error": "prefix served from cache", "final": true}')
    assert not is_final(b'{"error": "not captured yet"}')
    assert not is_final(b'{"final": "yes"}') and not is_final(b"<html>not found</html>")
