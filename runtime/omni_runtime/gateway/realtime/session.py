"""One realtime session as a state machine: client events and speech probabilities in,
server events and what to do (start a response, stop one, score audio) out. No I/O: the
WebSocket handler (endpoint.py) feeds it and carries out its `Outcome`s, and the response
runner (responder.py) reports a response's text and audio through it, so that every server
event is built here, in order, against the current state.

A response the session no longer runs (cancelled, or superseded) gets no more events: once
`cancel` is decided nothing it produces later reaches the client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from omni_runtime.gateway.realtime.conversation import Conversation, Item, Part, audio_part, parse_item
from omni_runtime.gateway.realtime.protocol import (INPUT_RATE, ProtocolError, ResponseParams, SessionConfig,
                                                    error_event, event, new_id, number, parse_event, pcm16, string)
from omni_runtime.gateway.realtime.resample import MODEL_RATE, Resampler, float_to_pcm16, pcm16_to_float
from omni_runtime.gateway.realtime.vad import SpeechSegmenter

MIN_COMMIT_MS = 100  # as OpenAI: a commit needs at least 100 ms of audio


@dataclass(frozen=True)
class Limits:
    max_buffer_seconds: float = 120.0      # audio awaiting a commit
    max_history_audio_seconds: float = 180.0
    max_items: int = 1000
    max_text_chars: int = 1_000_000  # far beyond any thinker context; bounds what a client can pile up


@dataclass
class Response:
    """One response in progress: what it was asked, and what of it reached the client."""

    id: str
    params: ResponseParams
    item: Item
    messages: list[dict]
    multimodal: bool
    answers_turn_at: float | None  # when the user turn it answers was committed (voice-to-voice)
    text: str = ""
    tokens: int = 0                # response tokens the thinker has written
    checkpoints: list[tuple[int, int]] = field(default_factory=list)  # (tokens, len(text)) after each delta
    audio_bytes: int = 0           # 24 kHz PCM16 sent
    talker_samples: int = 0        # the same audio in samples at the talker's rate
    samples_per_code: int = 0      # the talker's samples per codec frame (its X-Omni-Samples-Per-Code)
    talker_rate: int = INPUT_RATE
    status: str = "in_progress"

    @property
    def codes_sent(self) -> int:
        return self.talker_samples // self.samples_per_code if self.samples_per_code else 0

    def heard_text(self, codes: int | None = None) -> str:
        """The text whose speech was sent: the talker speaks one response token per codec
        frame, so `codes` frames carry the first `codes` tokens (to the last thinker chunk
        within them). Text-only responses: all of it."""
        if not self.params.audio:
            return self.text
        codes = self.codes_sent if codes is None else codes
        cut = 0
        for tokens, length in self.checkpoints:
            if tokens > codes:
                break
            cut = length
        return self.text[:cut]

    def usage(self, thinker: dict | None) -> dict:
        thinker = thinker or {}
        text_tokens = thinker.get("completion_tokens", self.tokens)
        audio_tokens = self.codes_sent
        prompt = thinker.get("prompt_tokens")
        cached = (thinker.get("prompt_tokens_details") or {}).get("cached_tokens")
        return {"input_tokens": prompt, "output_tokens": text_tokens + audio_tokens,
                "total_tokens": (prompt or 0) + text_tokens + audio_tokens,
                "input_token_details": {"cached_tokens": cached},
                "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens}}


@dataclass
class Outcome:
    """What the handler must do after a step, in this order: send `events`, stop `cancel`'s
    work, score `windows` (then call `speech_probabilities`), start `start`, close."""

    events: list[dict] = field(default_factory=list)
    cancel: Response | None = None
    barge_in: bool = False          # `cancel` was the user speaking over the response
    windows: list[np.ndarray] = field(default_factory=list)
    start: Response | None = None
    first_audio: Response | None = None
    finished: Response | None = None
    close: bool = False             # draining and nothing left in progress

    def merge(self, other: "Outcome") -> "Outcome":
        self.events += other.events
        self.windows += other.windows
        for name in ("cancel", "start", "first_audio", "finished"):
            setattr(self, name, getattr(other, name) or getattr(self, name))
        self.barge_in = self.barge_in or other.barge_in
        self.close = self.close or other.close
        return self


class AudioBuffer:
    """The input audio awaiting a commit, 16 kHz PCM16, addressed by stream position."""

    def __init__(self):
        self.chunks: list[tuple[int, bytes]] = []
        self.start = self.end = 0

    @property
    def samples(self) -> int:
        return self.end - self.start

    def append(self, pcm: bytes) -> None:
        if pcm:
            self.chunks.append((self.end, pcm))
            self.end += len(pcm) // 2

    def take(self, start: int, end: int) -> bytes:
        out = bytearray()
        for at, pcm in self.chunks:
            lo, hi = max(start, at), min(end, at + len(pcm) // 2)
            if hi > lo:
                out += pcm[(lo - at) * 2:(hi - at) * 2]
        return bytes(out)

    def discard_before(self, pos: int) -> None:
        pos = min(max(pos, self.start), self.end)
        keep = [(at, pcm) for at, pcm in self.chunks if at + len(pcm) // 2 > pos]
        if keep and keep[0][0] < pos:
            at, pcm = keep[0]
            keep[0] = (pos, pcm[(pos - at) * 2:])
        self.chunks, self.start = keep, pos


def ms(samples: int) -> int:
    return samples * 1000 // MODEL_RATE


class RealtimeSession:
    def __init__(self, config: SessionConfig, limits: Limits = Limits(), clock: Callable[[], float] = time.monotonic):
        self.config, self.limits, self.clock = config, limits, clock
        self.conversation = Conversation(limits.max_history_audio_seconds, limits.max_items, limits.max_text_chars)
        self.buffer = AudioBuffer()
        self.resampler = Resampler(INPUT_RATE, MODEL_RATE)
        self.segmenter: SpeechSegmenter | None = None
        self.speech_from: int | None = None    # where the speech being heard starts (padding included)
        self.next_user_item: str | None = None
        self.committed: tuple[str, float] | None = None  # (item id, when) of the last committed audio turn
        self.response: Response | None = None
        self.done: dict[str, Response] = {}    # finished responses by item id (conversation.item.truncate)
        self.draining = False
        self._vad_from_config()

    def created(self) -> Outcome:
        return Outcome([event("session.created", session=self.config.to_json())])

    # -- client events -----------------------------------------------------------------

    def handle(self, text: str) -> Outcome:
        event_id = None
        try:
            obj = parse_event(text)
            event_id = obj.get("event_id")
            return getattr(self, "_on_" + obj["type"].replace(".", "_"))(obj)
        except ProtocolError as exc:
            return Outcome([error_event(exc, event_id)])

    def _on_session_update(self, obj) -> Outcome:
        if "session" not in obj:
            raise ProtocolError("missing_required_parameter", "session.update needs a session object", "session")
        before = self.config.turn_detection
        self.config = self.config.updated(obj["session"])
        if self.config.turn_detection != before:
            self._vad_from_config()
        return Outcome([event("session.updated", session=self.config.to_json())])

    def _vad_from_config(self) -> None:
        td = self.config.turn_detection
        self.speech_from = None
        self.segmenter = SpeechSegmenter(td.threshold, td.silence_duration_ms, self.buffer.end) if td else None

    def _on_input_audio_buffer_append(self, obj) -> Outcome:
        raw = pcm16(obj.get("audio"), "audio")
        cap = int(self.limits.max_buffer_seconds * MODEL_RATE)
        held = self.buffer.end - (self.speech_from if self.speech_from is not None else self.buffer.start)
        if self.segmenter is None and held + len(raw) // 2 * MODEL_RATE // INPUT_RATE > cap:
            raise ProtocolError("input_audio_buffer_full", f"the input audio buffer holds at most "
                                                           f"{self.limits.max_buffer_seconds:g} s; commit or clear it",
                                "audio")
        samples = self.resampler.process(pcm16_to_float(raw))
        self.buffer.append(float_to_pcm16(samples))
        out = Outcome()
        if self.segmenter is not None:
            out.windows = self.segmenter.frame(samples)  # every sample, so windows keep their stream positions
            if self.speech_from is not None and self.buffer.end - self.speech_from > cap:
                # server VAD: a turn this long ends here, as if the speaker had paused
                out.merge(self._speech_stopped(self.buffer.end))
        return out

    def speech_probabilities(self, probabilities: list[float]) -> Outcome:
        """The VAD's scores of the windows the last Outcome asked for."""
        out = Outcome()
        if self.segmenter is None:
            return out
        td = self.config.turn_detection
        for b in self.segmenter.decide(probabilities):
            if b.kind == "start":
                self.speech_from = max(self.buffer.start, b.sample - td.prefix_padding_ms * MODEL_RATE // 1000)
                self.next_user_item = new_id("item")
                out.events.append(event("input_audio_buffer.speech_started", audio_start_ms=ms(self.speech_from),
                                        item_id=self.next_user_item))
                if self.response is not None and td.interrupt_response:
                    out.merge(self._cancel("turn_detected"))
                    out.barge_in = True
            elif self.speech_from is not None:
                out.merge(self._speech_stopped(b.sample))
        if self.speech_from is None:
            # no speech in progress: keep only what a coming start may pad itself with
            pad = (td.prefix_padding_ms * MODEL_RATE // 1000) if td else 0
            self.buffer.discard_before(self.segmenter.next_window - pad)
        return out

    def _speech_stopped(self, end: int) -> Outcome:
        item_id = self.next_user_item or new_id("item")
        out = Outcome([event("input_audio_buffer.speech_stopped", audio_end_ms=ms(end), item_id=item_id)])
        out.merge(self._commit(self.speech_from, end, item_id))
        if self.config.turn_detection.create_response and self.response is None and not self.draining:
            out.merge(self._start(ResponseParams.parse(None, self.config)))
        return out

    def _on_input_audio_buffer_commit(self, _obj) -> Outcome:
        start = self.speech_from if self.speech_from is not None else self.buffer.start
        if ms(self.buffer.end - start) < MIN_COMMIT_MS:
            raise ProtocolError("input_audio_buffer_commit_empty", f"the buffer holds {ms(self.buffer.end - start)} "
                                                                   f"ms of audio; a commit needs {MIN_COMMIT_MS} ms")
        return self._commit(start, self.buffer.end, self.next_user_item or new_id("item"))

    def _commit(self, start: int, end: int, item_id: str) -> Outcome:
        item = Item(item_id, "user", [audio_part(self.buffer.take(start, end))])
        self.buffer.discard_before(end)
        self.speech_from = self.next_user_item = None
        if self.segmenter is not None:
            self.segmenter.reset()
        previous, dropped = self.conversation.insert(item)
        self.committed = (item_id, self.clock())
        out = Outcome([event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)])
        return out.merge(self._added(item, previous, dropped))

    def _on_input_audio_buffer_clear(self, _obj) -> Outcome:
        self.buffer.discard_before(self.buffer.end)
        self.speech_from = self.next_user_item = None
        if self.segmenter is not None:
            self.segmenter.reset()
        return Outcome([event("input_audio_buffer.cleared")])

    def _added(self, item: Item, previous: str | None, dropped: list[Item]) -> Outcome:
        out = Outcome([event("conversation.item.deleted", item_id=d.id) for d in dropped])
        out.events.append(event("conversation.item.added", previous_item_id=previous, item=item.to_json()))
        if item.status != "in_progress":
            out.events.append(event("conversation.item.done", previous_item_id=previous, item=item.to_json()))
        return out

    def _on_conversation_item_create(self, obj) -> Outcome:
        item = parse_item(obj.get("item"))
        after = obj.get("previous_item_id")
        if after is not None:
            string(after, "previous_item_id", 40)
        previous, dropped = self.conversation.insert(item, after)
        return self._added(item, previous, dropped)

    def _item_id(self, obj) -> str:
        return string(obj.get("item_id"), "item_id", 40)

    def _on_conversation_item_delete(self, obj) -> Outcome:
        item_id = self._item_id(obj)
        if self.response is not None and self.response.item.id == item_id:
            raise ProtocolError("invalid_value", "the item of the response in progress cannot be deleted; cancel "
                                                 "the response first", "item_id")
        self.conversation.delete(item_id)
        self.done.pop(item_id, None)
        return Outcome([event("conversation.item.deleted", item_id=item_id)])

    def _on_conversation_item_retrieve(self, obj) -> Outcome:
        return Outcome([event("conversation.item.retrieved", item=self.conversation.get(self._item_id(obj)).to_json())])

    def _on_conversation_item_truncate(self, obj) -> Outcome:
        """The client played only `audio_end_ms` of an answer: its text is cut to match."""
        item_id = self._item_id(obj)
        item = self.conversation.get(item_id)
        resp = self.done.get(item_id)
        if resp is None or not resp.params.audio:
            raise ProtocolError("invalid_value", "only a finished assistant audio item can be truncated", "item_id")
        number(obj.get("content_index", 0), "content_index", 0, 0, integer=True)
        sent_ms = resp.audio_bytes * 1000 // (2 * INPUT_RATE)
        end_ms = number(obj.get("audio_end_ms"), "audio_end_ms", 0, sent_ms, integer=True)
        codes = (end_ms * resp.talker_rate // 1000) // resp.samples_per_code if resp.samples_per_code else 0
        item.parts[0].text = resp.heard_text(min(codes, resp.codes_sent))
        return Outcome([event("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=end_ms)])

    def _on_response_create(self, obj) -> Outcome:
        if self.response is not None:
            raise ProtocolError("conversation_already_has_active_response",
                                f"response {self.response.id} is in progress; cancel it or wait for response.done")
        if self.draining:
            raise ProtocolError("server_draining", "this gateway is shutting down; reconnect to continue",
                                kind="server_error")
        params = ResponseParams.parse(obj.get("response"), self.config)
        if not self.conversation.items and not params.instructions:
            raise ProtocolError("conversation_empty", "nothing to respond to: add an item or commit audio first")
        return self._start(params)

    def _on_response_cancel(self, obj) -> Outcome:
        if self.response is None:
            raise ProtocolError("response_cancel_not_active", "there is no response in progress to cancel")
        wanted = obj.get("response_id")
        if wanted is not None and wanted != self.response.id:
            raise ProtocolError("invalid_value", f"response {str(wanted)[:40]!r} is not in progress", "response_id")
        return self._cancel("client_cancelled")

    # -- responses -----------------------------------------------------------------------

    def _response_json(self, resp: Response, status: str, details: dict | None = None, usage: dict | None = None,
                       output: list | None = None) -> dict:
        p = resp.params
        return {"id": resp.id, "object": "realtime.response", "status": status, "status_details": details,
                "output": output or [], "conversation_id": self.config.id, "output_modalities": list(p.output_modalities),
                "max_output_tokens": "inf" if p.max_output_tokens is None else p.max_output_tokens,
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": INPUT_RATE}, "voice": p.voice}},
                "metadata": p.metadata, "usage": usage}

    def _start(self, params: ResponseParams) -> Outcome:
        answers = None
        if self.committed and self.conversation.last_id == self.committed[0]:
            answers = self.committed[1]
        part = Part("output_audio" if params.audio else "output_text")
        resp = Response(new_id("resp"), params, Item(new_id("item"), "assistant", [part], status="in_progress"),
                        self.conversation.messages(params.instructions), self.conversation.has_audio, answers)
        previous, dropped = self.conversation.insert(resp.item)
        self.response = resp
        where = {"response_id": resp.id, "item_id": resp.item.id, "output_index": 0, "content_index": 0}
        out = Outcome([event("response.created", response=self._response_json(resp, "in_progress"))])
        out.events.append(event("response.output_item.added", response_id=resp.id, output_index=0,
                                item=resp.item.to_json()))
        out.merge(self._added(resp.item, previous, dropped))
        out.events.append(event("response.content_part.added", **where,
                                part={"type": "audio", "transcript": ""} if params.audio else {"type": "text", "text": ""}))
        out.start = resp
        return out

    def _where(self, resp: Response) -> dict:
        return {"response_id": resp.id, "item_id": resp.item.id, "output_index": 0, "content_index": 0}

    def response_text(self, resp: Response, delta: str, tokens: int) -> Outcome:
        """The thinker wrote `delta`; `tokens`: response tokens written so far."""
        if resp is not self.response:
            return Outcome()
        resp.tokens = tokens
        if not delta:
            return Outcome()
        resp.text += delta
        resp.checkpoints.append((tokens, len(resp.text)))
        kind = "response.output_audio_transcript.delta" if resp.params.audio else "response.output_text.delta"
        return Outcome([event(kind, **self._where(resp), delta=delta)])

    def response_audio(self, resp: Response, pcm24k_b64: str, audio_bytes: int, talker_samples: int) -> Outcome:
        """A chunk of speech (base64 PCM16 at 24 kHz, `audio_bytes` long; `talker_samples` at
        the talker's rate)."""
        if resp is not self.response:
            return Outcome()
        first = resp.audio_bytes == 0
        resp.audio_bytes += audio_bytes
        resp.talker_samples += talker_samples
        out = Outcome([event("response.output_audio.delta", **self._where(resp), delta=pcm24k_b64)])
        out.first_audio = resp if first else None
        return out

    def response_finished(self, resp: Response, finish_reason: str | None, usage: dict | None) -> Outcome:
        if resp is not self.response:
            return Outcome()
        if finish_reason == "length":
            return self._finish(resp, "incomplete", {"type": "incomplete", "reason": "max_output_tokens"},
                                resp.text, usage)
        return self._finish(resp, "completed", None, resp.text, usage)

    def response_failed(self, resp: Response, message: str, code: str = "upstream_error") -> Outcome:
        if resp is not self.response:
            return Outcome()
        details = {"type": "failed", "error": {"type": "server_error", "code": code, "message": message}}
        return self._finish(resp, "failed", details, resp.heard_text(), None)

    def _cancel(self, reason: str) -> Outcome:
        resp = self.response
        out = self._finish(resp, "cancelled", {"type": "cancelled", "reason": reason}, resp.heard_text(), None)
        out.cancel = resp
        return out

    def _finish(self, resp: Response, status: str, details: dict | None, text: str, usage: dict | None) -> Outcome:
        part = resp.item.parts[0]
        part.text = text
        resp.item.status = "completed" if status == "completed" else "incomplete"
        resp.status = status
        self.response = None
        self.done[resp.item.id] = resp
        where = self._where(resp)
        if resp.params.audio:
            events = [event("response.output_audio.done", **where),
                      event("response.output_audio_transcript.done", **where, transcript=text)]
            done_part = {"type": "audio", "transcript": text}
        else:
            events = [event("response.output_text.done", **where, text=text)]
            done_part = {"type": "text", "text": text}
        item = resp.item.to_json()
        previous = self._previous_id(resp.item.id)
        events += [event("response.content_part.done", **where, part=done_part),
                   event("response.output_item.done", response_id=resp.id, output_index=0, item=item),
                   event("conversation.item.done", previous_item_id=previous, item=item),
                   event("response.done", response=self._response_json(resp, status, details, resp.usage(usage),
                                                                        [item]))]
        return Outcome(events, finished=resp, close=self.draining)

    def _previous_id(self, item_id: str) -> str | None:
        ids = [i.id for i in self.conversation.items]
        at = ids.index(item_id) if item_id in ids else 0
        return ids[at - 1] if at else None

    # -- the gateway going away ------------------------------------------------------------

    def drain(self) -> Outcome:
        """No new responses; close now when none is in progress, else after its response.done."""
        self.draining = True
        return Outcome(close=self.response is None)

    def abandon(self, reason: str) -> Outcome:
        """The drain's deadline passed: end the response in progress as cancelled."""
        if self.response is None:
            return Outcome(close=True)
        out = self._cancel(reason)
        out.close = True
        return out
