"""The client's side of one speech request: an SSE stream opened on the first byte
(transcript and audio deltas, interleaved as they come), or nothing until one JSON answer
with the whole audio."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

from aiohttp import web

from omni_runtime.audio import wav_header
from omni_runtime.gateway import sse
from omni_runtime.gateway.upstream import ClientGone
from omni_runtime.gateway.validation import ChatOptions
from omni_runtime.server import json_error


class SpeechClient:
    def __init__(self, request: web.Request, rid: str, model, opts: ChatOptions, first_byte):
        self.request, self.rid, self.model, self.opts = request, rid, model, opts
        self.stream = opts.stream
        self.first_byte = first_byte
        self.aid = f"audio_{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.resp: web.StreamResponse | None = None
        # the thinker's text and the talker's audio are written from different tasks
        self.lock = asyncio.Lock()

    def chunk(self, delta: dict, finish=None, model=None) -> bytes:
        return sse.event({"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                          "model": model or self.model,
                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    async def _send(self, data: bytes) -> None:
        try:
            if self.resp is None:
                self.resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                                    "Cache-Control": "no-cache"})
                await self.resp.prepare(self.request)
                await self.resp.write(self.chunk({"role": "assistant", "content": None}))
            await self.resp.write(data)
        except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError included
            raise ClientGone() from exc

    async def write(self, data: bytes) -> None:
        async with self.lock:
            await self._send(data)

    async def transcript(self, delta: str, _tokens: int = 0) -> None:
        self.first_byte()
        if self.stream:
            await self.write(self.chunk({"audio": {"id": self.aid, "transcript": delta}}))

    async def audio_format(self, rate: int, samples_per_code: int) -> None:
        """The talker's audio is about to start (the rate goes out with the last chunk)."""

    async def audio(self, pcm16: bytes, collected: bytearray) -> None:
        """Send a chunk of PCM (stream), or add it to `collected` for the final answer."""
        self.first_byte()
        if self.stream:
            await self.write(self.chunk({"audio": {"id": self.aid, "data": base64.b64encode(pcm16).decode()}}))
        else:
            collected += pcm16

    async def finish(self, data: bytes) -> web.StreamResponse:
        """The stream's last event, [DONE] and the end; a client that left ends it too."""
        async with self.lock:
            try:
                await self._send(data)
                await self.resp.write(sse.DONE)
                await self.resp.write_eof()
            except (ClientGone, ConnectionResetError):
                pass
        return self.resp if self.resp is not None else web.Response(status=499)

    async def fail(self, status: int, message: str, kind: str) -> web.StreamResponse:
        """A JSON error while nothing was sent, else the stream's last event. An upstream that
        went away (502, 503) is worth retrying: the answer says when."""
        if self.stream or self.resp is not None:
            return await self.finish(sse.error_event(message, kind, status))
        return json_error(status, message, kind, headers={"Retry-After": "1"} if status in (502, 503) else None)

    async def answer(self, reply: sse.ThinkerReply, rate: int, pcm: bytes) -> web.StreamResponse:
        """The final chunk (stream), or the whole answer with the audio as WAV or PCM16."""
        expires = self.created + 3600
        finish = reply.finish or "stop"
        if self.stream:
            return await self.finish(self.chunk(
                {"audio": {"id": self.aid, "expires_at": expires, "format": "pcm16", "sample_rate": rate}},
                finish=finish, model=reply.model))
        audio_bytes = pcm
        if self.opts.format == "wav":
            audio_bytes = wav_header(rate, len(pcm) // 2) + pcm
        return web.json_response({
            "id": self.rid, "object": "chat.completion", "created": self.created, "model": reply.model,
            "choices": [{"index": 0, "finish_reason": finish, "message": {
                "role": "assistant", "content": None,
                "audio": {"id": self.aid, "data": base64.b64encode(audio_bytes).decode(), "expires_at": expires,
                          "transcript": reply.text, "format": self.opts.format, "sample_rate": rate}}}],
            "usage": reply.usage,
        })
