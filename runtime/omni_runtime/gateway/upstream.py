"""Calling a role's replicas: the least-loaded endpoint first, failover to the next, and
holding a request while the role has no reachable replica (scale from zero). Also the
scrape loop that keeps each endpoint's reported load current."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from omni_runtime.config import GatewaySettings
from omni_runtime.gateway.pools import RESOLVE_EVERY, Affinity, Endpoint, Pool, parse_service_list
from omni_runtime.metrics import GatewayMetrics, parse_prometheus_text

log = logging.getLogger("omni.gateway")

DOWN_FOR = 5.0        # an endpoint that refused a connection is tried last for this long
RETRY_EVERY = 1.0     # while a request is held: re-resolve and retry this often
QUEUE_METRIC = "omni_queue_depth"
RUNNING_METRIC = "omni_requests_running"


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


class Taken:
    """An endpoint's response to a request; `async with` yields (endpoint, response) and
    gives both back (connection released, endpoint's in-flight count decremented)."""

    def __init__(self, ep: Endpoint, resp: aiohttp.ClientResponse, token: float):
        self.ep, self.resp, self.token = ep, resp, token

    async def __aenter__(self):
        return self.ep, self.resp

    async def __aexit__(self, *_exc):
        self.resp.release()
        self.ep.release(self.token)


class Upstreams:
    """The thinker and talker pools of one gateway and the HTTP session that reaches them."""

    def __init__(self, cfg: GatewaySettings, metrics: GatewayMetrics):
        self.cfg = cfg
        self.metrics = metrics
        # every entry keeps its metrics port even with scraping off: multimodal states are
        # fetched there (thinker), whatever routing does
        mport = cfg.upstream_metrics_port
        stale = max(3 * cfg.scrape_seconds, 2.0)
        self.thinkers = Pool("thinker", parse_service_list(cfg.thinker_service, mport), stale_after=stale)
        self.talkers = Pool("talker", parse_service_list(cfg.talker_service, mport), stale_after=stale)
        self.session: aiohttp.ClientSession | None = None
        self.scraper: asyncio.Task | None = None
        self.held_released = False  # the gateway's drain ran out of time: held requests end

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout,
                                          sock_read=self.cfg.read_timeout),
            auto_decompress=False)
        if self.cfg.scrape_seconds > 0:
            self.scraper = asyncio.ensure_future(self._scrape_loop())

    async def release_held(self) -> None:
        """End every request held for a replica (503 with Retry-After): the drain's deadline."""
        self.held_released = True

    async def close(self) -> None:
        if self.scraper:
            self.scraper.cancel()
        if self.session:
            await self.session.close()

    # -- upstream load: scrape each endpoint's omni_queue_depth + omni_requests_running --

    async def _scrape_loop(self):
        every = self.cfg.scrape_seconds
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
        timeout = aiohttp.ClientTimeout(total=max(0.5, min(2.0, self.cfg.scrape_seconds)))
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
        self.metrics.upstream_load.labels(pool.role, f"{ep.host}:{ep.port}").set(ep.scraped)

    # -- upstream call: least-loaded endpoint, failover, and holding while none is reachable --

    @contextlib.asynccontextmanager
    async def call(self, method, pool: Pool, path: str, request: web.Request | None = None,
                   hold: bool = True, affinity: Affinity | None = None, **kw):
        async with await self.connect(method, pool, path, request, hold, kw, affinity) as taken:
            yield taken

    async def connect(self, method, pool: Pool, path: str, request, hold: bool, kw: dict,
                      affinity: Affinity | None = None) -> Taken:
        """`kw` goes to aiohttp's request; its `data` may be a zero-argument callable that
        makes the body, called once per attempt. With `affinity`, its endpoint is tried
        first while it can take requests, and the endpoint that takes this one becomes it."""
        if not pool.targets:
            raise UpstreamUnavailable(503, f"no {pool.role} service is configured "
                                           f"(OMNI_{pool.role.upper()}_SERVICE is empty)")
        wait = self.cfg.upstream_wait if hold else 0.0
        gauge = self.metrics.waiting_requests.labels(pool.role)
        held_since = None
        try:
            while True:
                got = await self._try_endpoints(method, pool, path, kw, quiet=held_since is not None,
                                                affinity=affinity)
                if not isinstance(got, _Attempt):
                    if affinity is not None and affinity.settle(got.ep):
                        self.metrics.affinity_moves.labels(pool.role).inc()
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
                await self.pause(request, min(RETRY_EVERY, left))
                await pool.resolve()
        finally:
            if held_since is not None:
                gauge.dec()

    async def pause(self, request, seconds: float) -> None:
        """Sleep while a request waits; stop early if the client left or the gateway's drain ran out."""
        end = time.monotonic() + seconds
        while True:
            if request is not None and (request.transport is None or request.transport.is_closing()):
                raise ClientGone()
            if self.held_released:
                raise UpstreamUnavailable(503, "this gateway replica is shutting down and no replica became "
                                               "available before its drain deadline; retry")
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(0.1, left))

    async def _try_endpoints(self, method, pool: Pool, path: str, kw: dict, quiet: bool,
                             affinity: Affinity | None = None):
        """One pass over the pool, least loaded first, at most OMNI_MAX_ATTEMPTS endpoints:
        a Taken from the first that takes the request, else an _Attempt."""
        why = _Attempt()
        if pool.targets and not pool.endpoints:
            why.last = f"{', '.join(h for h, _, _ in pool.targets)} resolved to no address"
        say = log.debug if quiet else log.warning
        candidates = await pool.candidates()
        if affinity is not None:
            candidates = affinity.order(candidates, time.monotonic())
        for ep in candidates[: self.cfg.max_attempts]:
            token = ep.acquire()
            try:
                resp = await self.session.request(method, ep.url + path, **_fresh(kw))
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
            return Taken(ep, resp, token)
        return why


def _fresh(kw: dict) -> dict:
    """The request arguments of one attempt: a callable `data` makes a new body each time
    (a streamed body is consumed by the attempt that sends it)."""
    if callable(kw.get("data")):
        return {**kw, "data": kw["data"]()}
    return kw
