"""Running one realtime response: the session's whole conversation to a thinker (the replica
that served the session's earlier turns, while it is Ready), its text back as it is written
and, for audio responses, the talker's speech through the same streamed hand-off as
`/v1/chat/completions` (speech.py), each chunk passed on as the talker produces it.

The runner is the `client` the speech pipeline writes to. Cancelling its task (barge-in,
response.cancel) closes the thinker's stream and the talker's request at once, which ends
their work for it: vLLM aborts a request whose client went away, the transformers thinker
stops generating, the talker drops the synthesis from its batch.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Callable

from aiohttp import web

from omni_runtime.config import GatewaySettings
from omni_runtime.gateway.mm_states import StatesMissing
from omni_runtime.gateway.pools import Affinity
from omni_runtime.gateway.realtime.protocol import INPUT_RATE
from omni_runtime.gateway.realtime.resample import Resampler, float_to_pcm16, pcm16_to_float
from omni_runtime.gateway.realtime.session import Outcome, RealtimeSession, Response
from omni_runtime.gateway.speech import Broken, Passthrough, Speech
from omni_runtime.gateway.upstream import ClientGone, UpstreamUnavailable
from omni_runtime.gateway.validation import ChatOptions

log = logging.getLogger("omni.gateway.realtime")


def thinker_body(session: RealtimeSession, resp: Response, extra: dict) -> dict:
    """The chat request of one turn: the whole conversation, streamed, usage included."""
    body = {**extra, "model": session.config.model, "messages": resp.messages,
            "stream_options": {"include_usage": True}}
    if resp.params.max_output_tokens is not None:
        body["max_tokens"] = resp.params.max_output_tokens
    return body


def upstream_message(p: Passthrough) -> str:
    """The thinker's own error message of a non-200 answer, when it gave one."""
    try:
        err = json.loads(p.body).get("error")
        message = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        message = None
    return f"the thinker answered {p.status}" + (f": {message}" if message else "")


class ResponseRunner:
    def __init__(self, speech: Speech, request: web.Request, session: RealtimeSession, resp: Response,
                 affinity: Affinity, cfg: GatewaySettings, emit: Callable[[Outcome], None]):
        self.speech, self.request, self.session, self.resp = speech, request, session, resp
        self.affinity, self.cfg, self.emit = affinity, cfg, emit
        self.rid = uuid.uuid4().hex
        self.opts = ChatOptions(audio_out=True, voice=resp.params.voice, format="pcm16", stream=True,
                                multimodal=resp.multimodal)
        self.resampler: Resampler | None = None

    async def run(self) -> None:
        body = thinker_body(self.session, self.resp, self.cfg.realtime_thinker_params)
        try:
            if self.resp.params.audio:
                reply, _ = await self.speech.speak(self.request, body, self.opts, self.rid, self, self.affinity)
            else:
                reply = await self.speech.text_answer(self.request, body, self.rid, self, self.affinity)
        except Passthrough as p:
            self._failed(upstream_message(p), "upstream_error")
        except (Broken, StatesMissing) as exc:
            self._failed(str(exc), "upstream_error")
        except UpstreamUnavailable as exc:
            self._failed(str(exc), "unavailable")
        except ClientGone:
            pass  # the session is closing
        except Exception as exc:  # noqa: BLE001 - one response failing must not end the session
            log.exception("realtime response %s failed", self.resp.id)
            self._failed(f"internal error: {type(exc).__name__}", "server_error")
        else:
            self.emit(self.session.response_finished(self.resp, reply.finish, reply.usage))

    def _failed(self, message: str, code: str) -> None:
        log.warning("realtime response %s failed: %s", self.resp.id, message)
        self.emit(self.session.response_failed(self.resp, message, code))

    # -- the speech pipeline's client interface (speech_client.SpeechClient's methods) ----

    async def transcript(self, delta: str, tokens: int = 0) -> None:
        self.emit(self.session.response_text(self.resp, delta, tokens))

    async def audio_format(self, rate: int, samples_per_code: int) -> None:
        self.resp.talker_rate, self.resp.samples_per_code = rate, samples_per_code
        self.resampler = Resampler(rate, INPUT_RATE)

    async def audio(self, pcm16: bytes, _collected: bytearray) -> None:
        if self.resampler is None:  # a talker that announced no format speaks at 24 kHz
            self.resampler = Resampler(INPUT_RATE, INPUT_RATE)
        out = pcm16 if self.resampler.identity else float_to_pcm16(self.resampler.process(pcm16_to_float(pcm16)))
        if out:
            self.emit(self.session.response_audio(self.resp, base64.b64encode(out).decode(), len(out),
                                                  len(pcm16) // 2))
