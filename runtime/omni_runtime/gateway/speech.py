"""The speech pipeline of `/v1/chat/completions` with `modalities` containing "audio":

  1. the least-loaded thinker streams the answer (`X-Request-Id: <rid>`,
     `return_token_ids: true`); text deltas go to the client as `delta.audio.transcript`;
  2. for audio/image/video input, the thinker's multimodal states are fetched from that
     same endpoint (mm_states.py) while the answer streams;
  3. payload v1 (token ids, speaker, states) goes to the least-loaded talker; its PCM is
     relayed as `delta.audio.data` chunks, or returned whole as `message.audio`.

Failures after the client has seen bytes end the SSE stream with an `error` event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid

from aiohttp import web

from ..audio import wav_header
from ..metrics import GatewayMetrics
from ..server import json_error
from . import sse
from .mm_states import StatesMissing, fetch_states
from .upstream import ClientGone, UpstreamUnavailable, Upstreams
from .validation import ChatOptions

log = logging.getLogger("omni.gateway")


class Passthrough(Exception):
    """A thinker's non-200 answer, returned to the client as it is."""

    def __init__(self, status, body, content_type):
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


def thinker_request(body: dict) -> dict:
    """The thinker's view of a speech request: streamed, with token ids, without the
    audio-output fields (the thinker produces text only)."""
    req = {k: v for k, v in body.items() if k not in ("modalities", "audio")}
    req.update(stream=True, return_token_ids=True)
    return req


def talker_payload(reply: sse.ThinkerReply, voice: str, rid: str, mm: dict | None, generation: dict) -> dict:
    return {"v": 1, "request_id": rid, "speaker": voice, "prompt_ids": reply.prompt_ids,
            "response_ids": reply.response_ids, "mm": mm, "format": "pcm", "generation": generation}


def _failed(task: asyncio.Future | None) -> bool:
    return task is not None and task.done() and not task.cancelled() and task.exception() is not None


class _Client:
    """The client's side of one speech request: an SSE stream opened on the first byte, or
    nothing until the final JSON answer."""

    def __init__(self, request: web.Request, rid: str, model, stream: bool):
        self.request, self.rid, self.model, self.stream = request, rid, model, stream
        self.aid = f"audio_{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.resp: web.StreamResponse | None = None

    def chunk(self, delta: dict, finish=None, model=None) -> bytes:
        return sse.event({"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                          "model": model or self.model,
                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    async def write(self, data: bytes) -> None:
        if self.resp is None:
            self.resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                                "Cache-Control": "no-cache"})
            await self.resp.prepare(self.request)
            await self.resp.write(self.chunk({"role": "assistant", "content": None}))
        await self.resp.write(data)

    async def finish(self, data: bytes) -> web.StreamResponse:
        await self.write(data)
        await self.resp.write(sse.DONE)
        await self.resp.write_eof()
        return self.resp

    async def fail(self, status: int, message: str, kind: str) -> web.StreamResponse:
        """A JSON error while nothing was sent, else the stream's last event."""
        if self.stream or self.resp is not None:
            return await self.finish(sse.error_event(message, kind, status))
        return json_error(status, message, kind)


