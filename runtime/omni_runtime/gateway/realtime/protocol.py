"""The OpenAI Realtime (GA) protocol subset this gateway speaks: session settings, what a
client event may hold, server event envelopes and errors. Pure: no I/O, no audio.

Anything the subset does not implement is refused with an `error` event that names the
parameter, never silently ignored (docs/realtime.md lists the subset).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass, field, replace

INPUT_RATE = 24000  # audio/pcm: PCM16 mono little-endian, 24 kHz in both directions
AUDIO_FORMAT = {"type": "audio/pcm", "rate": INPUT_RATE}
DEFAULT_VOICE = "Ethan"  # a Qwen3-Omni speaker (the talker's config lists them)
MAX_OUTPUT_TOKENS = 4096

SUPPORTED_EVENTS = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "conversation.item.delete", "conversation.item.retrieve",
    "conversation.item.truncate", "response.create", "response.cancel",
)
REFUSED_EVENTS = {
    "output_audio_buffer.clear": "output_audio_buffer.clear is for WebRTC and SIP connections; this is a WebSocket",
    "transcription_session.update": "transcription sessions are not served; use a realtime session",
}


class ProtocolError(Exception):
    """A client event this session refuses; becomes an `error` event (the session stays open)."""

    def __init__(self, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.param, self.kind = code, param, kind


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def event(kind: str, **fields) -> dict:
    """A server event: its type, a fresh event_id, then the fields."""
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(exc: ProtocolError, client_event_id: str | None = None) -> dict:
    return event("error", error={"type": exc.kind, "code": exc.code, "message": str(exc), "param": exc.param,
                                 "event_id": client_event_id})


def parse_event(text: str) -> dict:
    """One client event from a text frame: a JSON object with a string `type`."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        raise ProtocolError("invalid_json", "the event is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_json", "an event must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("missing_required_parameter", "an event needs a string 'type'", "type")
    event_id = obj.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise ProtocolError("invalid_type", "event_id must be a string", "event_id")
    if kind in REFUSED_EVENTS:
        raise ProtocolError("unsupported_event", REFUSED_EVENTS[kind], "type")
    if kind not in SUPPORTED_EVENTS:
        raise ProtocolError("invalid_value", f"unknown event type {kind[:80]!r}; supported: "
                                             f"{', '.join(SUPPORTED_EVENTS)}", "type")
    return obj


# -- checks on parameters --------------------------------------------------------------

