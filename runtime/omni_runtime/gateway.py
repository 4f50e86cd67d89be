"""The OpenAI-compatible front door.

    POST /v1/chat/completions   text: proxied to the least-loaded thinker (stream or not)
                                modalities containing "audio": thinker (text + token ids +
                                multimodal states) -> talker payload -> least-loaded talker;
                                text first, then audio, as OpenAI-style `audio` deltas
    GET  /v1/models
    GET  /health                200 serving, 503 draining

Upstreams come from OMNI_THINKER_SERVICE / OMNI_TALKER_SERVICE: comma-separated
host:port entries; each host is resolved to all its A/AAAA records (a headless Service
gives one per ready pod) and re-resolved every few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
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
from .metrics import GatewayMetrics, metrics_app
from .server import json_error, serve

log = logging.getLogger("omni.gateway")

INPUT_AUDIO_FORMATS = ("wav", "mp3")
OUTPUT_AUDIO_FORMATS = ("wav", "pcm16")
CONTENT_PART_TYPES = ("text", "image_url", "input_audio")
RESOLVE_EVERY = 5.0
DOWN_FOR = 5.0


class BadRequest(ValueError):
    pass


# -- upstream pools ---------------------------------------------------------------------

@dataclass
class Endpoint:
    host: str
    port: int
    inflight: int = 0
    down_until: float = 0.0
    queue_depth: float = 0.0

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"


def parse_service_list(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise env.ConfigError(f"upstream {item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return out


@dataclass
class Pool:
    role: str
    targets: list[tuple[str, int]]
    endpoints: dict[tuple[str, int], Endpoint] = field(default_factory=dict)
    resolved_at: float = 0.0

    async def resolve(self) -> None:
        loop = asyncio.get_running_loop()
        found: list[tuple[str, int]] = []
        for host, port in self.targets:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                addrs = sorted({i[4][0] for i in infos})
            except socket.gaierror as exc:
                log.warning("%s: cannot resolve %s: %s", self.role, host, exc)
                continue
            found += [(a, port) for a in addrs]
        if found or not self.endpoints:
            self.endpoints = {k: self.endpoints.get(k) or Endpoint(*k) for k in found}
        self.resolved_at = time.monotonic()

    async def candidates(self) -> list[Endpoint]:
        if time.monotonic() - self.resolved_at > RESOLVE_EVERY or not self.endpoints:
            await self.resolve()
        now = time.monotonic()
        eps = list(self.endpoints.values())
        # least loaded first (in-flight from this gateway plus scraped queue depth); endpoints
        # that just failed go last, so they are retried only when nothing else is left
        return sorted(eps, key=lambda e: (e.down_until > now, e.inflight + e.queue_depth))


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


class Gateway:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        self.thinkers = Pool("thinker", parse_service_list(cfg["thinker_service"]))
        self.talkers = Pool("talker", parse_service_list(cfg["talker_service"]))
        self.keys = ApiKeys(cfg["api_keys_file"])
        self.session: aiohttp.ClientSession | None = None
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

    async def drain(self):
        self.draining = True
        self._update()
        deadline = time.monotonic() + self.cfg["drain_seconds"]
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let the last responses flush before the listeners close
        if self.session:
            await self.session.close()

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
            async with self._pick_and_request("GET", self.thinkers, "/v1/models") as (_ep, resp):
                body = await resp.read()
                return web.Response(body=body, status=resp.status, content_type="application/json")
        except UpstreamUnavailable:
            name = self.cfg["served_model_name"] or self.cfg["model"]
            return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "omni"}]})

    # upstream call with failover on connection errors (and on 429/503 from that replica)
    def _pick_and_request(self, method, pool: Pool, path: str, **kw):
        gw = self

        class Ctx:
            async def __aenter__(self):
                last = "no upstream endpoints resolved"
                status = 503
                tried = 0
                for ep in await pool.candidates():
                    if tried >= gw.cfg["max_attempts"]:
                        break
                    tried += 1
                    ep.inflight += 1
                    self.ep = ep
                    try:
                        self.resp = await gw.session.request(method, ep.url + path, **kw)
                    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                        ep.inflight -= 1
                        ep.down_until = time.monotonic() + DOWN_FOR
                        gw.metrics.upstream_errors.labels(pool.role).inc()
                        last = f"{pool.role} {ep.url}: {type(exc).__name__}: {exc}"
                        log.warning("upstream failed, trying another: %s", last)
                        continue
                    if self.resp.status in (429, 503):
                        status = self.resp.status
                        last = f"{pool.role} {ep.url} answered {status}: {(await self.resp.text())[:200]}"
                        self.resp.release()
                        ep.inflight -= 1
                        if status == 503:
                            ep.down_until = time.monotonic() + 1.0
                        continue
                    return ep, self.resp
                raise UpstreamUnavailable(status, f"no {pool.role} replica could take the request ({last})")

            async def __aexit__(self, *exc):
                self.resp.release()
                self.ep.inflight -= 1

        return Ctx()

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
        finally:
            if marks["waiting"]:
                self.waiting -= 1
            self.running -= 1
            self._update()
            self.metrics.count(status)
            self.metrics.latency.labels("chat", mode).observe(time.monotonic() - arrived)

    async def _chat_text(self, request, body, opts, first_byte):
        async with self._pick_and_request("POST", self.thinkers, "/v1/chat/completions", json=body) as (_ep, up):
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

    async def _thinker_for_speech(self, body: dict, on_text):
        """Run the thinker (streaming) and collect what the talker needs."""
        req = dict(body)
        for k in ("modalities", "audio"):
            req.pop(k, None)
        req.update(stream=True, return_token_ids=True, omni_return_mm_states=True)
        out = {"text": "", "prompt_ids": None, "response_ids": [], "mm": None, "finish": None, "usage": None,
               "model": body.get("model")}
        async with self._pick_and_request("POST", self.thinkers, "/v1/chat/completions", json=req) as (ep, up):
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
            th = await self._thinker_for_speech(body, on_text)
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
        async with self._pick_and_request("POST", self.talkers, "/v1/talker/synthesize", json=payload) as (_ep, up):
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
    )
    parse_service_list(cfg["thinker_service"])
    parse_service_list(cfg["talker_service"])
    return cfg


async def amain(cfg: dict) -> int:
    gw = Gateway(cfg)
    await gw.start()
    sites = [(gw.app(), cfg["host"], cfg["port"]), (metrics_app(gw.metrics), cfg["host"], cfg["metrics_port"])]
    return await serve(sites, gw.drain)
