"""The speech pipeline of `/v1/chat/completions` with `modalities` containing "audio":

  1. the least-loaded thinker streams the answer (`X-Request-Id: <rid>`,
     `return_token_ids: true`); text deltas go to the client as `delta.audio.transcript`;
  2. for audio/image/video input, the thinker's multimodal states are fetched from that
     same endpoint (mm_states.py) while the answer streams;
  3. the least-loaded talker gets payload v1 (token ids, speaker, states); its PCM is
     relayed as `delta.audio.data` chunks, or returned whole as `message.audio`.

Step 3 comes in two ways. Streamed hand-off (OMNI_SPEECH_STREAMING, the default): the
talker request opens as soon as the thinker has given the prompt ids, a first response id
and, for media input, the states; its ndjson body (handoff.py) grows with the answer, so
audio streams while the transcript still does. Whole payload (OMNI_SPEECH_STREAMING=0, and
engines that return no token ids): one JSON body once the answer is complete.

Failures after the client has seen bytes end the SSE stream with an `error` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import aiohttp
from aiohttp import web

from omni_runtime.config import GatewaySettings
from omni_runtime.gateway import sse
from omni_runtime.gateway.handoff import NDJSON, IdFeed
from omni_runtime.gateway.mm_states import StatesMissing, fetch_states
from omni_runtime.gateway.pools import Affinity
from omni_runtime.gateway.speech_client import SpeechClient
from omni_runtime.gateway.upstream import ClientGone, Taken, Upstreams, UpstreamUnavailable
from omni_runtime.gateway.validation import ChatOptions
from omni_runtime.metrics import GatewayMetrics

log = logging.getLogger("omni.gateway")

TALKER_PATH = "/v1/talker/synthesize"


class Passthrough(Exception):
    """A thinker's non-200 answer, returned to the client as it is."""

    def __init__(self, status, body, content_type):
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


