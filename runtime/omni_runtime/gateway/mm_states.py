"""Fetching a request's multimodal thinker states for the talker.

The thinker that served a chat request (sent with `X-Request-Id: <rid>`) publishes the
layer-`accept_hidden_layer` states at the prompt's multimodal positions on its metrics
port, `GET /v1/omni/mm-states/<rid>`, as payload v1's `mm` object, once its prefill is
done; 404 until then (a 404 with `"final": true` when they will never come). The gateway
polls that URL on the same endpoint, asking each time to be held until the states are there
(`?wait=`, up to HOLD seconds; a thinker that does not hold answers at once and the poll
goes on every POLL_EVERY). The wait is bounded from the moment the prefill is known to be
over (the first generated token, or the end of the stream): before that the request may
still be queued in the thinker.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Awaitable, Callable

import aiohttp

from omni_runtime.gateway.pools import Endpoint

PATH = "/v1/omni/mm-states/"
POLL_EVERY = 0.05
HOLD = 0.5


class StatesMissing(Exception):
    """The states never arrived; the message names the thinker endpoint and the URL."""


def states_url(ep: Endpoint, rid: str) -> str:
    return f"{ep.metrics_base}{PATH}{rid}"


def check_mm_object(obj) -> dict:
    """The shape of payload v1's `mm` the gateway relies on; the talker checks the rest."""
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), str) or not isinstance(obj.get("shape"), list):
        raise ValueError("not payload v1's mm object (needs data and shape)")
    return obj


def is_final(body: bytes) -> bool:
    """A 404 that says the states will never come (`"final": true`), so waiting is pointless."""
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("final") is True


async def fetch_states(session: aiohttp.ClientSession, ep: Endpoint, rid: str, wait: float,
                       prefilled: asyncio.Event, pause: Callable[[float], Awaitable[None]]) -> tuple[dict, int]:
    """Poll until the states of `rid` are there: (the mm object, its size in bytes).
    `prefilled` is set once the thinker has produced a token (or ended its stream); from
    then on the poll gives up after `wait` seconds. `pause(seconds)` sleeps, and raises
    when the client left or the gateway drains."""
    thinker = f"thinker {ep.url}"
    if not ep.metrics_port:
        raise StatesMissing(f"{thinker} has no metrics port configured (OMNI_UPSTREAM_METRICS_PORT=0 or "
                            "'|0' in OMNI_THINKER_SERVICE), where its multimodal states are served")
    url = states_url(ep, rid)
    timeout = aiohttp.ClientTimeout(total=None, connect=3.0, sock_read=30.0)
    deadline = None
    last = "no answer yet"
    while True:
        hold = HOLD if deadline is None else min(HOLD, max(0.0, deadline - time.monotonic()))
        try:
            async with session.get(url, params={"wait": f"{hold:.3f}"}, timeout=timeout) as resp:
                body = await resp.read()
                if resp.status == 200:
                    try:
                        return check_mm_object(json.loads(body)), len(body)
                    except ValueError as exc:
                        raise StatesMissing(f"{thinker} answered {url} with unusable states: {exc}") from None
                if resp.status != 404 or is_final(body):
                    raise StatesMissing(f"{thinker} could not give the multimodal states of request {rid} "
                                        f"({url} answered {resp.status}: {body[:300].decode(errors='replace')})")
                last = "404 (not published)"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if deadline is None and prefilled.is_set():
            deadline = now + wait
        if deadline is not None and now >= deadline:
            raise StatesMissing(
                f"{thinker} did not publish the multimodal states of request {rid} at {url} within {wait:g} s "
                f"(OMNI_MM_STATES_WAIT_SECONDS) of its first token; last answer: {last}. Speech for audio, image "
                "or video input needs them: does this thinker export them?")
        await pause(POLL_EVERY)
