"""The demo's serving half: the tiny model the pods serve, a spoken answer, and a load burst.

The node agent runs the serving pods' processes (e2e/serving_kubelet.py) with the model the
stand-in hub serves; this module builds that model, asks the gateway pod one question with
speech output (`answer.wav`), and drives the autoscaler with a burst of requests while printing
what it decides.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import struct
import threading
import time
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MODEL_CACHE = Path.home() / ".cache" / "qwen3-omni" / "tiny-model"
QUESTION = "Hello! What do you hear in this sound?"
VOICE = "Ethan"
COMPONENT = "app.kubernetes.io/component"


def tiny_model(cache: Path = MODEL_CACHE) -> Path:
    """The tiny random-weight Qwen3-Omni checkpoint, built once per version of its recipe."""
    import transformers

    from omni_runtime import tiny

    recipe = hashlib.sha256(Path(tiny.__file__).read_bytes() + transformers.__version__.encode()).hexdigest()[:16]
    out = cache / recipe
    if not (out / "omni_tiny.json").exists():
        tmp = cache / f".{recipe}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tiny.build_tiny_model(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    return out


def tone_wav(seconds: float = 1.0, hz: float = 440.0, rate: int = 16000) -> bytes:
    """A sine tone as 16-bit mono WAV: the audio half of the demo's question."""
    frames = b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * hz * i / rate)))
                      for i in range(int(seconds * rate)))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


def speech_request(model: str, text: str = QUESTION, audio: bytes | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if audio is not None:
        content.insert(0, {"type": "input_audio",
                           "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}})
    return {"model": model, "modalities": ["text", "audio"], "audio": {"voice": VOICE, "format": "wav"},
            "messages": [{"role": "user", "content": content}]}


def post(url: str, body: dict[str, Any], timeout: float = 300) -> tuple[int, bytes]:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class Answer:
    transcript: str
    wav: bytes

    @property
    def seconds(self) -> float:
        with wave.open(io.BytesIO(self.wav)) as w:
            return w.getnframes() / w.getframerate()


# A random-weight talker may end its speech at its first step (about one answer in twenty for
# the demo's text question): the demo asks again, a few times at most, rather than show silence.
SPOKEN_TRIES = 3


def ask(url: str, model: str, out: Path, timeout: float = 120) -> Answer:
    """One question with a tone attached, speech out; the WAV is written to `out`. Retries while
    the gateway answers 503 (its thinker or talker not resolvable yet), and asks again (up to
    SPOKEN_TRIES answers) while the speech comes back empty."""
    body = speech_request(model, audio=tone_wav())
    deadline = time.monotonic() + timeout
    answers = 0
    while True:
        try:
            status, raw = post(url, body)
        except OSError as e:  # the gateway's port not open yet
            status, raw = 0, str(e).encode()
        if status == 200:
            message = json.loads(raw)["choices"][0]["message"]
            answer = Answer(message["audio"].get("transcript") or message.get("content") or "",
                            base64.b64decode(message["audio"]["data"]))
            answers += 1
            if answer.seconds > 0 or answers == SPOKEN_TRIES:
                break
            continue
        if status not in (0, 502, 503) or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway at {url} answered {status}: {raw[:500].decode(errors='replace')}")
        time.sleep(1)
    out.write_bytes(answer.wav)
    return answer


def ask_again_command(url: str, model: str) -> str:
    """A shell line that asks the gateway again and writes answer.wav."""
    body = json.dumps(speech_request(model, "Hello! Who are you?"))
    save = ("import sys, json, base64; m = json.load(sys.stdin)['choices'][0]['message']; "
            "open('answer.wav', 'wb').write(base64.b64decode(m['audio']['data'])); print(m['audio']['transcript'])")
    return (f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)} \\\n"
            f"  | python3 -c {shlex.quote(save)}")


# ------------------------------------------------------------------------------------ load


@dataclass
class LoadReport:
    peak: dict[str, int] = field(default_factory=dict)       # role -> most desired replicas seen
    final: dict[str, int] = field(default_factory=dict)      # role -> desired replicas at the end
    decisions: list[dict[str, Any]] = field(default_factory=list)
    answered: int = 0
    failed: int = 0


class Burst:
    """`concurrency` clients asking long questions back to back until stopped."""

    def __init__(self, url: str, model: str, concurrency: int, max_tokens: int):
        self.url, self.concurrency = url, concurrency
        self.body = {"model": model, "max_tokens": max_tokens, "ignore_eos": True,
                     "messages": [{"role": "user", "content": "Tell me a long story."}]}
        self.stop = threading.Event()
        self.answered = self.failed = self.in_flight = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(concurrency)]

    def _client(self) -> None:
        while not self.stop.is_set():
            with self._lock:
                self.in_flight += 1
            try:
                ok = post(self.url, self.body, timeout=600)[0] == 200
            except OSError:
                ok = False
            with self._lock:
                self.in_flight -= 1
                self.answered += ok
                self.failed += not ok

    def __enter__(self) -> "Burst":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


