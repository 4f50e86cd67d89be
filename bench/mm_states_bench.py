"""What exporting multimodal thinker states costs: bytes per request and time added to a
thinker request, on real vLLM (CPU build in .venv-vllm) serving the tiny checkpoint.

Two launchers run one after the other (side by side, vLLM's CPU workers would share a
core): without the export (OMNI_MM_STATES_EXPORT=0), then with it (1, the default); the
same audio requests (each with a different sound, so vLLM's prefix cache never serves them)
go to each. A request asks for one token, so its latency is mostly the prefill the export
hooks into.

    .venv/bin/python -m bench.mm_states_bench [--requests 20] [--seconds 5]

Needs `make setup-runtime setup-vllm`. Prints figures and ends with the latency ratio.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from e2e.procs import free_port
from e2e.runtime_process import vllm_launcher_env, vllm_venv


def tone_wav(seconds: float, freq: float, rate: int = 16000) -> bytes:
    import io
    import math
    import struct
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate)))
                               for i in range(int(seconds * rate))))
    return buf.getvalue()


class Thinker:
    def __init__(self, venv: Path, model: Path, export: bool, log: Path):
        self.port, self.mport = free_port(), free_port()
        env = {**os.environ, "OMNI_MODEL": str(model), "OMNI_SERVED_MODEL_NAME": "tiny", "OMNI_PORT": str(self.port),
               "OMNI_METRICS_PORT": str(self.mport), "OMNI_MM_STATES_EXPORT": "1" if export else "0",
               **vllm_launcher_env(venv, ["--max-model-len", "2048", "--max-num-seqs", "2"])}
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([str(venv / "bin" / "python"), "-m", "omni_runtime.cli", "thinker"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=900):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"thinker exited with {self.proc.returncode}, see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError("thinker not ready")

    def chat(self, wav: bytes, rid: str) -> float:
        body = {"model": "tiny", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
            {"type": "text", "text": "What do you hear?"}]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "X-Request-Id": rid})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
        return time.perf_counter() - t

    def states(self, rid: str, wait=10.0) -> tuple[dict, float]:
        t, deadline = time.perf_counter(), time.monotonic() + wait
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.mport}/v1/omni/mm-states/{rid}", timeout=5) as r:
                    raw = r.read()
                    return {"json_bytes": len(raw), **json.loads(raw)}, time.perf_counter() - t
            except urllib.error.HTTPError as e:
                if e.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=90)
        self.log.close()


def summary(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1e3:7.2f} ms  mean {statistics.fmean(xs) * 1e3:7.2f} ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=5.0, help="audio length per request")
    ap.add_argument("--venv", default=str(vllm_venv()))
    args = ap.parse_args(argv)
    venv = Path(args.venv)
    if not (venv / "bin" / "vllm").exists():
        print(f"{venv}/bin/vllm missing: run `make setup-vllm`", file=sys.stderr)
        return 2
    from omni_runtime.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="mm-states-bench-"))
    model = build_tiny_model(work / "model")
    wavs = [tone_wav(args.seconds, 200 + 13 * i) for i in range(args.requests)]
    warm = [tone_wav(args.seconds, 100 + i) for i in range(3)]

    def phase(export: bool) -> tuple[list[float], list[dict], list[float]]:
        th = Thinker(venv, model, export, work / ("export.log" if export else "plain.log"))
        t0 = time.monotonic()
        try:
            th.wait_ready()
            print(f"vLLM thinker ({'with' if export else 'without'} export) ready after {time.monotonic() - t0:.0f} s")
            for i, w in enumerate(warm):  # first requests allocate and compile
                th.chat(w, f"warm-{i}")
            lat, objs, ready = [], [], []
            for i, w in enumerate(wavs):
                lat.append(th.chat(w, f"bench-{i}"))
                if export:
                    obj, delay = th.states(f"bench-{i}")
                    objs.append(obj)
                    ready.append(delay)
            return lat, objs, ready
        finally:
            th.stop()

    lat_off, _, _ = phase(False)
    lat_on, objs, ready = phase(True)
    obj = objs[0]
    hidden = obj["shape"][1]
    raw_bytes = [len(base64.b64decode(o["data"])) for o in objs]
    print(f"{args.requests} requests, {args.seconds:g} s of audio each -> {obj['shape'][0]} audio tokens, "
          f"hidden {hidden}, {obj['dtype']}, layer {obj['layer']}")
    print(f"states per request: {statistics.fmean(raw_bytes):.0f} B raw, "
          f"{statistics.fmean(o['json_bytes'] for o in objs):.0f} B as the JSON mm object "
          f"({hidden * 4} B per multimodal token raw; the real model: 2048 x 2 B bf16 = 4096 B)")
    print(f"thinker latency without export: {summary(lat_off)}")
    print(f"thinker latency with export:    {summary(lat_on)}")
    print(f"states fetchable after the response: {summary(ready)} (first GET included)")
    ratio = statistics.median(lat_on) / statistics.median(lat_off)
    print(f"ratio with/without export (median thinker latency): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
