"""Upstream endpoints and their order: what a service entry resolves to, how loaded each
endpoint is, and which to try first. `rank_endpoints` and `endpoint_load` are pure."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field

from omni_runtime import config as env

log = logging.getLogger("omni.gateway")

RESOLVE_EVERY = 5.0   # seconds between DNS look-ups of the upstream services


@dataclass
class Endpoint:
    host: str
    port: int
    metrics_port: int = 0          # 0: none known (not scraped, no multimodal states to fetch)
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
    def metrics_base(self) -> str:
        return f"http://{_host(self.host)}:{self.metrics_port}"

    @property
    def metrics_url(self) -> str:
        return self.metrics_base + "/metrics"

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


@dataclass
class Affinity:
    """Where a caller's requests go while that endpoint can take them: a realtime session's
    thinker replica, whose prefix cache holds the session's history. An endpoint that left
    the pool (its pod is not Ready, so DNS no longer lists it) or is in its down backoff
    (refused, loading, draining) is passed over, and the next request's endpoint becomes
    the preferred one."""

    key: tuple[str, int] | None = None

    def order(self, ranked: list[Endpoint], now: float) -> list[Endpoint]:
        """`ranked` with the preferred endpoint first when it can take requests."""
        for i, ep in enumerate(ranked):
            if (ep.host, ep.port) == self.key and ep.down_until <= now:
                return [ep, *ranked[:i], *ranked[i + 1:]]
        return ranked

    def settle(self, ep: Endpoint) -> bool:
        """`ep` took the request: it is preferred from now on. True when that is a move
        away from an earlier preferred endpoint."""
        moved = self.key is not None and self.key != (ep.host, ep.port)
        self.key = (ep.host, ep.port)
        return moved


def parse_service_list(spec: str, default_metrics_port: int = 0) -> list[tuple[str, int, int]]:
    """`host:port[|metricsPort],...` -> [(host, port, metrics_port)]; an entry without
    `|metricsPort` gets `default_metrics_port` (0 = none)."""
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
