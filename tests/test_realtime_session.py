"""Realtime sessions without I/O: the protocol checks, the session state machine (turns,
responses, barge-in, limits, drain), the VAD's segmentation of speech scores, the resampler
and the thinker affinity. The same code over real processes, the real VAD and the OpenAI
SDK: tests/runtime/test_realtime.py."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from omni_runtime.gateway.pools import Affinity, Endpoint
from omni_runtime.gateway.realtime.protocol import SessionConfig
from omni_runtime.gateway.realtime.resample import Resampler, float_to_pcm16
from omni_runtime.gateway.realtime.session import Limits, RealtimeSession
from omni_runtime.gateway.realtime.vad import WINDOW, SpeechSegmenter

pytestmark = pytest.mark.pure

RATE = 24000


def tone(seconds: float, freq: float = 440.0, rate: int = RATE, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def append(seconds: float) -> str:
    return json.dumps({"type": "input_audio_buffer.append",
                       "audio": base64.b64encode(float_to_pcm16(tone(seconds))).decode()})


def ev(kind: str, **fields) -> str:
    return json.dumps({"type": kind, **fields})


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def new_session(manual: bool = True, limits: Limits = Limits(), **config) -> RealtimeSession:
    s = RealtimeSession(SessionConfig("sess_1", "tiny", 0, **config), limits, clock=Clock())
    if manual:
        s.handle(ev("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}}))
    return s


def kinds(out) -> list[str]:
    return [e["type"] for e in out.events]


def speak(s: RealtimeSession, seconds: float, probability: float):
    """Append `seconds` of audio that the VAD scores `probability` throughout."""
    out = s.handle(append(seconds))
    return out.merge(s.speech_probabilities([probability] * len(out.windows)))


# -- resampling ----------------------------------------------------------------------------

def test_resampler_keeps_the_speech_band_removes_what_would_fold_and_streams_exactly():
    x = tone(1.0, 1000.0)
    whole = Resampler(24000, 16000).process(x)
    r = Resampler(24000, 16000)
    pieces = np.concatenate([r.process(x[i:i + 480]) for i in range(0, len(x), 480)])
    assert len(whole) == 16000 and np.array_equal(whole, pieces)
    steady = whole[200:]
    spectrum = np.abs(np.fft.rfft(steady))
    assert abs(np.argmax(spectrum) * 16000 / len(steady) - 1000) < 2
    assert abs(steady.std() * np.sqrt(2) - 0.3) < 0.01
    folded = Resampler(24000, 16000).process(tone(1.0, 10000.0))  # above 8 kHz: would alias to 6 kHz
    assert folded[200:].std() < 1e-3
    assert Resampler(24000, 24000).identity and len(Resampler(16000, 24000).process(whole)) == 24000


# -- the VAD's segmentation ------------------------------------------------------------------

def test_segmenter_starts_at_the_threshold_and_stops_after_the_silence_with_hysteresis():
    seg = SpeechSegmenter(threshold=0.5, silence_duration_ms=100, origin=1000)
    windows = seg.frame(np.zeros(WINDOW * 10 + 7, np.float32))
    assert len(windows) == 10 and len(seg.carry) == 7
    # quiet, speech, a dip above the release threshold (0.35), then 4 quiet windows (128 ms >= 100)
    b = seg.decide([0.1, 0.9, 0.8, 0.4, 0.9, 0.1, 0.2, 0.1, 0.1, 0.1])
    assert [(x.kind, x.sample) for x in b] == [("start", 1000 + WINDOW), ("stop", 1000 + 9 * WINDOW)]
    assert not seg.speaking


# -- turns and responses -------------------------------------------------------------------

def test_manual_turn_response_events_and_the_history_the_next_turn_sends():
    s = new_session()
    assert s.config.turn_detection is None
    created = s.created().events[0]
    assert created["type"] == "session.created" and created["session"]["audio"]["input"]["format"] == {
        "type": "audio/pcm", "rate": 24000}
    assert not s.handle(append(0.5)).events  # buffered silently
    out = s.handle(ev("input_audio_buffer.commit"))
    assert kinds(out) == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    user = out.events[1]["item"]
    assert user["role"] == "user" and user["content"] == [{"type": "input_audio", "transcript": None}]
    s.clock.now += 1.0
    out = s.handle(ev("response.create", response={"instructions": "Be brief."}))
    assert kinds(out) == ["response.created", "response.output_item.added", "conversation.item.added",
                          "response.content_part.added"]
    resp = out.start
    assert resp.answers_turn_at == 100.0 and resp.multimodal
    system, turn = resp.messages
    assert system == {"role": "system", "content": "Be brief."}
    wav = base64.b64decode(turn["content"][0]["input_audio"]["data"])
    assert wav[:4] == b"RIFF" and abs((len(wav) - 44) / 2 / 16000 - 0.5) < 0.01  # 16 kHz for the encoder
    # a second response while one runs is refused, the session goes on
    err = s.handle(ev("response.create", event_id="ev-9")).events[0]
    assert err["error"]["code"] == "conversation_already_has_active_response" and err["error"]["event_id"] == "ev-9"
    d1 = s.response_text(resp, "Hi", 1).events[0]
    assert d1["type"] == "response.output_audio_transcript.delta" and d1["delta"] == "Hi"
    first = s.response_audio(resp, "AAAA", 3840, 3840)
    assert first.first_audio is resp and first.events[0]["type"] == "response.output_audio.delta"
    assert s.response_audio(resp, "AAAA", 3840, 3840).first_audio is None
    done = s.response_finished(resp, "stop", {"prompt_tokens": 40, "completion_tokens": 2})
    assert kinds(done) == ["response.output_audio.done", "response.output_audio_transcript.done",
                           "response.content_part.done", "response.output_item.done", "conversation.item.done",
                           "response.done"]
    final = done.events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["transcript"] == "Hi"
    assert final["usage"]["input_tokens"] == 40 and final["usage"]["output_token_details"]["audio_tokens"] == 0
    # turn 2 carries turn 1 and its answer
    s.handle(ev("conversation.item.create", item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "And?"}]}))
    nxt = s.handle(ev("response.create", response={"output_modalities": ["text"]})).start
    assert [m["role"] for m in nxt.messages] == ["user", "assistant", "user"]
    assert nxt.messages[1]["content"] == "Hi" and nxt.messages[2]["content"] == "And?"
    assert nxt.answers_turn_at is None  # answers a text item, not a spoken turn
    assert s.response_text(nxt, "x", 1).events[0]["type"] == "response.output_text.delta"
    assert s.response_finished(nxt, "length", None).events[-1]["response"]["status"] == "incomplete"


def test_priming_with_assistant_text_and_deleting_items():
    s = new_session()
    a = s.handle(ev("conversation.item.create", item={"id": "prime", "type": "message", "role": "assistant",
                                                      "content": [{"type": "output_text", "text": "Hello!"}]}))
    assert kinds(a) == ["conversation.item.added", "conversation.item.done"]
    first = s.handle(ev("conversation.item.create", previous_item_id="root", item={
        "type": "message", "role": "system", "content": [{"type": "input_text", "text": "Rules."}]}))
    assert first.events[0]["previous_item_id"] is None
    assert [i.id for i in s.conversation.items][1] == "prime"
    assert s.handle(ev("conversation.item.retrieve", item_id="prime")).events[0]["item"]["content"][0]["text"] == "Hello!"
    assert kinds(s.handle(ev("conversation.item.delete", item_id="prime"))) == ["conversation.item.deleted"]
    assert s.handle(ev("conversation.item.delete", item_id="prime")).events[0]["error"]["code"] == "item_not_found"


@pytest.mark.parametrize("raw, code", [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    ("[" * 100000, "invalid_json"),
    (ev("no.such.event"), "invalid_value"),
    (ev("output_audio_buffer.clear"), "unsupported_event"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}), "invalid_base64"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}), "invalid_audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 5}), "invalid_type"),
    (ev("input_audio_buffer.commit"), "input_audio_buffer_commit_empty"),
    (ev("response.cancel"), "response_cancel_not_active"),
    (ev("response.create"), "conversation_empty"),
    (ev("session.update", session={"type": "transcription"}), "unsupported_parameter"),
    (ev("session.update", session={"audio": {"input": {"format": {"type": "audio/pcmu"}}}}), "unsupported_parameter"),
    (ev("session.update", session={"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}),
     "unsupported_parameter"),
    (ev("session.update", session={"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}}),
     "invalid_value"),
    (ev("session.update", session={"tools": [{"type": "function", "name": "f"}]}), "unsupported_parameter"),
    (ev("session.update", session={"output_modalities": ["text", "audio"]}), "invalid_value"),
    (ev("session.update", session={"frobnicate": 1}), "unknown_parameter"),
    (ev("conversation.item.create", item={"type": "function_call"}), "unsupported_parameter"),
    (ev("conversation.item.create", item={"type": "message", "role": "user",
                                          "content": [{"type": "output_text", "text": "x"}]}), "invalid_value"),
    (ev("response.create", response={"conversation": "none"}), "unsupported_parameter"),
    (ev("response.create", response={"max_output_tokens": True}), "invalid_type"),
])
def test_bad_events_get_an_error_naming_them_and_change_nothing(raw, code):
    s = new_session()
    before = s.config
    out = s.handle(raw)
    assert kinds(out) == ["error"] and out.events[0]["error"]["code"] == code, out.events
    assert out.start is None and s.config == before and not s.conversation.items
    # the session still works
    assert kinds(s.handle(ev("session.update", session={"instructions": "ok"}))) == ["session.updated"]


def test_server_vad_turns_and_barge_in_keep_only_the_text_that_was_heard():
    s = new_session(manual=False)
    assert s.config.turn_detection.silence_duration_ms == 500
    assert not speak(s, 0.5, 0.05).events
    started = speak(s, 1.0, 0.95)
    assert kinds(started) == ["input_audio_buffer.speech_started"]
    # 0.5 s made 15 whole windows: the first speech-scored one starts at 480 ms, less the padding
    assert started.events[0]["audio_start_ms"] == 15 * 32 - 300
    stopped = speak(s, 0.7, 0.02)  # 500 ms of silence ends the turn
    assert kinds(stopped)[:4] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                  "conversation.item.added", "conversation.item.done"]
    assert "response.created" in kinds(stopped) and stopped.start is not None  # create_response
    item = s.conversation.get(stopped.events[0]["item_id"])
    assert 1.75 < item.audio_seconds < 1.85  # 0.3 s padding + 1 s speech + 0.5 s silence up to the stop
    resp = stopped.start
    resp.samples_per_code = 1920
    for i, word in enumerate(["one ", "two ", "three ", "four "]):
        s.response_text(resp, word, i + 1)
    s.response_audio(resp, "AAAA", 2 * 1920 * 2, 2 * 1920)  # two codec frames: "one two " was spoken
    barge = speak(s, 0.1, 0.99)
    assert barge.barge_in and barge.cancel is resp
    assert kinds(barge)[0] == "input_audio_buffer.speech_started" and kinds(barge)[-1] == "response.done"
    done = barge.events[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    assert done["output"][0]["content"][0]["transcript"] == "one two "
    assert s.conversation.get(resp.item.id).text == "one two "
    assert not s.response_audio(resp, "AAAA", 4, 2).events  # late output of a cancelled response goes nowhere
    assert not s.response_finished(resp, "stop", None).events
    # the client says it played 80 ms of the answer (one frame): the item keeps one word
    out = s.handle(ev("conversation.item.truncate", item_id=resp.item.id, content_index=0, audio_end_ms=80))
    assert kinds(out) == ["conversation.item.truncated"] and s.conversation.get(resp.item.id).text == "one "
    assert s.handle(ev("conversation.item.truncate", item_id=resp.item.id, audio_end_ms=5000)
                    ).events[0]["error"]["code"] == "invalid_value"


def test_response_cancel_and_failure_end_with_their_status():
    s = new_session()
    s.handle(ev("conversation.item.create", item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hi"}]}))
    resp = s.handle(ev("response.create")).start
    wrong = s.handle(ev("response.cancel", response_id="resp_other")).events[0]
    assert wrong["error"]["code"] == "invalid_value"
    out = s.handle(ev("response.cancel", response_id=resp.id))
    assert out.cancel is resp and not out.barge_in
    assert out.events[-1]["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    resp2 = s.handle(ev("response.create")).start
    failed = s.response_failed(resp2, "the thinker answered 400: too long").events[-1]["response"]
    assert failed["status"] == "failed" and "too long" in failed["status_details"]["error"]["message"]
    assert s.response is None


def test_buffer_cap_manual_refuses_and_server_vad_ends_the_turn():
    manual = new_session(limits=Limits(max_buffer_seconds=1.0))
    assert not manual.handle(append(0.8)).events
    assert manual.handle(append(0.5)).events[0]["error"]["code"] == "input_audio_buffer_full"
    assert kinds(manual.handle(ev("input_audio_buffer.clear"))) == ["input_audio_buffer.cleared"]
    assert not manual.handle(append(0.5)).events
    vad = new_session(manual=False, limits=Limits(max_buffer_seconds=1.0))
    speak(vad, 0.6, 0.9)
    out = speak(vad, 0.6, 0.9)
    assert "input_audio_buffer.speech_stopped" in kinds(out) and out.start is not None


def test_history_limits_drop_the_oldest_items():
    s = new_session(limits=Limits(max_items=3))
    ids = []
    for i in range(4):
        out = s.handle(ev("conversation.item.create", item={"type": "message", "role": "user",
                                                            "content": [{"type": "input_text", "text": str(i)}]}))
        ids.append(out.events[-1]["item"]["id"])
    assert kinds(out) == ["conversation.item.deleted", "conversation.item.added", "conversation.item.done"]
    assert out.events[0]["item_id"] == ids[0] and [i.id for i in s.conversation.items] == ids[1:]
    wordy = new_session(limits=Limits(max_text_chars=10))
    for text in ("abcdef", "ghijkl"):
        out = wordy.handle(ev("conversation.item.create", item={"type": "message", "role": "user",
                                                                "content": [{"type": "input_text", "text": text}]}))
    assert kinds(out)[0] == "conversation.item.deleted" and [i.text for i in wordy.conversation.items] == ["ghijkl"]


def test_drain_closes_idle_sessions_now_and_busy_ones_after_their_response():
    idle = new_session()
    assert idle.drain().close
    busy = new_session()
    busy.handle(ev("conversation.item.create", item={"type": "message", "role": "user",
                                                     "content": [{"type": "input_text", "text": "Hi"}]}))
    resp = busy.handle(ev("response.create")).start
    assert not busy.drain().close
    assert busy.handle(ev("response.create")).events[0]["error"]["code"] == "conversation_already_has_active_response"
    assert busy.response_finished(resp, "stop", None).close


# -- thinker affinity ------------------------------------------------------------------------

def test_affinity_prefers_its_endpoint_while_it_can_take_requests():
    a, b = Endpoint("10.0.0.1", 8000), Endpoint("10.0.0.2", 8000)
    aff = Affinity()
    assert aff.order([a, b], 0.0) == [a, b]
    assert not aff.settle(b)  # the first choice is not a move
    assert aff.order([a, b], 0.0) == [b, a]
    b.down_until = 5.0  # refused or answered 503 (draining): passed over until then
    assert aff.order([a, b], 1.0) == [a, b]
    assert aff.settle(a) and aff.order([b, a], 6.0) == [a, b]
    assert aff.order([b], 6.0) == [b]  # gone from DNS (not Ready): any other
