"""Prometheus metrics shared by every role, served on OMNI_METRICS_PORT at /metrics.

`omni_queue_depth{role}` (requests waiting, not yet started) is what the operator's
autoscaler reads from each pod; `omni_requests_running{role}` is the work in progress.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TTFA_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
PAYLOAD_BUCKETS = (1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6)


class RoleMetrics:
    def __init__(self, role: str):
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("omni_queue_depth", "Requests waiting, not yet started", ["role"], registry=r).labels(role)
        self.running = Gauge("omni_requests_running", "Requests in progress", ["role"], registry=r).labels(role)
        self.ready = Gauge("omni_ready", "1 when the process serves requests (model loaded, not draining)", ["role"],
                           registry=r).labels(role)
        self.draining = Gauge("omni_draining", "1 after SIGTERM while in-flight work drains", ["role"],
                              registry=r).labels(role)
        self.requests = Counter("omni_requests", "Finished requests by HTTP status code", ["role", "code"], registry=r)
        # with the two gauges above, what the operator's autoscaler derives arrival rate and
        # service time from
        self.finished = Counter("omni_requests_finished", "Requests that left service (ran, then ended in any way)",
                                ["role"], registry=r).labels(role)
        self._engine_finished = 0.0

    def count(self, code: int) -> None:
        self.requests.labels(self.role, str(code)).inc()

    def finished_to(self, total: float) -> None:
        """Follow an engine's own completion counter: add what it grew by since the last call
        (a restarted engine starts over from zero)."""
        if total < self._engine_finished:
            self._engine_finished = 0.0
        self.finished.inc(total - self._engine_finished)
        self._engine_finished = total

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TalkerMetrics(RoleMetrics):
    def __init__(self):
        super().__init__("talker")
        r = self.registry
        self.ttfa = Histogram("omni_talker_time_to_first_audio_seconds",
                              "Request arrival to the first audio bytes sent (queue wait included)",
                              buckets=TTFA_BUCKETS, registry=r)
        self.rtf = Histogram("omni_talker_real_time_factor",
                             "Synthesis wall time divided by the duration of the audio produced (<1 is faster than real time)",
                             buckets=RTF_BUCKETS, registry=r)
        self.audio_seconds = Counter("omni_talker_audio_seconds", "Seconds of audio produced", registry=r)
        self.batch_size = Gauge("omni_talker_batch_size", "Syntheses stepped together in the latest decode step",
                                registry=r)
        self.batch_rows = Histogram("omni_talker_decode_batch_rows", "Syntheses per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.waiting_for_text = Gauge("omni_talker_waiting_for_text",
                                      "Running syntheses paused until the thinker's next text token arrives",
                                      registry=r)


class GatewayMetrics(RoleMetrics):
    def __init__(self):
        super().__init__("gateway")
        r = self.registry
        self.latency = Histogram("omni_gateway_request_duration_seconds",
                                 "Gateway request latency, arrival to last byte", ["route", "mode"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("omni_gateway_time_to_first_byte_seconds",
                              "Arrival to the first response bytes (first token or audio chunk)", ["mode"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("omni_gateway_upstream_errors", "Failed upstream attempts", ["role"], registry=r)
        self.scrape_errors = Counter("omni_gateway_upstream_scrape_errors",
                                     "Failed scrapes of an upstream's /metrics (routing then uses own in-flight counts)",
                                     ["role"], registry=r)
        self.upstream_load = Gauge("omni_gateway_upstream_load",
                                   "Waiting + running requests an upstream reported at this gateway's last good "
                                   "scrape: what routing ranks endpoints by", ["role", "endpoint"], registry=r)
        self.waiting_requests = Gauge("omni_gateway_waiting_requests",
                                      "Requests held because no replica of the role is reachable (scale-from-zero signal)",
                                      ["role"], registry=r)
        self.mm_states_bytes = Counter("omni_gateway_mm_states_bytes",
                                       "Bytes of multimodal thinker states fetched for speech requests (JSON)",
                                       registry=r)
        self.talker_payload_bytes = Histogram("omni_gateway_talker_payload_bytes",
                                              "Size of the payloads posted to talkers (JSON; the head line of a streamed hand-off)",
                                              buckets=PAYLOAD_BUCKETS, registry=r)
        self.affinity_moves = Counter("omni_gateway_affinity_moves",
                                      "Requests of a realtime session sent to another replica than its earlier "
                                      "turns (that replica was not Ready)", ["role"], registry=r)
        # realtime sessions (/v1/realtime); each open session also counts in omni_requests_running
        self.realtime_sessions = Gauge("omni_gateway_realtime_sessions", "Open realtime sessions", registry=r)
        self.realtime_refused = Counter("omni_gateway_realtime_sessions_refused",
                                        "Realtime sessions refused at connect (pod full, draining)", ["reason"],
                                        registry=r)
        self.realtime_turns = Counter("omni_gateway_realtime_turns", "Realtime responses by how they ended",
                                      ["status"], registry=r)
        self.voice_to_voice = Histogram("omni_gateway_realtime_voice_to_voice_seconds",
                                        "End of the user's turn (VAD speech stop or commit) to the first audio "
                                        "delta sent", buckets=TTFA_BUCKETS, registry=r)
        self.barge_ins = Counter("omni_gateway_realtime_barge_ins",
                                 "Responses cancelled because the user started speaking", registry=r)
        self.realtime_errors = Counter("omni_gateway_realtime_errors", "Error events sent to realtime clients",
                                       ["code"], registry=r)
        for role in ("thinker", "talker"):
            self.affinity_moves.labels(role)
            self.waiting_requests.labels(role).set(0)
            self.upstream_errors.labels(role)
            self.scrape_errors.labels(role)


class ThinkerMetrics(RoleMetrics):
    def __init__(self):
        super().__init__("thinker")
        r = self.registry
        self.scrape_ok = Gauge("omni_thinker_engine_scrape_ok", "1 when the last scrape of the engine's /metrics worked",
                               registry=r)


def metrics_app(metrics: RoleMetrics) -> web.Application:
    async def handle(_request):
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Sum of the samples of each metric name in a Prometheus text exposition (labels ignored: a
    vLLM pod exports one series per model/engine). A malformed page gives the metric families that
    came before the fault."""
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    except ValueError:
        pass
    return out
