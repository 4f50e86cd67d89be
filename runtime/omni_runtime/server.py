"""Process plumbing shared by the HTTP roles: listen on the API and metrics ports,
turn SIGTERM into a drain, exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("omni.server")


def json_error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> web.Response:
    """OpenAI-style error body."""
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status,
                             headers=headers)


async def serve(sites: list[tuple[web.Application, str, int]], drain: Callable[[], Awaitable[None]],
                started: Callable[[], Awaitable[None]] | None = None) -> int:
    """Serve every (app, host, port) until SIGTERM/SIGINT, then await `drain()` and stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runners = []
    for app, host, port in sites:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        runners.append(runner)
        log.info("listening on %s:%d", host, port)
    if started is not None:
        await started()
    await stop.wait()
    log.info("SIGTERM: draining")
    try:
        await drain()
    finally:
        for runner in runners:
            await runner.cleanup()
    log.info("stopped")
    return 0


async def wait_until_idle(busy: Callable[[], bool], seconds: float) -> bool:
    """The drain's wait: until `busy()` is false or `seconds` pass. True when it went idle."""
    deadline = time.monotonic() + seconds
    while busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return not busy()


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
