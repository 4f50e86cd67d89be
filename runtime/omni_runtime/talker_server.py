"""The talker speech server: payload in, streamed audio out.

    POST /v1/talker/synthesize   payload v1 (see payload.py) -> audio/wav stream
                                 (44-byte header with streaming sizes, then PCM16 mono)
                                 or audio/pcm (raw PCM16; rate in X-Omni-Sample-Rate)
    GET  /v1/talker/info         sample rate, speakers, accepted thinker layer and width
    GET  /health                 200 ready, 503 loading or draining

Admission: at most OMNI_MAX_INFLIGHT syntheses run; up to OMNI_MAX_QUEUE more wait;
beyond that 429 with Retry-After. While draining, new requests get 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from . import env
from .audio import wav_header
from .metrics import TalkerMetrics, metrics_app
from .payload import PayloadError, parse
from .server import EngineService, json_error, serve

log = logging.getLogger("omni.talker")


class TalkerService(EngineService):
    role = "talker"

    def __init__(self, cfg: dict, engine_factory):
        super().__init__(cfg, TalkerMetrics())
        self.engine_factory = engine_factory
        self.max_inflight = cfg["max_inflight"]
        self.max_queue = cfg["max_queue"]
        self.sem = asyncio.Semaphore(self.max_inflight)
        self.pool = ThreadPoolExecutor(max_workers=self.max_inflight, thread_name_prefix="synth")
        self.cancel_flags: set[threading.Event] = set()
        self._update()

    # -- HTTP -----------------------------------------------------------------------
    async def info(self, _request):
        if self.engine is None:
            return json_error(503, "model is loading", "unavailable")
        return web.json_response({**self.engine.info(), "max_inflight": self.max_inflight, "max_queue": self.max_queue})

    def _retry_after(self) -> str:
        # rough: one synthesis slot frees every few seconds on the real model
        return str(max(1, min(30, (self.waiting + 1) // max(1, self.max_inflight) + 1)))

    async def synthesize(self, request: web.Request):
        arrived = time.monotonic()
        if self.draining:
            self.metrics.count(503)
            return json_error(503, "talker is draining", "unavailable", headers={"Retry-After": "1"})
        if self.engine is None:
            self.metrics.count(503)
            return json_error(503, "talker model is loading", "unavailable", headers={"Retry-After": "5"})
        try:
            raw = await request.read()
            req = parse(json.loads(raw))
        except web.HTTPRequestEntityTooLarge:
            self.metrics.count(413)
            return json_error(413, f"payload exceeds {self.cfg['max_request_bytes']} bytes")
        except (ValueError, PayloadError) as exc:
            self.metrics.count(400)
            return json_error(400, f"bad talker payload: {exc}")
        if self.running >= self.max_inflight and self.waiting >= self.max_queue:
            self.metrics.count(429)
            return json_error(429, f"talker queue is full ({self.max_queue} waiting)", "rate_limit_exceeded",
                              headers={"Retry-After": self._retry_after()})

        self.waiting += 1
        self._update()
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1
            self._update()
        self.running += 1
        self._update()
        cancel = threading.Event()
        self.cancel_flags.add(cancel)
        try:
            return await self._run(request, req, cancel, arrived)
        finally:
            self.cancel_flags.discard(cancel)
            self.running -= 1
            self._update()
            self.sem.release()

    async def _run(self, request, req, cancel: threading.Event, arrived: float):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def emit(pcm: bytes):
            loop.call_soon_threadsafe(q.put_nowait, ("pcm", pcm))

        def work():
            try:
                stats = self.engine.synthesize(req, emit, cancel.is_set)
                loop.call_soon_threadsafe(q.put_nowait, ("done", stats))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the handler
                loop.call_soon_threadsafe(q.put_nowait, ("error", exc))

        fut = loop.run_in_executor(self.pool, work)
        resp = None
        total_samples = 0
        rate = self.engine.sample_rate
        try:
            while True:
                kind, item = await q.get()
                if kind == "error":
                    if resp is None:
                        if isinstance(item, PayloadError):
                            self.metrics.count(400)
                            return json_error(400, f"bad talker payload: {item}")
                        log.error("synthesis failed: %r", item)
                        self.metrics.count(500)
                        return json_error(500, f"synthesis failed: {type(item).__name__}: {item}", "server_error")
                    log.error("synthesis failed mid-stream: %r", item)
                    break
                if resp is None:
                    resp = web.StreamResponse(status=200, headers={
                        "Content-Type": "audio/wav" if req.format == "wav" else "audio/pcm",
                        "X-Omni-Sample-Rate": str(rate),
                        "X-Omni-Channels": "1",
                        "X-Omni-Sample-Format": "s16le",
                        "X-Omni-Request-Id": req.request_id,
                        "Cache-Control": "no-store",
                    })
                    resp.enable_chunked_encoding()
                    await resp.prepare(request)
                    if req.format == "wav":
                        await resp.write(wav_header(rate))
                if kind == "pcm":
                    if total_samples == 0:
                        self.metrics.ttfa.observe(time.monotonic() - arrived)
                    total_samples += len(item) // 2
                    await resp.write(item)
                elif kind == "done":
                    stats = item
                    audio_s = stats.samples / rate
                    if audio_s > 0:
                        self.metrics.rtf.observe((stats.finished - stats.started) / audio_s)
                        self.metrics.audio_seconds.inc(audio_s)
                    break
            await resp.write_eof()
            self.metrics.count(200)
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            cancel.set()
            raise
        finally:
            cancel.set()  # no-op when finished; stops generation when the client went away
            try:
                await asyncio.shield(fut)
            except Exception:  # noqa: BLE001
                pass

    # -- lifecycle ------------------------------------------------------------------
    async def drain(self):
        if not await self.start_draining():
            log.warning("drain deadline reached with %d running, %d waiting: cancelling", self.running, self.waiting)
            for flag in list(self.cancel_flags):
                flag.set()
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.2)  # let the last responses flush before the listeners close
        self.pool.shutdown(wait=False, cancel_futures=True)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg["max_request_bytes"])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/talker/info", self.info)
        app.router.add_post("/v1/talker/synthesize", self.synthesize)
        return app


def config_from_env(environ=None) -> dict:
    cfg = env.common("talker", environ)
    cfg.update(
        max_queue=env.env_int("OMNI_MAX_QUEUE", 16, environ, minimum=0),
        max_inflight=env.env_int("OMNI_MAX_INFLIGHT", 2, environ, minimum=1),
        device=env.env_str("OMNI_DEVICE", "cuda", environ),
        dtype=env.env_str("OMNI_DTYPE", None, environ),
        max_request_bytes=env.env_int("OMNI_MAX_REQUEST_BYTES", 64 << 20, environ, minimum=1024),
        first_chunk=env.env_int("OMNI_TALKER_FIRST_CHUNK_CODES", 4, environ, minimum=1),
        chunk=env.env_int("OMNI_TALKER_CHUNK_CODES", 25, environ, minimum=1),
        host=env.env_str("OMNI_HOST", "0.0.0.0", environ),
    )
    if cfg["device"] not in ("cpu", "cuda") and not cfg["device"].startswith("cuda:"):
        raise env.ConfigError(f"OMNI_DEVICE={cfg['device']!r} must be cpu or cuda")
    return cfg


async def amain(cfg: dict) -> int:
    from .talker_engine import ChunkPolicy, TalkerEngine

    def factory():
        return TalkerEngine(cfg["model"], cfg["revision"], cfg["device"], cfg["dtype"],
                            ChunkPolicy(first=cfg["first_chunk"], every=cfg["chunk"]))

    svc = TalkerService(cfg, factory)
    sites = [(svc.app(), cfg["host"], cfg["port"]), (metrics_app(svc.metrics), cfg["host"], cfg["metrics_port"])]

    async def started():
        asyncio.ensure_future(svc.load(svc.engine_factory))

    return await serve(sites, svc.drain, started)
