"""The talker speech server: payload in, streamed audio out.

    POST /v1/talker/synthesize   application/json: payload v1 (see payload.py), the whole answer
                                 application/x-ndjson: payload v1 with the ids known so far,
                                   then {"ids": [...]} lines as the thinker writes, then
                                   {"end": true} (the streaming hand-off, runtime/README.md)
                                 -> audio/wav stream (44-byte header with streaming sizes, then
                                 PCM16 mono) or audio/pcm (raw PCM16; rate in X-Omni-Sample-Rate)
    GET  /v1/talker/info         sample rate, speakers, accepted thinker layer and width
    GET  /health                 200 ready, 503 loading or draining

Every admitted synthesis joins one decode loop (talker_batch.py) that steps them together.
Admission: at most OMNI_MAX_INFLIGHT syntheses in the batch; up to OMNI_MAX_QUEUE more wait;
beyond that 429 with Retry-After. While draining, new requests get 503. A failure after
audio has started closes the connection without the final chunk, so the client can tell a
cut answer from a finished one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from omni_runtime.audio import wav_header
from omni_runtime.config import Env, TalkerSettings
from omni_runtime.metrics import TalkerMetrics, metrics_app
from omni_runtime.payload import PayloadError, TalkerRequest, parse
from omni_runtime.server import EngineService, json_error, serve
from omni_runtime.talker.batch import Cancelled, DecodeLoop, DecodePlan, Synthesis, TextAbandoned, TextFeed, TextTimeout

log = logging.getLogger("omni.talker")

NDJSON = "application/x-ndjson"
WATCH_EVERY = 0.05  # seconds between checks that a synthesis' client is still connected


def client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


class BadBody(Exception):
    """The request body is not a payload (status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class LineReader:
    """NDJSON lines of a streamed request body, each at most `limit` bytes (the head carries
    the multimodal states, so lines can be large)."""

    def __init__(self, content, limit: int):
        self.content, self.limit, self.buf = content, limit, b""

    async def line(self) -> bytes | None:
        """The next line without its newline; None at the end of the body."""
        while b"\n" not in self.buf:
            if len(self.buf) > self.limit:
                raise BadBody(413, f"a payload line exceeds {self.limit} bytes")
            chunk = await self.content.readany()
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest or None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


async def feed_text(reader: LineReader, feed: TextFeed) -> None:
    """Copy the body's {"ids"} lines into the feed until {"end": true}; anything else (the
    connection closing, a bad line) abandons the text, which stops the synthesis."""
    try:
        while True:
            raw = await reader.line()
            if raw is None:
                feed.abandon('the text stream ended without {"end": true}')
                return
            if not raw.strip():
                continue
            msg = json.loads(raw)
            if not isinstance(msg, dict):
                raise ValueError("each line must be a JSON object")
            if msg.get("end") is True:
                feed.end()
                return
            ids = msg.get("ids")
            if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                    for x in ids):
                raise ValueError('a text line must be {"ids": [non-negative integers]} or {"end": true}')
            feed.extend(ids)
    except (ValueError, BadBody) as exc:
        feed.abandon(f"bad text line: {exc}")
    except (ConnectionError, asyncio.CancelledError) as exc:
        feed.abandon(f"the text stream broke: {type(exc).__name__}")
        raise
    except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors: the sender went away
        feed.abandon(f"the text stream broke: {type(exc).__name__}: {exc}")