def check_keys(obj, allowed, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_type", f"{where} must be an object", where)
    for key in obj:
        if key not in allowed:
            raise ProtocolError("unknown_parameter", f"unknown parameter '{where}.{key}'", f"{where}.{key}")
    return obj


def number(value, where: str, lo: float, hi: float, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ProtocolError("invalid_type", f"{where} must be {'an integer' if integer else 'a number'}", where)
    if not lo <= value <= hi:
        raise ProtocolError("invalid_value", f"{where} must be between {lo:g} and {hi:g}", where)
    return value


def string(value, where: str, max_len: int = 256, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise ProtocolError("invalid_type", f"{where} must be a {'' if empty else 'non-empty '}string", where)
    if len(value) > max_len:
        raise ProtocolError("invalid_value", f"{where} is longer than {max_len} characters", where)
    return value


def pcm16(value, where: str) -> bytes:
    """Base64 PCM16 (whole samples), as input_audio_buffer.append and input_audio parts carry it."""
    if not isinstance(value, str):
        raise ProtocolError("invalid_type", f"{where} must be a base64 string", where)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_base64", f"{where} is not valid base64", where) from None
    if len(raw) % 2:
        raise ProtocolError("invalid_audio", f"{where} is not PCM16: an odd number of bytes", where)
    return raw


def flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError("invalid_type", f"{where} must be true or false", where)
    return value


def unsupported(where: str, why: str) -> ProtocolError:
    return ProtocolError("unsupported_parameter", f"{where}: {why}", where)


def only_null(obj: dict, key: str, where: str, why: str) -> None:
    if obj.get(key) is not None:
        raise unsupported(f"{where}.{key}", why)


def audio_format(value, where: str) -> None:
    """Only audio/pcm at 24 kHz (G.711 audio/pcmu and audio/pcma are not served)."""
    check_keys(value, ("type", "rate"), where)
    if value.get("type", "audio/pcm") != "audio/pcm":
        raise unsupported(f"{where}.type", "only audio/pcm (PCM16 mono 24 kHz) is served")
    if value.get("rate", INPUT_RATE) != INPUT_RATE:
        raise unsupported(f"{where}.rate", f"audio/pcm is {INPUT_RATE} Hz")


def modalities(value, where: str) -> tuple[str, ...]:
    if value not in (["audio"], ["text"]):
        raise ProtocolError("invalid_value", f"{where} must be [\"audio\"] (speech and its transcript) or "
                                             "[\"text\"]", where)
    return tuple(value)


def max_tokens(value, where: str) -> int | None:
    if value == "inf":
        return None
    return number(value, where, 1, MAX_OUTPUT_TOKENS, integer=True)


def voice(value, where: str) -> str:
    if isinstance(value, dict):
        raise unsupported(where, "custom voice objects are not served; name a speaker of the model")
    return string(value, where, 64)


def answer_settings(obj: dict, where: str) -> dict:
    """What a session sets for its responses and a response.create may override."""
    changes: dict = {}
    if "output_modalities" in obj:
        changes["output_modalities"] = modalities(obj["output_modalities"], f"{where}.output_modalities")
    if "instructions" in obj:
        changes["instructions"] = string(obj["instructions"], f"{where}.instructions", 200_000, empty=True)
    if "max_output_tokens" in obj:
        changes["max_output_tokens"] = max_tokens(obj["max_output_tokens"], f"{where}.max_output_tokens")
    return changes


def no_tools(obj: dict, where: str) -> None:
    if obj.get("tools") not in (None, []):
        raise unsupported(f"{where}.tools", "tools and function calling are not served")
    if obj.get("tool_choice") not in (None, "auto", "none"):
        raise unsupported(f"{where}.tool_choice", "tools and function calling are not served")
    for key, why in (("prompt", "prompt templates are not served"), ("reasoning", "not a reasoning model")):
        only_null(obj, key, where, why)


# -- session settings ------------------------------------------------------------------

@dataclass(frozen=True)
class TurnDetection:
    """`server_vad` settings (OpenAI's defaults)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    def to_json(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response, "idle_timeout_ms": None}

    @classmethod
    def parse(cls, obj, where: str) -> "TurnDetection | None":
        if obj is None:
            return None  # manual turns: the client commits and asks for responses
        check_keys(obj, ("type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
                         "interrupt_response", "idle_timeout_ms", "eagerness"), where)
        if obj.get("type") != "server_vad":
            raise unsupported(f"{where}.type", "only server_vad turn detection is served (or null for manual turns)")
        only_null(obj, "idle_timeout_ms", where, "idle timeouts are not served")
        only_null(obj, "eagerness", where, "eagerness belongs to semantic_vad, which is not served")
        d = cls()
        return cls(
            threshold=float(number(obj.get("threshold", d.threshold), f"{where}.threshold", 0.0, 1.0)),
            prefix_padding_ms=number(obj.get("prefix_padding_ms", d.prefix_padding_ms), f"{where}.prefix_padding_ms",
                                     0, 10000, integer=True),
            silence_duration_ms=number(obj.get("silence_duration_ms", d.silence_duration_ms),
                                       f"{where}.silence_duration_ms", 0, 10000, integer=True),
            create_response=flag(obj.get("create_response", d.create_response), f"{where}.create_response"),
            interrupt_response=flag(obj.get("interrupt_response", d.interrupt_response),
                                    f"{where}.interrupt_response"))


SESSION_KEYS = ("type", "model", "instructions", "output_modalities", "max_output_tokens", "audio", "tools",
                "tool_choice", "truncation", "tracing", "include", "prompt", "reasoning", "parallel_tool_calls",
                "id", "object", "expires_at")


@dataclass(frozen=True)
class SessionConfig:
    id: str
    model: str
    expires_at: int
    instructions: str = ""
    output_modalities: tuple[str, ...] = ("audio",)
    voice: str = DEFAULT_VOICE
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    max_output_tokens: int | None = None  # None: "inf" (the thinker's own limit)

    def to_json(self) -> dict:
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
            "expires_at": self.expires_at, "instructions": self.instructions,
            "output_modalities": list(self.output_modalities),
            "max_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens,
            "tools": [], "tool_choice": "auto", "truncation": "auto", "tracing": None, "include": None,
            "prompt": None,
            "audio": {
                "input": {"format": dict(AUDIO_FORMAT), "transcription": None, "noise_reduction": None,
                          "turn_detection": self.turn_detection.to_json() if self.turn_detection else None},
                "output": {"format": dict(AUDIO_FORMAT), "voice": self.voice, "speed": 1.0},
            },
        }

    def updated(self, obj) -> "SessionConfig":
        """This session with a `session.update`'s `session` object applied (all or nothing)."""
        s = check_keys(obj, SESSION_KEYS, "session")
        if s.get("type", "realtime") != "realtime":
            raise unsupported("session.type", "only realtime sessions are served (no transcription sessions)")
        changes = answer_settings(s, "session")
        if "model" in s:
            changes["model"] = string(s["model"], "session.model")
        no_tools(s, "session")
        if s.get("truncation") not in (None, "auto"):
            raise unsupported("session.truncation", "only auto: the oldest items are dropped once the conversation "
                                                    "holds more user audio or items than the gateway keeps")
        for key, why in (("tracing", "tracing is not served"), ("include", "input transcription is not served")):
            if s.get(key) not in (None, []):
                raise unsupported(f"session.{key}", why)
        if "audio" in s:
            changes.update(self._audio(s["audio"]))
        return replace(self, **changes)

    @staticmethod
    def _audio(obj) -> dict:
        audio = check_keys(obj, ("input", "output"), "session.audio")
        changes: dict = {}
        if audio.get("input") is not None:
            inp = check_keys(audio["input"], ("format", "turn_detection", "transcription", "noise_reduction"),
                             "session.audio.input")
            if inp.get("format") is not None:
                audio_format(inp["format"], "session.audio.input.format")
            only_null(inp, "transcription", "session.audio.input", "input transcription is not served")
            only_null(inp, "noise_reduction", "session.audio.input", "noise reduction is not served")
            if "turn_detection" in inp:
                changes["turn_detection"] = TurnDetection.parse(inp["turn_detection"],
                                                                "session.audio.input.turn_detection")
        if audio.get("output") is not None:
            out = check_keys(audio["output"], ("format", "voice", "speed"), "session.audio.output")
            if out.get("format") is not None:
                audio_format(out["format"], "session.audio.output.format")
            if out.get("speed", 1.0) != 1.0:
                raise unsupported("session.audio.output.speed", "only speed 1.0 is served")
            if "voice" in out:
                changes["voice"] = voice(out["voice"], "session.audio.output.voice")
        return changes


# -- response.create -------------------------------------------------------------------

RESPONSE_KEYS = ("output_modalities", "instructions", "audio", "max_output_tokens", "metadata", "conversation",
                 "input", "tools", "tool_choice", "prompt", "reasoning", "parallel_tool_calls")


@dataclass(frozen=True)
class ResponseParams:
    """One response's settings: the session's, with the response.create's overrides."""

    output_modalities: tuple[str, ...]
    instructions: str
    voice: str
    max_output_tokens: int | None
    metadata: dict | None = None

    @property
    def audio(self) -> bool:
        return "audio" in self.output_modalities

    @classmethod
    def parse(cls, obj, session: SessionConfig) -> "ResponseParams":
        p = check_keys(obj if obj is not None else {}, RESPONSE_KEYS, "response")
        no_tools(p, "response")
        if p.get("conversation") not in (None, "auto"):
            raise unsupported("response.conversation", "out-of-band responses are not served; responses answer "
                                                       "the session's conversation")
        if p.get("input") is not None:
            raise unsupported("response.input", "responses answer the session's conversation; add items with "
                                                "conversation.item.create")
        params = cls(session.output_modalities, session.instructions, session.voice, session.max_output_tokens)
        changes = answer_settings(p, "response")
        if p.get("audio") is not None:
            audio = check_keys(p["audio"], ("output",), "response.audio")
            out = check_keys(audio.get("output") or {}, ("format", "voice"), "response.audio.output")
            if out.get("format") is not None:
                audio_format(out["format"], "response.audio.output.format")
            if "voice" in out:
                changes["voice"] = voice(out["voice"], "response.audio.output.voice")
        if p.get("metadata") is not None:
            meta = p["metadata"]
            if not isinstance(meta, dict) or len(meta) > 16 or not all(
                    isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                    for k, v in meta.items()):
                raise ProtocolError("invalid_value", "response.metadata must map at most 16 keys to strings "
                                                     "(keys up to 64, values up to 512 characters)",
                                    "response.metadata")
            changes["metadata"] = dict(meta)
        return replace(params, **changes)
