"""Gateway upstream selection: least load from scraped queue depth, and holding requests
while a role has no reachable replica (scale from zero)."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from e2e.procs import free_port, wait_until
from omni_runtime import config as env
from omni_runtime.gateway.pools import Endpoint, Pool, endpoint_load, parse_service_list, rank_endpoints

pytestmark = pytest.mark.runtime


# -- pure selection logic -----------------------------------------------------------------

def ep(name: int, scraped=None, scraped_at=0.0, started=(), down_until=0.0) -> Endpoint:
    return Endpoint("10.0.0.%d" % name, 8000, 9400, scraped=scraped, scraped_at=scraped_at,
                    started=list(started), down_until=down_until)


def order(eps, now=100.0, stale_after=3.0):
    return [e.host.rsplit(".", 1)[1] for e in rank_endpoints(eps, now, stale_after)]


def test_least_scraped_load_wins_and_ties_keep_configured_order():
    assert order([ep(1, scraped=5, scraped_at=99.5), ep(2, scraped=1, scraped_at=99.5)]) == ["2", "1"]
    assert order([ep(1, scraped=2, scraped_at=99.5), ep(2, scraped=2, scraped_at=99.5),
                  ep(3, scraped=2, scraped_at=99.5)]) == ["1", "2", "3"]


def test_requests_sent_since_the_scrape_count_those_before_it_do_not():
    # both reported 3; endpoint 1 got two more from this gateway after the scrape was sent
    a = ep(1, scraped=3, scraped_at=99.0, started=[98.0, 99.2, 99.4])
    b = ep(2, scraped=3, scraped_at=99.0, started=[98.0, 98.5])
    assert endpoint_load(a, 100.0, 3.0) == 5 and endpoint_load(b, 100.0, 3.0) == 3
    assert order([a, b]) == ["2", "1"]


def test_stale_or_missing_scrape_falls_back_to_own_in_flight():
    old = ep(1, scraped=0, scraped_at=90.0, started=[95.0, 96.0])  # scrape 10 s old: ignored
    never = ep(2, started=[97.0])
    assert endpoint_load(old, 100.0, 3.0) == 2 and endpoint_load(never, 100.0, 3.0) == 1
    assert order([old, never]) == ["2", "1"]


def test_endpoints_in_backoff_go_last_longest_failed_first():
    eps = [ep(1, scraped=0, scraped_at=99.5, down_until=104.0), ep(2, scraped=50, scraped_at=99.5),
           ep(3, scraped=0, scraped_at=99.5, down_until=102.0), ep(4, scraped=9, scraped_at=99.5, down_until=99.0)]
    assert order(eps) == ["4", "2", "3", "1"]


def test_service_list_with_metrics_ports():
    assert parse_service_list("a:8000|9500, b.ns.svc:8001", 9400) == [("a", 8000, 9500), ("b.ns.svc", 8001, 9400)]
    assert parse_service_list("[::1]:8000|9401,127.0.0.1:1|0") == [("::1", 8000, 9401), ("127.0.0.1", 1, 0)]
    for bad in ("a", "a:x", "a:8000|", "a:8000|x", "a:8000|70000", "a:0", "a|9400"):
        with pytest.raises(env.ConfigError):
            parse_service_list(bad)


def test_resolve_drops_names_without_records_and_keeps_addresses_on_resolver_errors():
    answers = {}

    async def fake_getaddrinfo(host, port, **_kw):
        result = answers[host]
        if isinstance(result, Exception):
            raise result
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in result]

    async def go():
        asyncio.get_running_loop().getaddrinfo = fake_getaddrinfo
        pool = Pool("thinker", [("thinker-headless", 8000, 9400), ("other", 8000, 9401)])
        answers.update({"thinker-headless": ["10.0.0.1", "10.0.0.2"], "other": ["10.0.1.1"]})
        await pool.resolve()
        assert sorted(pool.endpoints) == [("10.0.0.1", 8000), ("10.0.0.2", 8000), ("10.0.1.1", 8000)]
        assert pool.endpoints[("10.0.1.1", 8000)].metrics_port == 9401
        # resolver trouble for one name: its addresses stay; the other name has no pods now
        answers.update({"thinker-headless": socket.gaierror(socket.EAI_AGAIN, "temporary failure"),
                        "other": socket.gaierror(socket.EAI_NONAME, "no such name")})
        await pool.resolve()
        assert sorted(pool.endpoints) == [("10.0.0.1", 8000), ("10.0.0.2", 8000)]
        answers["thinker-headless"] = socket.gaierror(socket.EAI_NONAME, "no such name")  # scaled to zero
        await pool.resolve()
        assert pool.endpoints == {}

    asyncio.run(go())


# -- real processes -----------------------------------------------------------------------

def _gauge(proc, role: str) -> float:
    m = re.search(r'^omni_gateway_waiting_requests\{role="%s"\} (\S+)$' % role, proc.metrics_text(), re.M)
    assert m, "omni_gateway_waiting_requests{role=%r} missing" % role
    return float(m.group(1))


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _load(proc) -> float:
    m = proc.metrics()
    return m.get("omni_queue_depth", 0) + m.get("omni_requests_running", 0)


def _ask(max_tokens: int) -> dict:
    return {"model": "qwen3-omni-tiny", "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": max_tokens, "temperature": 0}


def _keep_busy(proc, n: int, max_tokens: int):
    """n long greedy requests sent straight to one thinker (not through the gateway);
    returns a function that waits for them and checks they succeeded."""
    statuses = []

    def one():
        statuses.append(_post(proc.url + "/v1/chat/completions", _ask(max_tokens))[0])

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    wait_until(f"the thinker on port {proc.port} to report {n} requests", lambda: _load(proc) >= n, 10)

    def join():
        for t in threads:
            t.join(60)
        assert statuses == [200] * n

    return join


def test_routes_to_the_thinker_with_the_least_scraped_queue(tiny_model, spawn):
    common = {"OMNI_MODEL": str(tiny_model), "OMNI_DEVICE": "cpu", "OMNI_DRAIN_SECONDS": "2"}
    a = spawn("thinker", {**common, "OMNI_SERVED_MODEL_NAME": "thinker-a"}, args=("--engine", "transformers"))
    b = spawn("thinker", {**common, "OMNI_SERVED_MODEL_NAME": "thinker-b"}, args=("--engine", "transformers"))
    # a is listed first: with equal loads the configured order wins, so only load sends a request to b
    gw = spawn("gateway", {**common, "OMNI_SCRAPE_SECONDS": "0.1",
                           "OMNI_THINKER_SERVICE": f"127.0.0.1:{a.port}|{a.metrics_port},"
                                                   f"127.0.0.1:{b.port}|{b.metrics_port}"})
    for p in (a, b, gw):
        p.wait_ready()

    def served_by(n: int, pause: float = 0.0) -> list[str]:
        out = []
        for _ in range(n):
            status, body = _post(gw.url + "/v1/chat/completions", _ask(2))
            assert status == 200, body
            out.append(body["model"])
            time.sleep(pause)
        return out

    # both idle: the configured order decides (the pause lets a scrape that may have caught
    # the previous request in flight be replaced by a newer one)
    assert served_by(2, pause=0.3) == ["thinker-a"] * 2

    busy = _keep_busy(a, 3, 300)  # a reports 3 running/waiting, none of them from the gateway
    time.sleep(0.35)  # a few scrapes
    assert served_by(4) == ["thinker-b"] * 4
    assert _load(a) >= 1, "thinker-a finished its work before the check; the test proved nothing"
    busy()

    busy = _keep_busy(b, 2, 300)
    time.sleep(0.35)
    assert served_by(3) == ["thinker-a"] * 3
    assert _load(b) >= 1, "thinker-b finished its work before the check; the test proved nothing"
    busy()
    for p in (gw, a, b):
        p.terminate()  # stop all at once


def test_request_is_held_until_a_thinker_comes_up(tiny_model, spawn):
    common = {"OMNI_MODEL": str(tiny_model), "OMNI_DEVICE": "cpu"}
    port, mport = free_port(), free_port()  # where the thinker will listen once it "scales up"
    gw = spawn("gateway", {**common, "OMNI_SCRAPE_SECONDS": "0.2", "OMNI_UPSTREAM_WAIT_SECONDS": "60",
                           "OMNI_THINKER_SERVICE": f"127.0.0.1:{port}|{mport}"}).wait_ready()
    assert _gauge(gw, "thinker") == 0 and _gauge(gw, "talker") == 0
    url = gw.url + "/v1/chat/completions"

    async def post(timeout):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.post(url, json=_ask(4)) as r:
                return r.status, await r.json()

    async def until_gauge(value, timeout):
        deadline = time.monotonic() + timeout
        while _gauge(gw, "thinker") != value:
            assert time.monotonic() < deadline, f"gauge never reached {value}"
            await asyncio.sleep(0.05)

    async def go():
        # a client that gives up while held: the gauge goes back down long before the 60 s wait
        impatient = asyncio.ensure_future(post(1.0))
        await until_gauge(1, 5)
        with pytest.raises(asyncio.TimeoutError):
            await impatient
        await until_gauge(0, 3)

        held = asyncio.ensure_future(post(60))
        await until_gauge(1, 5)
        await asyncio.sleep(0.5)
        assert not held.done()
        spawn("thinker", {**common, "OMNI_PORT": str(port), "OMNI_METRICS_PORT": str(mport),
                          "OMNI_SERVED_MODEL_NAME": "late-thinker"}, args=("--engine", "transformers"))
        return await held

    status, body = asyncio.run(go())
    assert status == 200 and body["model"] == "late-thinker", body
    assert _gauge(gw, "thinker") == 0
    text = gw.metrics_text()
    assert 'omni_requests_total{code="499",role="gateway"} 1.0' in text
    assert 'omni_requests_total{code="200",role="gateway"} 1.0' in text
    gw.terminate()


def test_held_request_ends_in_503_after_the_wait_and_429_is_not_held(tiny_model, spawn):
    port = free_port()
    gw = spawn("gateway", {"OMNI_MODEL": str(tiny_model), "OMNI_UPSTREAM_WAIT_SECONDS": "1",
                           "OMNI_THINKER_SERVICE": f"127.0.0.1:{port}"}).wait_ready()
    seen = []
    poll = threading.Thread(target=lambda: (time.sleep(0.4), seen.append(_gauge(gw, "thinker"))), daemon=True)
    poll.start()
    began = time.monotonic()
    status, body = _post(gw.url + "/v1/chat/completions", _ask(4))
    took = time.monotonic() - began
    poll.join()
    assert status == 503, body
    msg = body["error"]["message"]
    assert "no thinker replica became available within 1 s" in msg and "OMNI_UPSTREAM_WAIT_SECONDS" in msg, msg
    assert "Connect" in msg or "refused" in msg, msg  # the last error says what happened
    assert 1.0 <= took < 4.0
    assert seen == [1.0]
    assert _gauge(gw, "thinker") == 0

    # a replica that answers 429 (queue full) is there: its answer is passed on at once, not held
    class Full(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            data = json.dumps({"error": {"message": "queue full", "code": 429}}).encode()
            self.send_response(429)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Full)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        began = time.monotonic()
        status, body = _post(gw.url + "/v1/chat/completions", _ask(4))
        assert status == 429 and "queue full" in body["error"]["message"], body
        assert time.monotonic() - began < 0.9
        assert _gauge(gw, "thinker") == 0
    finally:
        server.shutdown()
        server.server_close()
