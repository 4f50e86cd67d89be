"""The OpenAI-compatible front door.

    POST /v1/chat/completions   text: proxied to the least-loaded thinker (stream or not)
                                modalities containing "audio": thinker (text + token ids +
                                multimodal states) -> talker payload -> least-loaded talker;
                                text first, then audio, as OpenAI-style `audio` deltas
    GET  /v1/models
    GET  /health                200 serving, 503 draining

Upstreams come from OMNI_THINKER_SERVICE / OMNI_TALKER_SERVICE: comma-separated
host:port[|metricsPort] entries; each host is resolved to all its A/AAAA records (a
headless Service gives one per ready pod) and re-resolved every few seconds.

Routing: every OMNI_SCRAPE_SECONDS the gateway scrapes each endpoint's /metrics
(omni_queue_depth + omni_requests_running) and sends a request to the endpoint with the
least of that plus what it sent there since the scrape. When no endpoint of a role is
reachable (scaled to zero, starting) a request is held up to OMNI_UPSTREAM_WAIT_SECONDS,
counted in omni_gateway_waiting_requests{role}, the autoscaler's scale-from-zero signal.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from . import env
from .audio import wav_header
from .metrics import GatewayMetrics, metrics_app, parse_prometheus_text
from .server import json_error, serve

log = logging.getLogger("omni.gateway")

INPUT_AUDIO_FORMATS = ("wav", "mp3")
OUTPUT_AUDIO_FORMATS = ("wav", "pcm16")
CONTENT_PART_TYPES = ("text", "image_url", "input_audio")
RESOLVE_EVERY = 5.0   # seconds between DNS look-ups of the upstream services
DOWN_FOR = 5.0        # an endpoint that refused a connection is tried last for this long
RETRY_EVERY = 1.0     # while a request is held: re-resolve and retry this often
QUEUE_METRIC = "omni_queue_depth"
RUNNING_METRIC = "omni_requests_running"


class BadRequest(ValueError):
    pass


# -- upstream pools ---------------------------------------------------------------------

@dataclass
class Endpoint:
    host: str
    port: int
    metrics_port: int = 0          # 0: not scraped
    target: int = 0                # index of the service entry this address came from
    down_until: float = 0.0        # refused a connection (or answered 503): tried last until then
    scraped: float | None = None   # waiting + running the upstream reported at its last good scrape
    scraped_at: float = 0.0        # when that scrape was sent (monotonic)
    scrape_ok: bool | None = None
    started: list[float] = field(default_factory=list)  # dispatch times of this gateway's requests in flight

    @property
    def url(self) -> str:
        return f"http://{_host(self.host)}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def inflight(self) -> int:
        return len(self.started)

    def acquire(self) -> float:
        token = time.monotonic()
        self.started.append(token)
        return token

    def release(self, token: float) -> None:
        try:
            self.started.remove(token)
        except ValueError:
            pass


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def endpoint_load(ep: Endpoint, now: float, stale_after: float) -> float:
    """Work at an endpoint as this gateway sees it: what the upstream itself reported at
    the last scrape (waiting + running, every gateway's requests included) plus the
    requests this gateway sent it since that scrape started. Without a recent scrape,
    only this gateway's own requests in flight."""
    if ep.scraped is not None and now - ep.scraped_at <= stale_after:
        return ep.scraped + sum(1 for t in ep.started if t >= ep.scraped_at)
    return float(len(ep.started))


def rank_endpoints(endpoints: list[Endpoint], now: float, stale_after: float) -> list[Endpoint]:
    """The order to try endpoints in: least loaded first (ties keep the configured
    order); endpoints inside their down backoff go last, the one that failed longest
    ago first, so they are tried only when nothing else is left."""
    def key(ep: Endpoint):
        down = ep.down_until > now
        return (down, ep.down_until if down else 0.0, endpoint_load(ep, now, stale_after))

    return sorted(endpoints, key=key)


def parse_service_list(spec: str, default_metrics_port: int = 0) -> list[tuple[str, int, int]]:
    """`host:port[|metricsPort],...` -> [(host, port, metrics_port)]; an entry without
    `|metricsPort` gets `default_metrics_port` (0 = do not scrape)."""
    out = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        addr, bar, mport = item.partition("|")
        host, sep, port = addr.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise env.ConfigError(f"upstream {item!r} is not host:port or host:port|metricsPort")
        if bar:
            mport = mport.strip()
            if not mport.isdigit() or not 0 <= int(mport) < 65536:
                raise env.ConfigError(f"upstream {item!r}: metrics port {mport!r} is not a port number")
            metrics_port = int(mport)
        else:
            metrics_port = default_metrics_port
        out.append((host.strip("[]"), int(port), metrics_port))
    return out


# getaddrinfo answers meaning "this name has no address now" (a headless Service with no
# ready pod), as opposed to resolver trouble, where the last known addresses are kept
_NO_RECORDS = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}


