"""The gateway's aiohttp application: authentication, request accounting (queue gauges,
latency, status codes), the text proxy to the thinkers, the stop sequence (drain.py), and the
process entry point."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from aiohttp import web

from omni_runtime.config import GatewaySettings
from omni_runtime.gateway import sse
from omni_runtime.gateway.auth import ApiKeys
from omni_runtime.gateway.drain import Drain, DrainTimes
from omni_runtime.gateway.realtime import RealtimeEndpoint
from omni_runtime.gateway.speech import Speech
from omni_runtime.gateway.upstream import ClientGone, Upstreams, UpstreamUnavailable
from omni_runtime.gateway.validation import BadRequest, validate_chat
from omni_runtime.metrics import GatewayMetrics, metrics_app
from omni_runtime.server import json_error, serve

log = logging.getLogger("omni.gateway")


class Gateway:
    def __init__(self, cfg: GatewaySettings):
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        self.upstreams = Upstreams(cfg, self.metrics)
        self.speech = Speech(self.upstreams, cfg, self.metrics)
        self.realtime = RealtimeEndpoint(cfg, self.speech, self.metrics, on_change=self._update)
        self.keys = ApiKeys(cfg.api_keys_file)
        self.waiting = 0
        self.running = 0
        self.drain = Drain(DrainTimes(cfg.shutdown_delay, cfg.drain_seconds))
        # at the drain's deadline, requests still held for a replica get a 503 with Retry-After
        self.drain.on_deadline(self.upstreams.release_held)
        # a realtime session is tracked like a request (the middleware); once new work is refused,
        # each one closes with 1012 after its response in progress; at the deadline it is ended
        self.drain.on_closing(self.realtime.close_sessions)
        self.drain.on_deadline(self.realtime.end_sessions)

    def _update(self):
        self.metrics.queue_depth.set(self.waiting)
        # an open realtime session is a request in progress (docs/realtime.md, "Scaling")
        self.metrics.running.set(self.running + self.realtime.sessions)
        self.metrics.ready.set(1 if self.drain.ready else 0)
        self.metrics.draining.set(0 if self.drain.ready else 1)

    async def start(self):
        await self.upstreams.start()
        self._update()

    async def stop(self):
        """SIGTERM: the drain's phases (drain.py), then the upstream session closes."""
        self.drain.begin()
        self._update()
        await self.drain.run()
        self.realtime.close()
        await asyncio.sleep(0.2)  # let the last responses flush before the listeners close
        await self.upstreams.close()

    @web.middleware
    async def middleware(self, request, handler):
        if request.path == "/health":
            return await handler(request)
        if not self.keys.check(request.headers.get("Authorization")):
            self.metrics.count(401)
            return json_error(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error")
        if not self.drain.accepting:
            self.metrics.count(503)
            resp = json_error(503, "this gateway replica is shutting down; retry (another replica serves)",
                              "unavailable", headers={"Retry-After": "1"})
            resp.force_close()
            return resp
        with self.drain.track():
            resp = await handler(request)
        if not self.drain.ready:
            # a keep-alive connection stays on this pod: the client's next request should open a
            # new one, which the Service routes to a replica that is not stopping
            resp.force_close()
        return resp

    async def health(self, _request):
        if not self.drain.ready:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok", "running": self.running})

    async def models(self, _request):
        try:
            async with self.upstreams.call("GET", self.upstreams.thinkers, "/v1/models", hold=False) as (_ep, resp):
                body = await resp.read()
                return web.Response(body=body, status=resp.status, content_type="application/json")
        except UpstreamUnavailable:
            name = self.cfg.served_model_name or self.cfg.model
            return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "omni"}]})

    async def chat(self, request: web.Request):
        arrived = time.monotonic()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.count(413)
            return json_error(413, f"request body exceeds {self.cfg.max_request_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.metrics.count(400)
            return json_error(400, "request body is not valid JSON")
        try:
            opts = validate_chat(body, self.cfg.max_media_bytes)
        except BadRequest as exc:
            self.metrics.count(400)
            return json_error(400, str(exc))
        mode = "audio" if opts.audio_out else "text"
        self.running += 1
        self.waiting += 1
        self._update()
        marks = {"first": None, "waiting": True}

        def first_byte():
            if marks["waiting"]:
                marks["waiting"] = False
                self.waiting -= 1
                self._update()
            if marks["first"] is None:
                marks["first"] = time.monotonic()
                self.metrics.ttfb.labels(mode).observe(marks["first"] - arrived)

        status = 500
        try:
            if opts.audio_out:
                resp = await self.speech.respond(request, body, opts, first_byte)
            else:
                resp = await self._chat_text(request, body, opts.stream, first_byte)
            status = resp.status
            return resp
        except UpstreamUnavailable as exc:
            status = exc.status
            return json_error(exc.status, str(exc), "unavailable", headers={"Retry-After": "1"})
        except ClientGone:
            status = 499  # client closed the connection while its request was held
            log.info("client left while its request was held")
            return web.Response(status=499)
        finally:
            if marks["waiting"]:
                self.waiting -= 1
            self.running -= 1
            self.metrics.finished.inc()
            self._update()
            self.metrics.count(status)
            self.metrics.latency.labels("chat", mode).observe(time.monotonic() - arrived)

    async def _chat_text(self, request, body, stream: bool, first_byte):
        async with self.upstreams.call("POST", self.upstreams.thinkers, "/v1/chat/completions", request,
                                       json=body) as (ep, up):
            first_byte()
            if not stream or up.status != 200:
                try:
                    data = await up.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    return _broke_off(ep, exc)
                return web.Response(body=data, status=up.status, content_type=up.content_type or "application/json")
            resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            while True:
                try:
                    chunk = await up.content.readany()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # the thinker went away mid-answer (its process killed, its node lost): end the
                    # client's stream with an error event rather than leave it cut off
                    log.warning("thinker %s broke off a stream: %s: %s", ep.url, type(exc).__name__, exc)
                    await resp.write(sse.error_event(f"the thinker serving this request went away mid-answer "
                                                     f"({type(exc).__name__}); retry", "upstream_error", 502))
                    await resp.write(sse.DONE)
                    break
                if not chunk:
                    break
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_request_bytes, middlewares=[self.middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/realtime", self.realtime.handle)
        return app


def _broke_off(ep, exc: BaseException) -> web.Response:
    """A thinker's answer cut before it was whole: 502, retryable."""
    log.warning("thinker %s broke off an answer: %s: %s", ep.url, type(exc).__name__, exc)
    return json_error(502, f"the thinker serving this request went away mid-answer ({type(exc).__name__}); retry",
                      "upstream_error", headers={"Retry-After": "1"})


async def amain(cfg: GatewaySettings) -> int:
    gw = Gateway(cfg)
    await gw.start()
    sites = [(gw.app(), cfg.host, cfg.port), (metrics_app(gw.metrics), cfg.host, cfg.metrics_port)]
    return await serve(sites, gw.stop)
