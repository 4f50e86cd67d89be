"""Clients of an OmniDeployment's gateway as a Service would route them, for the failure drills
(tests/runtime/test_failure_drills.py) and the rollout benchmark (bench/rollout_bench.py).

kube-proxy sends each new connection to one of the Service's endpoints: the gateway pods that are
Ready and not terminating, as it last heard from the apiserver. ``GatewayPods`` keeps that view,
re-read about every second, and ``Clients`` send requests back to back, each on a new connection
to a pod picked at random from it, recording what every request got (``Outcome``): small chat
requests, of every four one streamed and one asking for speech.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"
REFRESH_SECONDS = 1.0
KINDS = ("text", "stream", "text", "speech")  # each client's requests, in turn


def pod_serves(pod: dict[str, Any]) -> bool:
    """What an EndpointSlice lists as ready: the pod is Ready and not terminating."""
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in pod.get("status", {}).get("conditions", []))
    return ready and not pod["metadata"].get("deletionTimestamp") and bool(pod.get("status", {}).get("podIP"))


class GatewayPods:
    """The gateway pods a Service routes to, re-read every ``every`` seconds on a thread of its own.
    ``list_pods()`` returns the pods of the gateway's selector (from the apiserver)."""

    def __init__(self, list_pods: Callable[[], list[dict[str, Any]]], every: float = REFRESH_SECONDS):
        self.list_pods, self.every = list_pods, every
        self.view: list[tuple[str, str]] = []  # (pod name, base URL)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gateway-pods", daemon=True)
        self.refresh()

    def refresh(self) -> None:
        try:
            pods = self.list_pods()
        except Exception:  # noqa: BLE001 - an apiserver hiccup keeps the last view, as kube-proxy does
            return
        view = []
        for pod in pods:
            if not pod_serves(pod):
                continue
            port = next(p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "http")
            view.append((pod["metadata"]["name"], f"{pod['status']['podIP']}:{port}"))
        self.view = sorted(view)

    def pick(self) -> tuple[str, str] | None:
        view = self.view
        return random.choice(view) if view else None

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.refresh()

    def __enter__(self) -> "GatewayPods":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def cluster_gateway_pods(cluster, namespace: str, instance: str) -> Callable[[], list[dict[str, Any]]]:
    """``list_pods`` for a LocalCluster: the gateway pods of one OmniDeployment."""
    selector = f"{INSTANCE}={instance},{COMPONENT}=gateway"

    def list_pods() -> list[dict[str, Any]]:
        status, body = cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")
        if status != 200:
            raise RuntimeError(f"listing gateway pods: HTTP {status}")
        return body["items"]

    return list_pods


@dataclass
class Outcome:
    """What one request got."""

    kind: str          # text, stream or speech
    pod: str | None    # the gateway pod it was sent to; None when no pod was Ready
    sent: float        # time.monotonic()
    done: float
    status: int        # HTTP status; 0 when no answer came (refused, reset, timed out, no pod)
    error: str = ""    # why it failed; "" when it got a whole answer
    retry_after: str | None = None
    error_event: bool = False  # a stream that ended with an SSE error event

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def clean(self) -> bool:
        """A failure a client can act on: a 429/502/503 that says when to retry, or a stream
        ended with an error event (not a cut connection, a hang or a bare 500)."""
        return self.ok or self.error_event or (self.status in (429, 502, 503) and self.retry_after is not None)

    @property
    def latency(self) -> float:
        return self.done - self.sent


def request_body(kind: str, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "Say something short."}]}
    if kind == "stream":
        body["stream"] = True
    elif kind == "speech":
        body.update(modalities=["text", "audio"], audio={"voice": "Ethan", "format": "wav"})
    return body


def judge(kind: str, status: int, raw: bytes) -> tuple[str, bool]:
    """(why the answer is not a whole one, or "", whether a stream ended with an error event)."""
    text = raw.decode(errors="replace")
    if status != 200:
        return f"HTTP {status}: {text[:200]}", False
    if kind == "stream":
        events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        for data in events:
            if data != "[DONE]" and "error" in json.loads(data):
                return f"stream error event: {data[:200]}", True
        finished = any(data != "[DONE]" and any(c.get("finish_reason") for c in json.loads(data).get("choices", []))
                       for data in events)
        if not events or events[-1] != "[DONE]" or not finished:
            return "stream ended without a finish reason and [DONE]", False
        return "", False
    try:
        message = json.loads(text)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError):
        return f"not a chat completion: {text[:200]}", False
    if kind == "speech" and not (message.get("audio") or {}).get("data"):
        return "no audio in a speech answer", False
    return "", False


def send(pods: GatewayPods, kind: str, model: str, timeout: float = 120.0,
         body: dict[str, Any] | None = None) -> Outcome:
    """One request on a new connection to a pod of the current view."""
    sent = time.monotonic()
    target = pods.pick()
    if target is None:
        return Outcome(kind, None, sent, time.monotonic(), 0, "no gateway pod is Ready")
    name, hostport = target
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body or request_body(kind, model)),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        error, event = judge(kind, resp.status, raw)
        return Outcome(kind, name, sent, time.monotonic(), resp.status, error, resp.getheader("Retry-After"), event)
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(kind, name, sent, time.monotonic(), 0, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


class Clients:
    """``n`` clients sending requests back to back (``KINDS`` in turn) until stopped."""

    def __init__(self, pods: GatewayPods, model: str, n: int = 3, pause: float = 0.0):
        self.pods, self.model, self.pause = pods, model, pause
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"client-{i}", daemon=True)
                         for i in range(n)]

    def _client(self, i: int) -> None:
        turn = i  # clients start at different kinds
        while not self._stop.is_set():
            outcome = send(self.pods, KINDS[turn % len(KINDS)], self.model)
            with self._lock:
                self.outcomes.append(outcome)
            turn += 1
            self._stop.wait(self.pause)

    def __enter__(self) -> "Clients":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 150.0) -> None:
        """Stop sending and wait for the requests in flight."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def sent_between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.sent < end]

    def in_flight_at(self, moment: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.sent < moment < o.done]


def p99(latencies: Iterable[float]) -> float:
    """The nearest-rank 99th percentile (0 for none)."""
    ordered = sorted(latencies)
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def failures(outcomes: Iterable[Outcome]) -> list[str]:
    """One line per failed request, for an assertion's message."""
    return [f"{o.kind} via {o.pod} at +{o.sent:.1f}: {o.error}" for o in outcomes if not o.ok]