class Speech:
    def __init__(self, upstreams: Upstreams, cfg: dict, metrics: GatewayMetrics):
        self.up = upstreams
        self.cfg = cfg
        self.metrics = metrics

    async def respond(self, request: web.Request, body: dict, opts: ChatOptions, first_byte) -> web.StreamResponse:
        rid = uuid.uuid4().hex
        client = _Client(request, f"chatcmpl-{rid}", body.get("model"), opts.stream)

        async def on_text(delta):
            first_byte()
            if opts.stream:
                await client.write(client.chunk({"audio": {"id": client.aid, "transcript": delta}}))

        try:
            reply, mm = await self._think(request, body, opts, rid, on_text)
            payload = json.dumps(talker_payload(reply, opts.voice, client.rid, mm,
                                                self.cfg["talker_generation"])).encode()
            self.metrics.talker_payload_bytes.observe(len(payload))
            talker = await self.up.connect("POST", self.up.talkers, "/v1/talker/synthesize", request, True,
                                           {"data": payload, "headers": {"Content-Type": "application/json"}})
        except Passthrough as p:
            return web.Response(body=p.body, status=p.status, content_type=p.content_type or "application/json")
        except StatesMissing as exc:
            log.warning("speech request %s: %s", rid, exc)
            return await client.fail(502, str(exc), "upstream_error")
        except (UpstreamUnavailable, ClientGone) as exc:
            if client.resp is None:
                raise
            # the transcript is already streaming: end the stream with the error
            if isinstance(exc, UpstreamUnavailable):
                return await client.finish(sse.error_event(str(exc), "unavailable", exc.status))
            return client.resp
        return await self._speak(talker, client, opts, reply, first_byte)

    async def _think(self, request, body: dict, opts: ChatOptions, rid: str, on_text):
        """Stream the thinker's answer; fetch the multimodal states alongside for media input."""
        reply = sse.ThinkerReply(model=body.get("model"))
        prefilled = asyncio.Event()
        states = None
        async with self.up.call("POST", self.up.thinkers, "/v1/chat/completions", request,
                                json=thinker_request(body), headers={"X-Request-Id": rid}) as (ep, up):
            if up.status != 200:
                raise Passthrough(up.status, await up.read(), up.content_type)
            if opts.multimodal:
                states = asyncio.ensure_future(fetch_states(
                    self.up.session, ep, rid, self.cfg["mm_states_wait"], prefilled,
                    lambda s: self.up.pause(request, s)))
            try:
                buf = b""
                async for data in up.content.iter_any():
                    events, buf = sse.split_events(buf + data)
                    for raw in events:
                        delta = reply.feed(json.loads(raw))
                        if reply.tokens_seen:
                            prefilled.set()
                        if delta:
                            await on_text(delta)
                    if _failed(states):
                        break  # no speech without the states: stop the thinker (closing cancels it there)
                prefilled.set()
                if not _failed(states) and (reply.prompt_ids is None or not reply.response_ids):
                    await self._tokenize(ep, body, reply)
            except BaseException:
                if states is not None:
                    states.cancel()
                raise
        if states is None:
            return reply, None
        mm, size = await states
        self.metrics.mm_states_bytes.inc(size)
        return reply, mm

    async def _tokenize(self, ep, body: dict, reply: sse.ThinkerReply) -> None:
        """Engines that return no token ids: ask the same replica to tokenize."""
        tk = await self.up.session.post(ep.url + "/tokenize", json={
            "messages": body["messages"], "add_generation_prompt": True, "model": body.get("model")})
        reply.prompt_ids = (await tk.json())["tokens"]
        tk = await self.up.session.post(ep.url + "/tokenize", json={
            "prompt": reply.text, "add_special_tokens": False, "model": body.get("model")})
        reply.response_ids = (await tk.json())["tokens"]

    async def _speak(self, talker, client: _Client, opts: ChatOptions, reply: sse.ThinkerReply, first_byte):
        pcm = bytearray()
        carry = b""
        async with talker as (_ep, up):
            if up.status != 200:
                text = await up.text()
                status = up.status if opts.stream else 502
                return await client.fail(status, f"talker answered {up.status}: {text[:300]}", "upstream_error")
            rate = int(up.headers.get("X-Omni-Sample-Rate", "24000"))
            async for data in up.content.iter_any():
                data = carry + data
                cut = len(data) - (len(data) % 2)  # whole PCM16 samples only
                data, carry = data[:cut], data[cut:]
                if not data:
                    continue
                first_byte()
                if opts.stream:
                    audio = {"id": client.aid, "data": base64.b64encode(data).decode()}
                    await client.write(client.chunk({"audio": audio}))
                else:
                    pcm += data
        expires = client.created + 3600
        finish = reply.finish or "stop"
        if opts.stream:
            return await client.finish(client.chunk(
                {"audio": {"id": client.aid, "expires_at": expires, "format": "pcm16", "sample_rate": rate}},
                finish=finish, model=reply.model))
        audio_bytes = bytes(pcm)
        if opts.format == "wav":
            audio_bytes = wav_header(rate, len(pcm) // 2) + audio_bytes
        return web.json_response({
            "id": client.rid, "object": "chat.completion", "created": client.created, "model": reply.model,
            "choices": [{"index": 0, "finish_reason": finish, "message": {
                "role": "assistant", "content": None,
                "audio": {"id": client.aid, "data": base64.b64encode(audio_bytes).decode(), "expires_at": expires,
                          "transcript": reply.text, "format": opts.format, "sample_rate": rate}}}],
            "usage": reply.usage,
        })