class Broken(Exception):
    """An upstream failed after taking the request (the talker answered an error or cut its
    audio off, the thinker's stream broke); the client gets `status` and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def thinker_request(body: dict) -> dict:
    """The thinker's view of a speech request: streamed, with token ids, without the
    audio-output fields (the thinker produces text only)."""
    req = {k: v for k, v in body.items() if k not in ("modalities", "audio")}
    req.update(stream=True, return_token_ids=True)
    return req


def talker_payload(reply: sse.ThinkerReply, voice: str, rid: str, mm: dict | None, generation: dict) -> dict:
    return {"v": 1, "request_id": rid, "speaker": voice, "prompt_ids": reply.prompt_ids,
            "response_ids": list(reply.response_ids), "mm": mm, "format": "pcm", "generation": generation}


def _failed(task: asyncio.Future | None) -> bool:
    return task is not None and task.done() and not task.cancelled() and task.exception() is not None


def _succeeded(task: asyncio.Future) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


class Speech:
    def __init__(self, upstreams: Upstreams, cfg: GatewaySettings, metrics: GatewayMetrics):
        self.up = upstreams
        self.cfg = cfg
        self.metrics = metrics

    async def respond(self, request: web.Request, body: dict, opts: ChatOptions, first_byte) -> web.StreamResponse:
        rid = uuid.uuid4().hex
        client = SpeechClient(request, f"chatcmpl-{rid}", body.get("model"), opts, first_byte)
        try:
            reply, (rate, pcm) = await self.speak(request, body, opts, rid, client)
        except Passthrough as p:
            return web.Response(body=p.body, status=p.status, content_type=p.content_type or "application/json")
        except (StatesMissing, Broken) as exc:
            log.warning("speech request %s: %s", rid, exc)
            return await client.fail(getattr(exc, "status", 502), str(exc), "upstream_error")
        except (UpstreamUnavailable, ClientGone) as exc:
            if client.resp is None:
                raise
            # the transcript is already streaming: end the stream with the error
            if isinstance(exc, UpstreamUnavailable):
                return await client.finish(sse.error_event(str(exc), "unavailable", exc.status))
            return client.resp
        return await client.answer(reply, rate, pcm)

    async def speak(self, request, body: dict, opts: ChatOptions, rid: str, client,
                    affinity: Affinity | None = None) -> tuple[sse.ThinkerReply, tuple[int, bytes]]:
        """One spoken answer through `client` (the HTTP stream, or a realtime session):
        (the thinker's reply, (sample rate, the PCM collected when not streaming))."""
        if self.cfg.speech_streaming:
            return await self._streamed(request, body, opts, rid, client, affinity)
        reply, mm = await self._think(request, body, opts, rid, client, affinity)
        return reply, await self._post_whole(request, reply, mm, client)

    async def text_answer(self, request, body: dict, rid: str, client,
                          affinity: Affinity | None = None) -> sse.ThinkerReply:
        """A text-only answer, its deltas through `client.transcript` (realtime text responses)."""
        reply = sse.ThinkerReply(model=body.get("model"))
        async with self._call_thinker(request, body, rid, affinity) as (ep, up):
            if up.status != 200:
                raise Passthrough(up.status, await up.read(), up.content_type)
            try:
                await self._read(up, reply, asyncio.Event(), client, None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                raise _thinker_broke(ep, exc) from None
        if not reply.complete:
            raise Broken(502, "the thinker ended its stream before the answer was complete"
                              + (f": {reply.error}" if reply.error else ""))
        return reply

    # -- thinker --

    async def _read(self, up, reply: sse.ThinkerReply, prefilled: asyncio.Event, client: SpeechClient,
                    states: asyncio.Future | None, on_chunk=None) -> None:
        """Read the thinker's stream into `reply`, relaying its text. Stops early when the
        states failed: no speech without them (closing the stream cancels the thinker's request).
        Each read hands the talker its new ids (`on_chunk`) before the client gets the text:
        the talker is on the way to the first audio, the transcript is not."""
        buf = b""
        async for data in up.content.iter_any():
            events, buf = sse.split_events(buf + data)
            deltas = []
            for raw in events:
                delta = reply.feed(json.loads(raw))
                if reply.tokens_seen:
                    prefilled.set()
                if delta:
                    deltas.append((delta, len(reply.response_ids)))
            if on_chunk is not None:
                on_chunk()
            for delta, tokens in deltas:
                await client.transcript(delta, tokens)
            if _failed(states):
                break

    def _fetch_states(self, request, ep, rid: str, prefilled: asyncio.Event) -> asyncio.Task:
        return asyncio.ensure_future(fetch_states(self.up.session, ep, rid, self.cfg.mm_states_wait, prefilled,
                                                  lambda s: self.up.pause(request, s)))

    def _call_thinker(self, request, body: dict, rid: str, affinity: Affinity | None = None):
        return self.up.call("POST", self.up.thinkers, "/v1/chat/completions", request,
                            json=thinker_request(body), headers={"X-Request-Id": rid}, affinity=affinity)

    async def _think(self, request, body: dict, opts: ChatOptions, rid: str, client: SpeechClient,
                     affinity: Affinity | None = None):
        """The whole answer, and the multimodal states fetched alongside for media input."""
        reply = sse.ThinkerReply(model=body.get("model"))
        prefilled = asyncio.Event()
        states = None
        async with self._call_thinker(request, body, rid, affinity) as (ep, up):
            if up.status != 200:
                raise Passthrough(up.status, await up.read(), up.content_type)
            if opts.multimodal:
                states = self._fetch_states(request, ep, rid, prefilled)
            try:
                await self._read(up, reply, prefilled, client, states)
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

    # -- streamed hand-off --

    async def _streamed(self, request, body: dict, opts: ChatOptions, rid: str, client: SpeechClient,
                        affinity: Affinity | None = None):
        """Thinker and talker at once: the talker request opens mid-answer and is fed as the
        thinker writes. (reply, (rate, pcm))."""
        reply = sse.ThinkerReply(model=body.get("model"))
        prefilled = asyncio.Event()
        talker = _TalkerSide(self, request, client, reply)
        try:
            async with self._call_thinker(request, body, rid, affinity) as (ep, up):
                if up.status != 200:
                    raise Passthrough(up.status, await up.read(), up.content_type)
                if opts.multimodal:
                    talker.watch(self._fetch_states(request, ep, rid, prefilled))
                reader = asyncio.ensure_future(self._read(up, reply, prefilled, client, talker.states, talker.pump))
                await _until_done_or(reader, talker.failed)
                prefilled.set()
                if talker.failed.is_set():
                    await talker.talk  # raises the talker's failure; leaving the block closes the thinker
                if reader.exception() is not None:
                    raise _thinker_broke(ep, reader.exception())
                ids_given = reply.prompt_ids is not None and bool(reply.response_ids)
                if not _failed(talker.states):
                    if not ids_given:  # an engine without token ids: the whole-payload path
                        talker.closed = True
                        await self._tokenize(ep, body, reply)
                    elif not reply.complete:
                        raise Broken(502, f"thinker {ep.url} ended its stream before the answer was complete"
                                          + (f": {reply.error}" if reply.error else ""))
            if talker.states is not None:
                await talker.states  # raises StatesMissing
            if not ids_given:
                mm = None
                if talker.states is not None:
                    mm, size = talker.states.result()
                    self.metrics.mm_states_bytes.inc(size)
                return reply, await self._post_whole(request, reply, mm, client)
            talker.pump()
            talker.feed.end()
            return reply, await talker.talk
        finally:
            await talker.close()

    async def _talk(self, request, feed: IdFeed, client: SpeechClient) -> tuple[int, bytes]:
        taken = await self.up.connect("POST", self.up.talkers, TALKER_PATH, request, True,
                                      {"data": feed.body, "headers": {"Content-Type": NDJSON}})
        return await self._relay(taken, client)

    # -- talker --

    async def _post_whole(self, request, reply: sse.ThinkerReply, mm: dict | None,
                          client: SpeechClient) -> tuple[int, bytes]:
        payload = json.dumps(talker_payload(reply, client.opts.voice, client.rid, mm,
                                            self.cfg.talker_generation)).encode()
        self.metrics.talker_payload_bytes.observe(len(payload))
        taken = await self.up.connect("POST", self.up.talkers, TALKER_PATH, request, True,
                                      {"data": payload, "headers": {"Content-Type": "application/json"}})
        return await self._relay(taken, client)

    async def _relay(self, taken: Taken, client: SpeechClient) -> tuple[int, bytes]:
        """The talker's PCM to the client as it comes (stream), or collected: (rate, pcm)."""
        pcm = bytearray()
        carry = b""
        async with taken as (ep, up):
            if up.status != 200:
                try:
                    text = (await up.text())[:300]
                except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError):
                    text = ""
                raise Broken(up.status if client.opts.stream else 502, f"talker {ep.url} answered {up.status}: {text}")
            rate = int(up.headers.get("X-Omni-Sample-Rate", "24000"))
            await client.audio_format(rate, int(up.headers.get("X-Omni-Samples-Per-Code", "0")))
            try:
                async for data in up.content.iter_any():
                    data = carry + data
                    cut = len(data) - (len(data) % 2)  # whole PCM16 samples only
                    data, carry = data[:cut], data[cut:]
                    if data:
                        await client.audio(data, pcm)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise Broken(502, f"talker {ep.url} broke off its audio: {type(exc).__name__}: {exc}") from None
        return rate, bytes(pcm)


def _thinker_broke(ep, exc: BaseException) -> BaseException:
    if isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, ValueError)):
        return Broken(502, f"thinker {ep.url} stream broke off mid-answer: {type(exc).__name__}: {exc}")
    return exc