def queue_depths(pods: list[dict[str, Any]]) -> dict[str, float]:
    """role -> summed omni_queue_depth over its ready pods, scraped as the operator does."""
    from omni_runtime.metrics import parse_prometheus_text

    depth: dict[str, float] = {}
    for p in pods:
        role, ip = p["metadata"]["labels"].get(COMPONENT), p.get("status", {}).get("podIP")
        port = next((pt["containerPort"] for pt in p["spec"]["containers"][0].get("ports", [])
                     if pt.get("name") == "metrics"), None)
        if role not in ("thinker", "talker") or not ip or not port:
            continue
        try:
            with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=1) as r:
                depth[role] = depth.get(role, 0.0) + parse_prometheus_text(r.read().decode()).get("omni_queue_depth", 0)
        except OSError:
            pass
    return depth


def run_load(read: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]], url: str, model: str,
             say: Callable[[str], None], *, concurrency: int, load_seconds: float, settle_seconds: float,
             max_tokens: int = 400, every: float = 3.0) -> LoadReport:
    """Send the burst for `load_seconds`, then wait up to `settle_seconds` for every role to return
    to its minimum; print a row of replicas and queue depths every `every` seconds and each scale
    decision as it appears. `read()` gives (the OmniDeployment, its pods)."""
    report = LoadReport()
    seen: set[tuple[str, str, int, int]] = set()
    say(f"{'t':>5}  {'clients':>7}  {'thinker':>9}  {'queue':>5}  {'talker':>9}  {'queue':>5}  answered")
    t0 = time.monotonic()
    with Burst(url, model, concurrency, max_tokens) as burst:
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= load_seconds and not burst.stop.is_set():
                burst.stop.set()
                say(f"[{elapsed:4.0f}s] load stopped; waiting for the scale-down window")
            omni, pods = read()
            spec, status = omni.get("spec", {}), omni.get("status", {})
            depth = queue_depths(pods)
            cells = []
            for role in ("thinker", "talker"):
                rs = status.get(role) or {}
                report.final[role] = rs.get("desiredReplicas", 0)
                report.peak[role] = max(report.peak.get(role, 0), report.final[role])
                cells += [f"{rs.get('readyReplicas', 0)}/{rs.get('desiredReplicas', 0)}".rjust(9),
                          f"{depth.get(role, 0):5.0f}"]
            say(f"{elapsed:5.0f}  {burst.in_flight:7d}  {'  '.join(cells)}  {burst.answered}")
            for d in status.get("lastScaleDecisions") or []:
                key = (d["time"], d["role"], d["fromReplicas"], d["toReplicas"])
                if key not in seen:
                    seen.add(key)
                    report.decisions.append(d)
                    say(f"       {d['role']} {d['fromReplicas']} -> {d['toReplicas']}: {d['reason']}")
            at_min = all(report.final[r] <= ((spec.get(r) or {}).get("minReplicas", 1)) for r in ("thinker", "talker"))
            if burst.stop.is_set() and burst.in_flight == 0 and at_min and report.peak["thinker"] > report.final["thinker"]:
                break
            if elapsed > load_seconds + settle_seconds:
                break
            time.sleep(every)
        burst.join(30)
        report.answered, report.failed = burst.answered, burst.failed
    return report
