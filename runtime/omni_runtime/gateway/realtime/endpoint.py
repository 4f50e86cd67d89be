"""`GET /v1/realtime`: the WebSocket side of realtime sessions. Admission (sessions per pod,
drain), one `Connection` per client that reads its events into the session state machine
and writes the session's events out, the session's timers, and the drain on SIGTERM.

Everything a client sends goes through `RealtimeSession.handle`, which answers bad input
with an `error` event; a failure inside one session is logged and answered the same way,
so no input ends another session or the process. Frames larger than
OMNI_REALTIME_MAX_EVENT_BYTES are refused by aiohttp's reader, which closes that
connection with 1009 (message too big).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from aiohttp import WSCloseCode, WSMsgType, web

from omni_runtime.config import GatewaySettings
from omni_runtime.gateway.pools import Affinity
from omni_runtime.gateway.realtime import vad
from omni_runtime.gateway.realtime.protocol import ProtocolError, SessionConfig, error_event, new_id
from omni_runtime.gateway.realtime.responder import ResponseRunner
from omni_runtime.gateway.realtime.session import Limits, Outcome, RealtimeSession
from omni_runtime.gateway.speech import Speech
from omni_runtime.metrics import GatewayMetrics
from omni_runtime.server import json_error, wait_until_idle

log = logging.getLogger("omni.gateway.realtime")

HEARTBEAT_SECONDS = 30.0  # WebSocket pings: a client that stops answering is closed
# Events queued for a client that does not read them; beyond this the session is closed
# (1008) rather than holding its audio in memory.
OUTBOUND_LIMIT_BYTES = 32 << 20
CLOSE_SECONDS = 5.0       # how long a closing handshake may take before the socket is dropped


class Connection:
    """One client's session: its events in, the session's events out (one writer task, so
    frames never interleave), its response running alongside."""

    def __init__(self, endpoint: "RealtimeEndpoint", ws: web.WebSocketResponse, request: web.Request,
                 session: RealtimeSession):
        self.endpoint, self.ws, self.request, self.session = endpoint, ws, request, session
        self.cfg, self.metrics = endpoint.cfg, endpoint.metrics
        self.out: asyncio.Queue[str | None] = asyncio.Queue()
        self.out_bytes = 0
        self.closing: tuple[int, str] | None = None
        self.affinity = Affinity()
        self.runner: ResponseRunner | None = None
        self.runner_task: asyncio.Task | None = None
        self.detector = None
        self.expires = time.monotonic() + self.cfg.realtime_max_session_seconds
        self.last_activity = time.monotonic()

    async def run(self) -> None:
        writer = asyncio.ensure_future(self._write())
        self.apply(self.session.created())
        try:
            await self._read()
        finally:
            if self.runner_task is not None and not self.runner_task.done():
                self.runner_task.cancel()
                await asyncio.gather(self.runner_task, return_exceptions=True)
            if self.detector is not None:
                self.endpoint.detectors.release(self.detector)
            self.close(WSCloseCode.OK, "")
            try:
                await asyncio.wait_for(writer, CLOSE_SECONDS)
            except asyncio.TimeoutError:
                writer.cancel()

    # -- in ------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            self._timers()  # on every event too: a client that never pauses still meets the session's end
            if self.closing is not None:
                return
            try:
                msg = await self.ws.receive(timeout=self._until_next_timer())
            except asyncio.TimeoutError:
                continue
            if msg.type == WSMsgType.TEXT:
                self.last_activity = time.monotonic()
                await self._event(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.apply(Outcome([error_event(ProtocolError(
                    "invalid_frame", "binary frames are not part of the protocol: send each event as a JSON text "
                                     "frame, audio base64-encoded in input_audio_buffer.append"))]))
            else:  # CLOSE, CLOSING, CLOSED, ERROR (aiohttp already closed an oversized or broken frame)
                if msg.type == WSMsgType.ERROR:
                    log.info("realtime session %s: connection error: %s", self.session.config.id, msg.data)
                return

    async def _event(self, text: str) -> None:
        try:
            out = self.session.handle(text)
            self.apply(out)
            while out.windows:
                out = self.session.speech_probabilities(await self._score(out.windows))
                self.apply(out)
        except Exception:  # noqa: BLE001 - a bug met by one session's input must not end the gateway
            log.exception("realtime session %s: handling an event failed", self.session.config.id)
            self.apply(Outcome([error_event(ProtocolError("server_error", "the event could not be handled",
                                                          kind="server_error"))]))

    async def _score(self, windows) -> list[float]:
        loop = asyncio.get_running_loop()
        pool = self.endpoint.vad_threads
        if self.detector is None:
            self.detector = await loop.run_in_executor(pool, self.endpoint.detectors.acquire)
        return await loop.run_in_executor(pool, vad.score, self.detector, windows)

    def _until_next_timer(self) -> float:
        now = time.monotonic()
        idle_at = self.last_activity + self.cfg.realtime_idle_seconds
        return max(0.05, min(self.expires, idle_at) - now)

    def _timers(self) -> None:
        now = time.monotonic()
        if now >= self.expires:
            self._end("session_expired", f"the session reached its maximum length of "
                                         f"{self.cfg.realtime_max_session_seconds:g} s")
        elif now >= self.last_activity + self.cfg.realtime_idle_seconds:
            if self.session.response is not None:
                self.last_activity = now  # a response in progress is activity
            else:
                self._end("idle_timeout", f"no event for {self.cfg.realtime_idle_seconds:g} s")

    def _end(self, code: str, message: str) -> None:
        self.apply(Outcome([error_event(ProtocolError(code, message))]))
        self.close(WSCloseCode.OK, code)

    # -- out -----------------------------------------------------------------------------

    def apply(self, out: Outcome) -> None:
        """Carry out a step of the session (see Outcome for the order)."""
        for ev in out.events:
            self._send(ev)
        if out.cancel is not None and self.runner is not None and self.runner.resp is out.cancel:
            self.runner_task.cancel()  # the thinker and talker connections close as the task unwinds
        if out.barge_in:
            self.metrics.barge_ins.inc()
        if out.first_audio is not None and out.first_audio.answers_turn_at is not None:
            self.metrics.voice_to_voice.observe(time.monotonic() - out.first_audio.answers_turn_at)
        if out.finished is not None:
            self.metrics.realtime_turns.labels(out.finished.status).inc()
            self.last_activity = time.monotonic()
        if out.start is not None:
            self.runner = ResponseRunner(self.endpoint.speech, self.request, self.session, out.start, self.affinity,
                                         self.cfg, self.apply)
            self.runner_task = asyncio.ensure_future(self.runner.run())
        if out.close:
            self.close(WSCloseCode.SERVICE_RESTART, "gateway restarting: reconnect")

    def _send(self, ev: dict) -> None:
        if self.closing is not None:
            return
        if ev["type"] == "error":
            self.metrics.realtime_errors.labels(ev["error"]["code"]).inc()
        text = json.dumps(ev)
        if self.out_bytes + len(text) > OUTBOUND_LIMIT_BYTES:
            log.warning("realtime session %s: client reads too slowly, closing", self.session.config.id)
            self.close(WSCloseCode.POLICY_VIOLATION, "client is not reading its events")
            return
        self.out_bytes += len(text)
        self.out.put_nowait(text)

    def close(self, code: int, reason: str) -> None:
        """Send what is queued, then close with `code` (the first close wins)."""
        if self.closing is None:
            self.closing = (code, reason)
            self.out.put_nowait(None)

    async def _write(self) -> None:
        while (text := await self.out.get()) is not None:
            self.out_bytes -= len(text)
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):  # the client went away
                break
        code, reason = self.closing or (WSCloseCode.OK, "")
        self.closing = self.closing or (code, reason)
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]), CLOSE_SECONDS)
        except (asyncio.TimeoutError, ConnectionError):
            pass


class RealtimeEndpoint:
    def __init__(self, cfg: GatewaySettings, speech: Speech, metrics: GatewayMetrics,
                 on_change: Callable[[], None] = lambda: None):
        self.cfg, self.speech, self.metrics, self.on_change = cfg, speech, metrics, on_change
        self.connections: set[Connection] = set()
        self.draining = False
        self.detectors = vad.DetectorPool()
        self.vad_threads = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="vad")
        self.limits = Limits(cfg.realtime_max_buffer_seconds, cfg.realtime_max_history_audio_seconds)

    @property
    def sessions(self) -> int:
        return len(self.connections)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.cfg.realtime_max_sessions == 0:
            return json_error(404, "realtime sessions are turned off on this gateway (OMNI_REALTIME_MAX_SESSIONS=0)")
        ws = web.WebSocketResponse(max_msg_size=self.cfg.realtime_max_event_bytes, heartbeat=HEARTBEAT_SECONDS,
                                   compress=False)
        if not ws.can_prepare(request).ok:
            return json_error(400, "/v1/realtime is a WebSocket endpoint: connect with a WebSocket client "
                                   "(the OpenAI SDK's client.realtime.connect)")
        model = request.query.get("model") or self.cfg.served_model_name or self.cfg.model
        if len(model) > 256:
            return json_error(400, "model is longer than 256 characters")
        await ws.prepare(request)
        refusal = self._refusal()
        if refusal is not None:
            code, close_code, message = refusal
            self.metrics.realtime_refused.labels(code).inc()
            self.metrics.realtime_errors.labels(code).inc()
            await ws.send_str(json.dumps(error_event(ProtocolError(code, message, kind="server_error"))))
            await ws.close(code=close_code, message=code.encode())
            return ws
        config = SessionConfig(new_id("sess"), model, int(time.time() + self.cfg.realtime_max_session_seconds))
        conn = Connection(self, ws, request, RealtimeSession(config, self.limits))
        self.connections.add(conn)
        self._changed()
        log.info("realtime session %s opened (%d open)", config.id, self.sessions)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.metrics.finished.inc()
            self._changed()
            log.info("realtime session %s closed (%d open)", config.id, self.sessions)
        return ws

    def _refusal(self) -> tuple[str, int, str] | None:
        if self.draining:
            return ("server_draining", WSCloseCode.SERVICE_RESTART, "this gateway is shutting down; connect again "
                                                                    "to reach another")
        if self.sessions >= self.cfg.realtime_max_sessions:
            return ("session_limit_reached", WSCloseCode.TRY_AGAIN_LATER,
                    f"this gateway holds its maximum of {self.cfg.realtime_max_sessions} sessions; try again")
        return None

    def _changed(self) -> None:
        self.metrics.realtime_sessions.set(self.sessions)
        self.on_change()

    async def close_sessions(self) -> None:
        """The gateway stops taking work (its drain's closing phase): no new sessions, and each
        open one closes with 1012 once its response in progress is done (at once when idle)."""
        self.draining = True
        for conn in list(self.connections):
            conn.apply(conn.session.drain())

    async def end_sessions(self) -> None:
        """The drain's deadline: what is left is cancelled and closed."""
        if self.connections:
            log.warning("drain deadline: cancelling %d realtime response(s) still running", self.sessions)
        for conn in list(self.connections):
            conn.apply(conn.session.abandon("server_shutdown"))
        await wait_until_idle(lambda: bool(self.connections), CLOSE_SECONDS)

    def close(self) -> None:
        self.vad_threads.shutdown(wait=False)