class TalkerService(EngineService):
    role = "talker"

    def __init__(self, cfg: TalkerSettings, engine_factory):
        super().__init__(cfg, TalkerMetrics())
        self.engine_factory = engine_factory
        self.max_inflight = cfg.max_inflight
        self.max_queue = cfg.max_queue
        self.sem = asyncio.Semaphore(self.max_inflight)
        self.loop: DecodeLoop | None = None
        self.syntheses: set[Synthesis] = set()
        self._update()

    async def load(self, factory) -> None:
        def build():
            engine = factory()
            loop = DecodeLoop(engine, self.cfg.text_wait, self._on_step, DecodePlan(
                mode=self.cfg.decode, slots=self.max_inflight, max_tokens=self.cfg.max_tokens))
            try:
                loop.warm()  # every bucket's CUDA graphs before the pod reports ready
            except Exception as exc:
                loop.stop()
                raise RuntimeError(f"capturing the talker's CUDA graphs failed ({type(exc).__name__}: {exc}); "
                                   f"{Env.TALKER_DECODE}=fixed or eager runs without them") from exc
            self.loop = loop
            return engine

        await super().load(build)

    def _on_step(self, batch: int, stalled: int) -> None:  # decode thread; prometheus is thread-safe
        self.metrics.batch_size.set(batch)
        self.metrics.waiting_for_text.set(stalled)
        if batch:
            self.metrics.batch_rows.observe(batch)

    # -- HTTP -----------------------------------------------------------------------
    async def info(self, _request):
        if self.engine is None:
            return json_error(503, "model is loading", "unavailable")
        return web.json_response({**self.engine.info(), "max_inflight": self.max_inflight, "max_queue": self.max_queue,
                                  "streaming": True, "decode": self.cfg.decode, "max_tokens": self.cfg.max_tokens})

    def _retry_after(self) -> str:
        # rough: a batch slot frees every few seconds on the real model
        return str(max(1, min(30, (self.waiting + 1) // max(1, self.max_inflight) + 1)))

    async def _read_head(self, request: web.Request) -> tuple[TalkerRequest, LineReader | None]:
        streamed = request.content_type == NDJSON
        try:
            if streamed:
                reader = LineReader(request.content, self.cfg.max_request_bytes)
                raw = await reader.line()
                if raw is None:
                    raise BadBody(400, "empty body")
            else:
                reader, raw = None, await request.read()
            return parse(json.loads(raw)), reader
        except web.HTTPRequestEntityTooLarge:
            raise BadBody(413, f"payload exceeds {self.cfg.max_request_bytes} bytes") from None
        except (ValueError, PayloadError) as exc:
            raise BadBody(400, f"bad talker payload: {exc}") from None

    async def synthesize(self, request: web.Request):
        arrived = time.monotonic()
        if self.draining:
            self.metrics.count(503)
            return json_error(503, "talker is draining", "unavailable", headers={"Retry-After": "1"})
        if self.loop is None:
            self.metrics.count(503)
            return json_error(503, "talker model is loading", "unavailable", headers={"Retry-After": "5"})
        try:
            req, reader = await self._read_head(request)
            feed = TextFeed.of(self.engine, req, complete=reader is None)
        except BadBody as exc:
            self.metrics.count(exc.status)
            return json_error(exc.status, str(exc))
        except PayloadError as exc:
            self.metrics.count(400)
            return json_error(400, f"bad talker payload: {exc}")
        if self.running >= self.max_inflight and self.waiting >= self.max_queue:
            self.metrics.count(429)
            return json_error(429, f"talker queue is full ({self.max_queue} waiting)", "rate_limit_exceeded",
                              headers={"Retry-After": self._retry_after()})
        # the text keeps arriving while the request waits for a batch slot
        feeding = asyncio.ensure_future(feed_text(reader, feed)) if reader is not None else None
        try:
            self.waiting += 1
            self._update()
            try:
                await self.sem.acquire()
            finally:
                self.waiting -= 1
                self._update()
            self.running += 1
            self._update()
            try:
                return await self._run(request, req, feed, arrived)
            finally:
                self.running -= 1
                self.metrics.finished.inc()
                self._update()
                self.sem.release()
        finally:
            if feeding is not None:
                feeding.cancel()

    async def _run(self, request, req: TalkerRequest, feed: TextFeed, arrived: float):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        synthesis = Synthesis(req, feed, lambda pcm: loop.call_soon_threadsafe(q.put_nowait, ("pcm", pcm)),
                              lambda result: loop.call_soon_threadsafe(q.put_nowait, ("done", result)))
        self.syntheses.add(synthesis)
        self.loop.submit(synthesis)
        watch = asyncio.ensure_future(self._watch_client(request, synthesis))
        resp = None
        sent_audio = False
        rate = self.engine.sample_rate
        try:
            while True:
                kind, item = await q.get()
                if kind == "done" and isinstance(item, Cancelled) and client_gone(request):
                    log.info("synthesis %s stopped: its client went away", req.request_id)
                    self.metrics.count(499)
                    return resp if resp is not None else web.Response(status=499)
                if kind == "done" and isinstance(item, BaseException):
                    if resp is not None:
                        log.error("synthesis %s failed mid-stream: %s", req.request_id, item)
                        self.metrics.count(500)
                        request.transport.close()  # no final chunk: the client sees a cut answer
                        return resp
                    return self._error_before_audio(req, item)
                if resp is None:
                    resp = await self._start_response(request, req, rate)
                if kind == "pcm":
                    if not sent_audio:
                        sent_audio = True
                        self.metrics.ttfa.observe(time.monotonic() - arrived)
                    await resp.write(item)
                else:
                    self._account(item, rate)
                    break
            await resp.write_eof()
            self.metrics.count(200)
            return resp
        except ConnectionResetError:  # the client left between two writes (a barge-in): not a failure
            log.info("synthesis %s stopped: its client went away", req.request_id)
            self.metrics.count(499)
            return resp
        finally:
            watch.cancel()
            synthesis.cancel.set()  # no-op once finished; stops decoding when the client went away
            self.syntheses.discard(synthesis)

    async def _watch_client(self, request: web.Request, synthesis: Synthesis) -> None:
        """Stop a synthesis as soon as its client disconnects (a realtime barge-in closes the
        connection), not at its next audio write, which can be a chunk of audio away: the
        batch slot frees within a decode step."""
        while not synthesis.finished:
            if client_gone(request):
                synthesis.cancel.set()
                self.loop.wake()
                return
            await asyncio.sleep(WATCH_EVERY)

    def _error_before_audio(self, req: TalkerRequest, exc: BaseException) -> web.Response:
        if isinstance(exc, (PayloadError, TextAbandoned)):
            self.metrics.count(400)
            return json_error(400, f"bad talker payload: {exc}")
        if isinstance(exc, TextTimeout):
            self.metrics.count(408)
            return json_error(408, str(exc), "timeout")
        if isinstance(exc, Cancelled):
            self.metrics.count(503)
            return json_error(503, f"synthesis stopped: {exc}", "unavailable")
        log.error("synthesis %s failed: %r", req.request_id, exc)
        self.metrics.count(500)
        return json_error(500, f"synthesis failed: {type(exc).__name__}: {exc}", "server_error")

    async def _start_response(self, request, req: TalkerRequest, rate: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": "audio/wav" if req.format == "wav" else "audio/pcm",
            "X-Omni-Sample-Rate": str(rate),
            "X-Omni-Channels": "1",
            "X-Omni-Sample-Format": "s16le",
            "X-Omni-Request-Id": req.request_id,
            # one codec frame speaks one text token: lets a caller tell which text the audio covers
            "X-Omni-Samples-Per-Code": str(self.engine.upsample),
            "Cache-Control": "no-store",
        })
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if req.format == "wav":
            await resp.write(wav_header(rate))
        return resp

    def _account(self, stats, rate: int) -> None:
        audio_s = stats.samples / rate
        if audio_s > 0:
            self.metrics.rtf.observe((stats.finished - stats.started) / audio_s)
            self.metrics.audio_seconds.inc(audio_s)

    # -- lifecycle ------------------------------------------------------------------
    async def drain(self):
        if not await self.start_draining():
            log.warning("drain deadline reached with %d running, %d waiting: cancelling", self.running, self.waiting)
            for s in list(self.syntheses):
                s.cancel.set()
            if self.loop is not None:
                self.loop.wake()
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.2)  # let the last responses flush before the listeners close
        if self.loop is not None:
            self.loop.stop()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_request_bytes)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/talker/info", self.info)
        app.router.add_post("/v1/talker/synthesize", self.synthesize)
        return app


async def amain(cfg: TalkerSettings) -> int:
    from omni_runtime.talker.engine import ChunkPolicy, TalkerEngine

    def factory():
        return TalkerEngine(cfg.model, cfg.revision, cfg.device, cfg.dtype,
                            ChunkPolicy(first=cfg.first_chunk, every=cfg.chunk))

    svc = TalkerService(cfg, factory)
    sites = [(svc.app(), cfg.host, cfg.port), (metrics_app(svc.metrics), cfg.host, cfg.metrics_port)]

    async def started():
        asyncio.ensure_future(svc.load(svc.engine_factory))

    code = await serve(sites, svc.drain, started)
    return svc.exit_code or code