async def _until_done_or(task: asyncio.Task, event: asyncio.Event) -> None:
    """Wait for `task`, or cancel it once `event` is set."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _TalkerSide:
    """The talker half of a streamed speech request: opened once the thinker has given the
    prompt ids, a first response id and, for media input, the states; then fed each new
    batch of response ids. `failed` is set when the talker request fails."""

    def __init__(self, speech: Speech, request, client: SpeechClient, reply: sse.ThinkerReply):
        self.speech, self.request, self.client, self.reply = speech, request, client, reply
        self.states: asyncio.Task | None = None
        self.feed: IdFeed | None = None
        self.talk: asyncio.Task | None = None
        self.sent = 0
        self.failed = asyncio.Event()
        self.closed = False

    def watch(self, states: asyncio.Task) -> None:
        self.states = states
        states.add_done_callback(lambda _t: self.pump())  # the answer may be waiting for them

    def pump(self) -> None:
        """Open the talker request when it can be, else feed it the ids new since the last call."""
        reply = self.reply
        if self.closed:
            return
        if self.feed is not None:
            self.feed.add(reply.response_ids[self.sent:])
            self.sent = len(reply.response_ids)
            return
        if reply.prompt_ids is None or not reply.response_ids:
            return
        mm = None
        if self.states is not None:
            if not _succeeded(self.states):
                return
            mm, size = self.states.result()
            self.speech.metrics.mm_states_bytes.inc(size)
        opts = self.client.opts
        self.feed = IdFeed(talker_payload(reply, opts.voice, self.client.rid, mm,
                                          self.speech.cfg.talker_generation))
        self.sent = len(reply.response_ids)
        self.speech.metrics.talker_payload_bytes.observe(len(self.feed.head))
        self.talk = asyncio.ensure_future(self.speech._talk(self.request, self.feed, self.client))
        self.talk.add_done_callback(self._talk_done)

    def _talk_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.failed.set()

    async def close(self) -> None:
        """Abandon what did not finish: the body loses its end line (the talker cuts its
        response) and the talker connection closes (the talker cancels the synthesis)."""
        self.closed = True
        if self.feed is not None:
            self.feed.abort()  # no-op once ended
        pending = [t for t in (self.talk, self.states) if t is not None and not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
