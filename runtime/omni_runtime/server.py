"""Process plumbing shared by the HTTP roles: listen on the API and metrics ports,
turn SIGTERM into a drain, exit 0 (1 when the model could not load)."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web

from omni_runtime.config import Env, ServingSettings, write_termination_log

log = logging.getLogger("omni.server")


def json_error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> web.Response:
    """OpenAI-style error body."""
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status,
                             headers=headers)


async def serve(sites: list[tuple[web.Application, str, int]], drain: Callable[[], Awaitable[None]],
                started: Callable[[], Awaitable[None]] | None = None, *, exited: Awaitable[int] | None = None,
                stopping: asyncio.Event | None = None) -> int:
    """Serve every (app, host, port) until SIGTERM/SIGINT, then await `drain()` and stop (exit 0).

    `exited`: a child's end (the vLLM server's) that stops serving by itself, without a drain; its
    result is the exit code. `stopping`: set on SIGTERM, for handlers that answer differently then.
    """
    loop = asyncio.get_running_loop()
    stop = stopping or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runners = []
    waits = [asyncio.ensure_future(stop.wait())]
    if exited is not None:
        waits.append(asyncio.ensure_future(exited))
    code = 0
    try:
        for app, host, port in sites:
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, host, port, reuse_address=True).start()
            runners.append(runner)
            log.info("listening on %s:%d", host, port)
        if started is not None:
            await started()
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if waits[0] in done:
            log.info("SIGTERM: draining")
            await drain()
        else:
            code = waits[1].result()
    finally:
        for wait in waits:
            wait.cancel()
        for runner in runners:
            await runner.cleanup()
    log.info("stopped")
    return code


class Phase(str, enum.Enum):
    """Where a process that serves through its shutdown delay is, after SIGTERM."""

    SERVING = "serving"
    ANNOUNCED = "announced"  # not ready; still serving new requests while endpoints propagate
    CLOSING = "closing"      # new requests refused; in-flight ones finish
    EXPIRED = "expired"      # the drain's deadline passed: what is left is ended


@dataclass(frozen=True)
class DrainTimes:
    """When each phase begins, in seconds after SIGTERM (pure)."""

    shutdown_delay: float
    drain_seconds: float

    @property
    def closing_at(self) -> float:
        return self.shutdown_delay

    @property
    def expires_at(self) -> float:
        # a request accepted at the end of the delay gets the whole drain_seconds to finish
        return self.shutdown_delay + self.drain_seconds

    def phase(self, since_sigterm: float | None) -> Phase:
        if since_sigterm is None:
            return Phase.SERVING
        if since_sigterm < self.closing_at:
            return Phase.ANNOUNCED
        if since_sigterm < self.expires_at:
            return Phase.CLOSING
        return Phase.EXPIRED


async def wait_until_idle(busy: Callable[[], bool], seconds: float) -> bool:
    """The drain's wait: until `busy()` is false or `seconds` pass. True when it went idle."""
    deadline = time.monotonic() + seconds
    while busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return not busy()


class EngineService:
    """The lifecycle shared by the roles that hold a model (thinker, talker): load it in the
    background, answer /health, keep the queue gauges current, wait for in-flight work on drain."""

    role = "engine"

    def __init__(self, cfg: ServingSettings, metrics):
        self.cfg = cfg
        self.metrics = metrics  # has queue_depth, running, ready, draining gauges
        self.engine = None
        self.load_error: str | None = None
        self.exit_code = 0  # what the process exits with after serve() returns
        self.waiting = 0
        self.running = 0
        self.draining = False

    def _update(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(self.running)
        self.metrics.ready.set(1 if self.engine is not None and not self.draining else 0)
        self.metrics.draining.set(1 if self.draining else 0)

    async def load(self, factory: Callable[[], object]) -> None:
        try:
            self.engine = await asyncio.get_running_loop().run_in_executor(None, factory)
            log.info("%s loaded", self.role)
        except Exception as exc:  # noqa: BLE001 - any failure to load ends the process
            log.exception("%s failed to load", self.role)
            self.load_error = f"{type(exc).__name__}: {exc}"
            # A model that cannot load will not load by waiting: exit 1 with the reason, so the
            # pod restarts (CrashLoopBackOff) and `kubectl describe` shows why.
            write_termination_log(os.environ.get(Env.TERMINATION_LOG),
                                      f"{self.role} failed to load: {self.load_error}"[:4000])
            self.exit_code = 1
            signal.raise_signal(signal.SIGTERM)
        self._update()

    async def health(self, _request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        if self.engine is None:
            body = {"status": "loading"} if self.load_error is None else {"status": "failed", "error": self.load_error}
            return web.json_response(body, status=503)
        return web.json_response({"status": "ok", "running": self.running, "waiting": self.waiting})

    async def start_draining(self) -> bool:
        """Refuse new work and wait up to drain_seconds for the rest; True when all finished."""
        self.draining = True
        self._update()
        return await wait_until_idle(lambda: self.running or self.waiting, self.cfg.drain_seconds)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