@dataclass
class Pool:
    role: str
    targets: list[tuple[str, int, int]]
    endpoints: dict[tuple[str, int], Endpoint] = field(default_factory=dict)
    resolved_at: float = 0.0
    stale_after: float = 3.0

    async def resolve(self) -> None:
        loop = asyncio.get_running_loop()
        found: dict[tuple[str, int], Endpoint] = {}
        for idx, (host, port, metrics_port) in enumerate(self.targets):
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                addrs = sorted({i[4][0] for i in infos})
            except socket.gaierror as exc:
                if exc.errno in _NO_RECORDS:
                    addrs = []
                else:
                    log.warning("%s: cannot resolve %s (keeping its last addresses): %s", self.role, host, exc)
                    found.update({k: ep for k, ep in self.endpoints.items() if ep.target == idx})
                    continue
            for a in addrs:
                found.setdefault((a, port), self.endpoints.get((a, port)) or Endpoint(a, port, metrics_port, idx))
        if set(found) != set(self.endpoints):
            log.info("%s endpoints: %s", self.role, ", ".join(f"{h}:{p}" for h, p in found) or "none")
        self.endpoints = found
        self.resolved_at = time.monotonic()

    async def candidates(self) -> list[Endpoint]:
        if time.monotonic() - self.resolved_at > RESOLVE_EVERY or not self.endpoints:
            await self.resolve()
        return rank_endpoints(list(self.endpoints.values()), time.monotonic(), self.stale_after)


# -- request validation -----------------------------------------------------------------

def _check_base64(data, where: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise BadRequest(f"{where}: data must be a non-empty base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: data is not valid base64") from None


def validate_chat(body) -> dict:
    """Validate the parts of a chat request the gateway is responsible for; returns
    {"audio_out": bool, "voice": str, "format": str, "stream": bool, "multimodal": bool}."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    multimodal = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        if msg.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise BadRequest(f"messages[{i}].role {msg.get('role')!r} is not a chat role")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or a list of content parts")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise BadRequest(f"{where} must be an object")
            kind = part.get("type")
            if kind not in CONTENT_PART_TYPES:
                raise BadRequest(f"{where}: unknown content part type {kind!r}; "
                                 f"supported: {', '.join(CONTENT_PART_TYPES)}")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where}: text must be a string")
            elif kind == "input_audio":
                multimodal = True
                spec = part.get("input_audio")
                if not isinstance(spec, dict):
                    raise BadRequest(f"{where}: input_audio must be an object with data and format")
                fmt = spec.get("format")
                if fmt not in INPUT_AUDIO_FORMATS:
                    raise BadRequest(f"{where}: unsupported audio format {fmt!r}; supported: "
                                     f"{', '.join(INPUT_AUDIO_FORMATS)}")
                raw = _check_base64(spec.get("data"), where)
                if fmt == "wav" and (len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE"):
                    raise BadRequest(f"{where}: data is not a WAV file")
            elif kind == "image_url":
                multimodal = True
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else None
                if not isinstance(url, str) or not url:
                    raise BadRequest(f"{where}: image_url.url must be a string")
                if url.startswith("data:"):
                    header, sep, data = url.partition(",")
                    if not sep or ";base64" not in header or not header[5:].startswith("image/"):
                        raise BadRequest(f"{where}: data URL must be data:image/<type>;base64,<data>")
                    _check_base64(data, where)
                elif not url.startswith(("http://", "https://")):
                    raise BadRequest(f"{where}: image_url.url must be an http(s) or data: URL")
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or any(m not in ("text", "audio") for m in modalities):
        raise BadRequest("modalities must be a list of 'text' and 'audio'")
    audio_out = "audio" in modalities
    audio = body.get("audio") or {}
    if not isinstance(audio, dict):
        raise BadRequest("audio must be an object with voice and format")
    fmt = audio.get("format", "wav")
    if audio_out and fmt not in OUTPUT_AUDIO_FORMATS:
        raise BadRequest(f"unsupported output audio format {fmt!r}; supported: {', '.join(OUTPUT_AUDIO_FORMATS)}")
    voice = audio.get("voice", "Ethan")
    if not isinstance(voice, str) or not voice:
        raise BadRequest("audio.voice must be a string")
    n = body.get("n", 1)
    if audio_out and n not in (1, None):
        raise BadRequest("audio output supports n=1 only")
    return {"audio_out": audio_out, "voice": voice, "format": fmt, "stream": bool(body.get("stream")),
            "multimodal": multimodal}


# -- API keys ---------------------------------------------------------------------------

class ApiKeys:
    def __init__(self, path: str | None):
        self.path = path
        self.mtime = None
        self.keys: set[str] = set()

    def _load(self):
        if not self.path:
            return
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            self.keys = set()
            return
        if mtime != self.mtime:
            with open(self.path) as fh:
                self.keys = {ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")}
            self.mtime = mtime

    def check(self, header: str | None) -> bool:
        if not self.path:
            return True
        self._load()
        if not header or not header.startswith("Bearer "):
            return False
        return header[7:].strip() in self.keys


# -- the service ------------------------------------------------------------------------

class UpstreamUnavailable(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client disconnected while its request was held."""


@dataclass
class _Attempt:
    """Why one pass over a pool's endpoints found no taker."""
    status: int = 503
    last: str = "no endpoints resolved"
    absent: bool = True  # nothing reachable (refused, timed out, loading/draining); False once one said 429


class _Taken:
    """An endpoint's response to a request; `async with` yields (endpoint, response) and
    gives both back (connection released, endpoint's in-flight count decremented)."""

    def __init__(self, ep: Endpoint, resp: aiohttp.ClientResponse, token: float):
        self.ep, self.resp, self.token = ep, resp, token

    async def __aenter__(self):
        return self.ep, self.resp

    async def __aexit__(self, *_exc):
        self.resp.release()
        self.ep.release(self.token)


class Gateway:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        mport = cfg.get("upstream_metrics_port", 0) if cfg.get("scrape_seconds", 0) > 0 else 0
        stale = max(3 * cfg.get("scrape_seconds", 1.0), 2.0)
        self.thinkers = Pool("thinker", parse_service_list(cfg["thinker_service"], mport), stale_after=stale)
        self.talkers = Pool("talker", parse_service_list(cfg["talker_service"], mport), stale_after=stale)
        self.keys = ApiKeys(cfg["api_keys_file"])
        self.session: aiohttp.ClientSession | None = None
        self.scraper: asyncio.Task | None = None
        self.waiting = 0
        self.running = 0
        self.draining = False

    def _update(self):
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(self.running)
        self.metrics.ready.set(0 if self.draining else 1)
        self.metrics.draining.set(1 if self.draining else 0)

    async def start(self):
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg["connect_timeout"], sock_read=self.cfg["read_timeout"]),
            auto_decompress=False)
        self._update()
        if self.cfg.get("scrape_seconds", 0) > 0:
            self.scraper = asyncio.ensure_future(self._scrape_loop())

    async def drain(self):
        self.draining = True
        self._update()
        deadline = time.monotonic() + self.cfg["drain_seconds"]
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let the last responses flush before the listeners close
        if self.scraper:
            self.scraper.cancel()
        if self.session:
            await self.session.close()

    # -- upstream load: scrape each endpoint's omni_queue_depth + omni_requests_running --

    async def _scrape_loop(self):
        every = self.cfg["scrape_seconds"]
        while True:
            began = time.monotonic()
            for pool in (self.thinkers, self.talkers):
                try:
                    if pool.targets and time.monotonic() - pool.resolved_at > RESOLVE_EVERY:
                        await pool.resolve()
                    await asyncio.gather(*(self._scrape(pool, ep) for ep in list(pool.endpoints.values())
                                           if ep.metrics_port))
                except Exception:  # noqa: BLE001 - the scrape is advisory; never let the loop die
                    log.exception("%s: scrape pass failed", pool.role)
            await asyncio.sleep(max(0.05, every - (time.monotonic() - began)))

    async def _scrape(self, pool: Pool, ep: Endpoint) -> None:
        sent = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=max(0.5, min(2.0, self.cfg["scrape_seconds"])))
        try:
            async with self.session.get(ep.metrics_url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                values = parse_prometheus_text(await resp.text())
            if QUEUE_METRIC not in values and RUNNING_METRIC not in values:
                raise ValueError(f"neither {QUEUE_METRIC} nor {RUNNING_METRIC} exported")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, UnicodeDecodeError) as exc:
            self.metrics.scrape_errors.labels(pool.role).inc()
            if ep.scrape_ok is not False:
                log.warning("%s: cannot scrape %s (routing on this gateway's own in-flight count): %s",
                            pool.role, ep.metrics_url, f"{type(exc).__name__}: {exc}")
            ep.scrape_ok = False
            return
        if ep.scrape_ok is False:
            log.info("%s: scraping %s works again", pool.role, ep.metrics_url)
        ep.scrape_ok = True
        ep.scraped = values.get(QUEUE_METRIC, 0.0) + values.get(RUNNING_METRIC, 0.0)
        ep.scraped_at = sent

    @web.middleware
    async def middleware(self, request, handler):
        if request.path == "/health":
            return await handler(request)
        if not self.keys.check(request.headers.get("Authorization")):
            self.metrics.count(401)
            return json_error(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error")
        if self.draining:
            self.metrics.count(503)
            return json_error(503, "gateway is draining", "unavailable", headers={"Retry-After": "1"})
        return await handler(request)

    async def health(self, _request):
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok", "running": self.running})

    async def models(self, _request):
        try:
            async with self._upstream("GET", self.thinkers, "/v1/models", hold=False) as (_ep, resp):
                body = await resp.read()
                return web.Response(body=body, status=resp.status, content_type="application/json")
        except UpstreamUnavailable:
            name = self.cfg["served_model_name"] or self.cfg["model"]
            return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "omni"}]})

    # -- upstream call: least-loaded endpoint, failover, and holding while none is reachable --

    @contextlib.asynccontextmanager
    async def _upstream(self, method, pool: Pool, path: str, request: web.Request | None = None,
                        hold: bool = True, **kw):
        async with await self._connect(method, pool, path, request, hold, kw) as taken:
            yield taken

    async def _connect(self, method, pool: Pool, path: str, request, hold: bool, kw: dict) -> _Taken:
        if not pool.targets:
            raise UpstreamUnavailable(503, f"no {pool.role} service is configured "
                                           f"(OMNI_{pool.role.upper()}_SERVICE is empty)")
        wait = self.cfg.get("upstream_wait", 0.0) if hold else 0.0
        gauge = self.metrics.waiting_requests.labels(pool.role)
        held_since = None
        try:
            while True:
                got = await self._try_endpoints(method, pool, path, kw, quiet=held_since is not None)
                if not isinstance(got, _Attempt):
                    if held_since is not None:
                        log.info("%s: held request goes to %s after %.1f s", pool.role, got.ep.url,
                                 time.monotonic() - held_since)
                    return got
                if not got.absent or wait <= 0:
                    raise UpstreamUnavailable(got.status, f"no {pool.role} replica could take the request ({got.last})")
                now = time.monotonic()
                if held_since is None:
                    held_since = now
                    gauge.inc()
                    log.info("%s: no replica reachable, holding the request up to %g s (%s)", pool.role, wait, got.last)
                left = held_since + wait - now
                if left <= 0:
                    log.warning("%s: gave up on a held request after %g s: %s", pool.role, wait, got.last)
                    raise UpstreamUnavailable(
                        503, f"no {pool.role} replica became available within {wait:g} s "
                             f"(OMNI_UPSTREAM_WAIT_SECONDS); the {pool.role} may be scaled to zero or starting; "
                             f"last error: {got.last}")
                await self._pause(request, min(RETRY_EVERY, left))
                await pool.resolve()
        finally:
            if held_since is not None:
                gauge.dec()

    async def _pause(self, request, seconds: float) -> None:
        """Sleep while a request is held; stop early if the client left or the gateway drains."""
        end = time.monotonic() + seconds
        while True:
            if request is not None and (request.transport is None or request.transport.is_closing()):
                raise ClientGone()
            if self.draining:
                raise UpstreamUnavailable(503, "gateway is draining")
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(0.1, left))

    async def _try_endpoints(self, method, pool: Pool, path: str, kw: dict, quiet: bool):
        """One pass over the pool, least loaded first, at most OMNI_MAX_ATTEMPTS endpoints:
        a _Taken from the first that takes the request, else an _Attempt."""
        why = _Attempt()
        if pool.targets and not pool.endpoints:
            why.last = f"{', '.join(h for h, _, _ in pool.targets)} resolved to no address"
        say = log.debug if quiet else log.warning
        for ep in (await pool.candidates())[: self.cfg["max_attempts"]]:
            token = ep.acquire()
            try:
                resp = await self.session.request(method, ep.url + path, **kw)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                ep.release(token)
                ep.down_until = time.monotonic() + DOWN_FOR
                self.metrics.upstream_errors.labels(pool.role).inc()
                why.last = f"{pool.role} {ep.url}: {type(exc).__name__}: {exc}"
                say("upstream failed, trying another: %s", why.last)
                continue
            except BaseException:
                ep.release(token)
                raise
            if resp.status in (429, 503):
                try:
                    text = (await resp.text())[:200]
                except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError):
                    text = ""
                resp.release()
                ep.release(token)
                why.last = f"{pool.role} {ep.url} answered {resp.status}: {text}"
                if resp.status == 503:  # loading or draining: counts as not reachable
                    ep.down_until = time.monotonic() + 1.0
                else:  # overloaded: a real answer, passed on rather than held
                    why.status, why.absent = 429, False
                continue
            return _Taken(ep, resp, token)
        return why

    async def chat(self, request: web.Request):
        arrived = time.monotonic()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.count(413)
            return json_error(413, f"request body exceeds {self.cfg['max_request_bytes']} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.metrics.count(400)
            return json_error(400, "request body is not valid JSON")
        try:
            opts = validate_chat(body)
        except BadRequest as exc:
            self.metrics.count(400)
            return json_error(400, str(exc))
        mode = "audio" if opts["audio_out"] else "text"
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
            if opts["audio_out"]:
                resp = await self._chat_audio(request, body, opts, first_byte)
            else:
                resp = await self._chat_text(request, body, opts, first_byte)
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
            self._update()
            self.metrics.count(status)
            self.metrics.latency.labels("chat", mode).observe(time.monotonic() - arrived)

    async def _chat_text(self, request, body, opts, first_byte):
        async with self._upstream("POST", self.thinkers, "/v1/chat/completions", request, json=body) as (_ep, up):
            first_byte()
            if not opts["stream"] or up.status != 200:
                data = await up.read()
                return web.Response(body=data, status=up.status,
                                    content_type=up.content_type or "application/json")
            resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def _thinker_for_speech(self, request, body: dict, on_text):
        """Run the thinker (streaming) and collect what the talker needs."""
        req = dict(body)
        for k in ("modalities", "audio"):
            req.pop(k, None)
        req.update(stream=True, return_token_ids=True, omni_return_mm_states=True)
        out = {"text": "", "prompt_ids": None, "response_ids": [], "mm": None, "finish": None, "usage": None,
               "model": body.get("model")}
        async with self._upstream("POST", self.thinkers, "/v1/chat/completions", request, json=req) as (ep, up):
            if up.status != 200:
                raise _Passthrough(up.status, await up.read(), up.content_type)
            buf = b""
            async for chunk in up.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            continue
                        obj = json.loads(data)
                        out["model"] = obj.get("model", out["model"])
                        if obj.get("prompt_token_ids") is not None:
                            out["prompt_ids"] = obj["prompt_token_ids"]
                        if obj.get("omni_mm_states"):
                            out["mm"] = obj["omni_mm_states"]
                        if obj.get("usage"):
                            out["usage"] = obj["usage"]
                        for ch in obj.get("choices") or []:
                            if ch.get("token_ids"):
                                out["response_ids"] += ch["token_ids"]
                            delta = (ch.get("delta") or {}).get("content")
                            if delta:
                                out["text"] += delta
                                await on_text(delta)
                            if ch.get("finish_reason"):
                                out["finish"] = ch["finish_reason"]
            if out["prompt_ids"] is None or not out["response_ids"]:
                # engines that do not return token ids: ask the same replica to tokenize
                tk = await self.session.post(ep.url + "/tokenize", json={
                    "messages": body["messages"], "add_generation_prompt": True, "model": body.get("model")})
                out["prompt_ids"] = (await tk.json())["tokens"]
                tk = await self.session.post(ep.url + "/tokenize", json={
                    "prompt": out["text"], "add_special_tokens": False, "model": body.get("model")})
                out["response_ids"] = (await tk.json())["tokens"]
        return out

    def _talker_payload(self, th: dict, opts: dict, rid: str) -> dict:
        return {"v": 1, "request_id": rid, "speaker": opts["voice"], "prompt_ids": th["prompt_ids"],
                "response_ids": th["response_ids"], "mm": th["mm"], "format": "pcm",
                "generation": self.cfg["talker_generation"]}

    async def _chat_audio(self, request, body, opts, first_byte):
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        aid = f"audio_{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        stream = opts["stream"]
        resp = None

        def sse(obj) -> bytes:
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        def chunk(delta, finish=None, model=None):
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model or body.get("model"),
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        async def ensure_stream():
            nonlocal resp
            if resp is None:
                resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                await resp.prepare(request)
                await resp.write(chunk({"role": "assistant", "content": None}))
            return resp

        async def on_text(delta):
            first_byte()
            if stream:
                await (await ensure_stream()).write(chunk({"audio": {"id": aid, "transcript": delta}}))

        try:
            th = await self._thinker_for_speech(request, body, on_text)
        except _Passthrough as p:
            return web.Response(body=p.body, status=p.status, content_type=p.content_type or "application/json")
        if opts["multimodal"] and th["mm"] is None:
            msg = ("audio output for multimodal input needs the thinker's hidden states at the multimodal positions; "
                   "this thinker engine does not export them (see runtime/README.md)")
            if stream:
                r = await ensure_stream()
                await r.write(sse({"error": {"message": msg, "type": "not_implemented", "code": 501}}))
                await r.write(b"data: [DONE]\n\n")
                await r.write_eof()
                return r
            return json_error(501, msg, "not_implemented")
        payload = self._talker_payload(th, opts, rid)
        pcm = bytearray()
        carry = b""
        rate = None
        try:
            talker = await self._connect("POST", self.talkers, "/v1/talker/synthesize", request, True,
                                         {"json": payload})
        except (UpstreamUnavailable, ClientGone) as exc:
            if resp is None:
                raise
            # the transcript is already streaming: end the stream with the error
            if isinstance(exc, UpstreamUnavailable):
                await resp.write(sse({"error": {"message": str(exc), "type": "unavailable", "code": exc.status}}))
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            return resp
        async with talker as (_ep, up):
            if up.status != 200:
                text = await up.text()
                msg = f"talker answered {up.status}: {text[:300]}"
                if stream:
                    r = await ensure_stream()
                    await r.write(sse({"error": {"message": msg, "type": "upstream_error", "code": up.status}}))
                    await r.write(b"data: [DONE]\n\n")
                    await r.write_eof()
                    return r
                return json_error(502, msg, "upstream_error")
            rate = int(up.headers.get("X-Omni-Sample-Rate", "24000"))
            async for data in up.content.iter_any():
                data = carry + data
                cut = len(data) - (len(data) % 2)
                data, carry = data[:cut], data[cut:]
                if not data:
                    continue
                first_byte()
                if stream:
                    await (await ensure_stream()).write(
                        chunk({"audio": {"id": aid, "data": base64.b64encode(data).decode()}}))
                else:
                    pcm += data
        expires = created + 3600
        if stream:
            r = await ensure_stream()
            await r.write(chunk({"audio": {"id": aid, "expires_at": expires, "format": "pcm16", "sample_rate": rate}},
                                finish=th["finish"] or "stop", model=th["model"]))
            await r.write(b"data: [DONE]\n\n")
            await r.write_eof()
            return r
        audio_bytes = bytes(pcm)
        if opts["format"] == "wav":
            audio_bytes = wav_header(rate, len(pcm) // 2) + audio_bytes
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": th["model"],
            "choices": [{"index": 0, "finish_reason": th["finish"] or "stop", "message": {
                "role": "assistant", "content": None,
                "audio": {"id": aid, "data": base64.b64encode(audio_bytes).decode(), "expires_at": expires,
                          "transcript": th["text"], "format": opts["format"], "sample_rate": rate}}}],
            "usage": th["usage"],
        })

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg["max_request_bytes"], middlewares=[self.middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app


class _Passthrough(Exception):
    def __init__(self, status, body, content_type):
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


def config_from_env(environ=None) -> dict:
    cfg = env.common("gateway", environ)
    thinker = env.env_str("OMNI_THINKER_SERVICE", None, environ)
    if not thinker:
        raise env.ConfigError("OMNI_THINKER_SERVICE is required (host:port of the thinker headless Service)")
    gen_raw = env.env_str("OMNI_TALKER_GENERATION", "{}", environ)
    try:
        gen = json.loads(gen_raw)
    except json.JSONDecodeError:
        raise env.ConfigError(f"OMNI_TALKER_GENERATION is not JSON: {gen_raw!r}") from None
    cfg.update(
        thinker_service=thinker,
        talker_service=env.env_str("OMNI_TALKER_SERVICE", "", environ),
        api_keys_file=env.env_str("OMNI_API_KEYS_FILE", None, environ),
        max_request_bytes=env.env_int("OMNI_MAX_REQUEST_BYTES", 32 << 20, environ, minimum=1024),
        max_attempts=env.env_int("OMNI_MAX_ATTEMPTS", 3, environ, minimum=1),
        connect_timeout=env.env_float("OMNI_CONNECT_TIMEOUT", 3.0, environ),
        read_timeout=env.env_float("OMNI_READ_TIMEOUT", 600.0, environ),
        talker_generation=gen,
        host=env.env_str("OMNI_HOST", "0.0.0.0", environ),
        scrape_seconds=_non_negative("OMNI_SCRAPE_SECONDS", 1.0, environ),
        upstream_metrics_port=env.env_int("OMNI_UPSTREAM_METRICS_PORT", 9400, environ, minimum=0),
        upstream_wait=_non_negative("OMNI_UPSTREAM_WAIT_SECONDS", 120.0, environ),
    )
    if cfg["upstream_metrics_port"] > 65535:
        raise env.ConfigError(f"OMNI_UPSTREAM_METRICS_PORT={cfg['upstream_metrics_port']} is not a port number")
    if 0 < cfg["scrape_seconds"] < 0.1:
        raise env.ConfigError(f"OMNI_SCRAPE_SECONDS={cfg['scrape_seconds']:g} must be 0 (off) or >= 0.1")
    for name in ("OMNI_THINKER_SERVICE", "OMNI_TALKER_SERVICE"):
        try:
            parse_service_list(cfg[name[5:].lower()])
        except env.ConfigError as exc:
            raise env.ConfigError(f"{name}: {exc}") from None
    return cfg


def _non_negative(name: str, default: float, environ) -> float:
    value = env.env_float(name, default, environ)
    if not value >= 0:  # also refuses nan
        raise env.ConfigError(f"{name}={value:g} must be >= 0")
    return value


async def amain(cfg: dict) -> int:
    gw = Gateway(cfg)
    await gw.start()
    sites = [(gw.app(), cfg["host"], cfg["port"]), (metrics_app(gw.metrics), cfg["host"], cfg["metrics_port"])]
    return await serve(sites, gw.drain)
