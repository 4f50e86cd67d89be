"""Voice-to-voice latency of realtime sessions, against the HTTP speech path, and barge-in.

Real processes on loopback, the tiny random-weight model: one thinker (vLLM's CPU build,
which batches as deployments do, or with `--thinker transformers` the transformers engine,
one generation at a time), one talker and a gateway, driven by the OpenAI SDK's realtime
client with real speech from espeak-ng. Every user "speaks" an utterance in real time (20 ms
chunks at 1x), then waits for the whole answer; concurrent users do so side by side.

  1. voice-to-voice latency at 1, 4 and 8 concurrent sessions: from the last appended audio
     of the user's turn to the first `response.output_audio.delta` (manual commit, so VAD
     silence is not in it); the baseline, in the same run: the same utterance (as a 16 kHz
     WAV) as one streamed `/v1/chat/completions` request with audio output, from the end of
     its speech (the request is then wrapped and sent) to its first audio chunk, by the same
     number of users speaking first. Both ask for the same answer (16 tokens, greedy) and
     speech (32 codec frames); realtime turns delete their items after each answer, so both
     prompts are alike. The paths take turns round by round (A B B A), each round one turn
     per user, `--rounds` rounds each at every concurrency: the turns of a round share engine
     steps, so rounds, not turns, are the independent samples. As with real users, no two
     turns are the same recording (each has its own faint noise, so no thinker cache answers
     one turn from another) and the users of a round do not stop speaking in the same
     millisecond: their turns end spread evenly over STAGGER, the same offsets on both paths.
     On loopback by default; `--uplink-mbps R` puts each user behind an uplink of R Mbit/s
     (bench/uplink.py), where the HTTP request's upload of the utterance after its end takes
     time and a session's appends, sent while the user speaks, do not;
  2. what server VAD adds: end of speech -> `input_audio_buffer.speech_stopped`
     (silence_duration_ms 500 of it), and end of speech -> first audio of the answer;
  3. barge-in: the user starts speaking over a long answer -> the last audio delta of
     that answer (and -> its `response.done`, cancelled). The talker sends a chunk every 4
     codec frames here (OMNI_TALKER_CHUNK_CODES=4), so audio is flowing when the user speaks.

    .venv/bin/python -m bench.realtime_bench [--rounds 32] [--barge-ins 20] [--uplink-mbps 10]
                                             [--chunk-ms 20] [--cpus shared|split]
                                             [--thinker transformers] [--device cuda]

Needs `make setup-runtime`, `make setup-vllm` (but for `--thinker transformers`) and espeak-ng
(`make system-tools`). The last line holds the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from e2e.procs import lower_session_group
from e2e.runtime_process import RuntimeProcess, vllm_launcher_env, vllm_venv
from e2e.speech import espeak_pcm16, silence

from bench.uplink import Uplink

ANSWER_TOKENS = 16
CODES = 32                 # speech per answer: 2.56 s on the real model's 12.5 Hz codec
CHUNK_MS = 20              # audio per input_audio_buffer.append
STAGGER = 0.25             # seconds over which the turn ends of a round's users are spread
NOISE = 10.0               # microphone noise, PCM16 steps RMS (about -70 dBFS)
MODEL = "tiny"
UTTERANCE = "What is the weather like today?"
INTERRUPTION = "Wait, stop, I have another question."


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def speech_span(pcm: bytes, level: float = 0.02) -> bytes:
    """The utterance from its first to its last sample louder than `level` (espeak-ng pads both
    ends with silence): speech starts with its first chunk and ends with its last."""
    loud = np.flatnonzero(np.abs(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768) > level)
    return pcm[2 * int(loud[0]):2 * (int(loud[-1]) + 1)]


class Recordings:
    """The utterance as each turn speaks it: with fresh faint noise, as a microphone would
    give, so that no two turns are byte-equal. Identical audio would let vLLM's prefix and
    multimodal caches skip a turn's audio encoding, which real speech never allows."""

    def __init__(self, pcm: bytes, seed: int = 0):
        self.clean = np.frombuffer(pcm, "<i2").astype(np.float32)
        self.rng = np.random.default_rng(seed)

    def next(self) -> bytes:
        noisy = self.clean + self.rng.normal(0.0, NOISE, len(self.clean))
        return np.clip(noisy.round(), -32768, 32767).astype("<i2").tobytes()


async def send_event(conn, kind: str) -> None:
    await conn.send_raw(json.dumps({"type": kind}))


async def speak(conn, pcm: bytes, chunk_ms: int = CHUNK_MS) -> float:
    """Append `pcm` at 1x real time, `chunk_ms` per event; the time the last chunk was sent. The
    events are encoded here and sent with the SDK's send_raw: its typed `append` validates each
    event, which on this shared box costs the client more CPU than the gateway spends on it."""
    start, size = time.monotonic(), 48 * chunk_ms  # bytes of 24 kHz PCM16
    for n, i in enumerate(range(0, len(pcm), size)):
        await asyncio.sleep(max(0.0, start + n * chunk_ms / 1000 - time.monotonic()))
        await conn.send_raw(json.dumps({"type": "input_audio_buffer.append",
                                        "audio": base64.b64encode(pcm[i:i + size]).decode()}))
    return time.monotonic()


async def recv(conn) -> dict:
    """The next server event as a dict: the SDK's recv() builds a typed model of every event,
    which on this shared box delays what the client sees more than anything the server does."""
    return json.loads(await conn.recv_bytes())


async def next_of(conn, kind: str, seen: list | None = None) -> dict:
    while True:
        ev = await recv(conn)
        if seen is not None:
            seen.append((time.monotonic(), ev))
        if ev["type"] == "error":
            raise RuntimeError(f"realtime error: {ev['error']}")
        if ev["type"] == kind:
            return ev


def sdk(url: str):
    from openai import AsyncOpenAI

    return AsyncOpenAI(api_key="unused", base_url=url + "/v1")


# -- 1: voice to voice, realtime and HTTP -----------------------------------------------------
async def realtime_session(url: str):
    """An open session with manual turns and the benchmark's answer length."""
    conn = await sdk(url).realtime.connect(model=MODEL).enter()
    await conn.session.update(session={"type": "realtime", "max_output_tokens": ANSWER_TOKENS,
                                       "audio": {"input": {"turn_detection": None}}})
    await next_of(conn, "session.updated")
    return conn


async def realtime_turn(conn, pcm: bytes, offset: float, chunk_ms: int) -> float:
    """One spoken turn, begun `offset` s into the round: seconds from its last appended audio
    to the answer's first audio. Commit and response.create go raw, as the appends do."""
    await asyncio.sleep(offset)
    last = await speak(conn, pcm, chunk_ms)
    await send_event(conn, "input_audio_buffer.commit")
    await send_event(conn, "response.create")
    seen: list = []
    await next_of(conn, "response.output_audio.delta", seen)
    latency = seen[-1][0] - last
    done = await next_of(conn, "response.done")
    user = next(ev["item_id"] for _, ev in seen if ev["type"] == "input_audio_buffer.committed")
    for item in (user, done["response"]["output"][0]["id"]):  # the next turn's prompt is this one's again
        await conn.conversation.item.delete(item_id=item)
        await next_of(conn, "conversation.item.deleted")
    return latency


async def http_turn(session: aiohttp.ClientSession, url: str, pcm: bytes, offset: float) -> float:
    """The same question over HTTP: the user speaks it (begun `offset` s into the round), then it
    goes in one request; seconds from the end of its speech to the first audio chunk of the streamed
    answer. The client has the speech at 16 kHz as it ends (resampled while it was recorded, as the
    gateway does for a realtime session); wrapping, encoding and sending it are in the time."""
    from omni_runtime.gateway.realtime.conversation import audio_part
    from omni_runtime.gateway.realtime.resample import to_model_rate

    pcm16k = to_model_rate(pcm)
    await asyncio.sleep(offset + len(pcm) / 48000)
    sent = time.monotonic()
    body = {"model": MODEL, "stream": True, "max_tokens": ANSWER_TOKENS, "temperature": 0,
            "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "pcm16"},
            "messages": [{"role": "user", "content": [{"type": "input_audio",
                                                       "input_audio": {"data": audio_part(pcm16k).wav_b64, "format": "wav"}}]}]}
    first = None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"gateway answered {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            if first is None and line.startswith(b"data: {") and b'"data"' in line:
                first = time.monotonic() - sent
    if first is None:
        raise RuntimeError("no audio in the HTTP answer")
    return first


async def voice_to_voice(url: str, speech: Recordings, users: int, rounds: int,
                         chunk_ms: int = CHUNK_MS) -> tuple[list[list[float]], list[list[float]]]:
    """`users` realtime sessions stay open; round by round all of them take a turn, then the same
    number of HTTP users do, in A B B A order, so that load on the machine from outside, drifting
    during the run, falls on both paths alike. User i ends its turn i/users of STAGGER after user 0.
    Each path's latencies, round by round."""
    offsets = [i * STAGGER / users for i in range(users)]
    conns = [await realtime_session(url) for _ in range(users)]
    rt, http = [], []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            for r in range(rounds):
                for path in ("rt", "http") if r % 2 == 0 else ("http", "rt"):
                    if path == "rt":
                        rt.append(await asyncio.gather(*(realtime_turn(c, speech.next(), t, chunk_ms)
                                                         for c, t in zip(conns, offsets))))
                    else:
                        http.append(await asyncio.gather(*(http_turn(s, url, speech.next(), t) for t in offsets)))
    finally:
        for c in conns:
            await c.close()
    return rt, http


# -- 2: what server VAD adds ------------------------------------------------------------------
async def vad_turn(url: str, pcm: bytes) -> tuple[float, float]:
    async with sdk(url).realtime.connect(model=MODEL) as conn:
        await conn.session.update(session={"type": "realtime", "max_output_tokens": ANSWER_TOKENS})
        await next_of(conn, "session.updated")
        seen: list = []
        end = await speak(conn, silence(0.3) + pcm)
        tail = asyncio.ensure_future(speak(conn, silence(1.5)))
        await next_of(conn, "input_audio_buffer.speech_stopped", seen)
        stopped = seen[-1][0]
        await next_of(conn, "response.output_audio.delta", seen)
        first = seen[-1][0]
        await tail
        await next_of(conn, "response.done")
        return stopped - end, first - end


# -- 3: barge-in --------------------------------------------------------------------------------
async def barge_in(url: str, pcm: bytes, interruption: bytes) -> tuple[float, float, float]:
    """(speech start -> last audio delta of the interrupted answer, speech start -> its response.done,
    the last delta before speech start -> speech start: audio was flowing when the user spoke)."""
    async with sdk(url).realtime.connect(model=MODEL) as conn:
        await conn.session.update(session={"type": "realtime", "max_output_tokens": 3000})  # within vLLM's 4096-token context
        await next_of(conn, "session.updated")
        seen: list = []
        talk = asyncio.ensure_future(speak(conn, silence(0.3) + pcm + silence(0.8)))
        created = await next_of(conn, "response.created", seen)
        for _ in range(3):  # the answer is being spoken
            await next_of(conn, "response.output_audio.delta", seen)
        await talk
        until = time.monotonic() + 0.5  # half a second further into the answer, every event timed as it comes
        while (left := until - time.monotonic()) > 0:
            try:
                ev = await asyncio.wait_for(recv(conn), left)
            except asyncio.TimeoutError:
                break
            seen.append((time.monotonic(), ev))
        before = max(t for t, ev in seen if ev["type"] == "response.output_audio.delta")
        seen.clear()
        talk = asyncio.ensure_future(speak(conn, interruption + silence(0.8)))
        start = time.monotonic()  # its first chunk goes out now: speech starts
        done = await next_of(conn, "response.done", seen)
        resp = done["response"]
        if resp["id"] != created["response"]["id"] or resp["status"] != "cancelled":
            raise RuntimeError(f"the answer was not cut: {resp['status']}")
        deltas = [t for t, ev in seen if ev["type"] == "response.output_audio.delta" and ev["response_id"] == resp["id"]]
        last = max(deltas) if deltas else start
        await talk
        asyncio.ensure_future(discard_events(conn))  # the answer to the interruption is still streaming
        return max(0.0, last - start), seen[-1][0] - start, start - before


async def discard_events(conn) -> None:
    """Read what the server still sends until the connection closes. The client library stops
    reading the socket when events pile up unread, and its close then waits 10 s for a close
    frame that sits behind them."""
    try:
        while True:
            await conn.recv_bytes()
    except Exception:  # noqa: BLE001 - the connection closed, however it did
        pass


def ratio_interval(rt: list[list[float]], http: list[list[float]], resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """The 95 % bootstrap interval of p50(realtime) / p50(HTTP): rounds, the independent samples,
    drawn with replacement on each path. An interval that holds 1.0 is a difference this many
    rounds cannot tell from none."""
    rng = np.random.default_rng(seed)
    rt_rounds, http_rounds = [np.asarray(r) for r in rt], [np.asarray(r) for r in http]
    ratios = [np.median(np.concatenate([rt_rounds[i] for i in rng.integers(len(rt), size=len(rt))]))
              / np.median(np.concatenate([http_rounds[i] for i in rng.integers(len(http), size=len(http))]))
              for _ in range(resamples)]
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def part_voice_to_voice(url: str, speech: Recordings, rounds: int,
                        chunk_ms: int) -> dict[int, tuple[float, float, float]]:
    """{sessions: (realtime / HTTP p50, its 95 % interval's low and high ends)}."""
    print(f"1. voice-to-voice: last audio of the turn -> first audio of the answer ({ANSWER_TOKENS} tokens, "
          f"{CODES} codec frames), {rounds} rounds of one turn per user per path at each concurrency, "
          f"{chunk_ms} ms of audio per append, "
          f"the paths alternating, turn ends spread over {STAGGER * 1000:.0f} ms")
    ratios = {}
    for n in (1, 4, 8):
        rt_rounds, http_rounds = asyncio.run(voice_to_voice(url, speech, n, rounds, chunk_ms))
        rt, http = sum(rt_rounds, []), sum(http_rounds, [])
        ratios[n] = (pct(rt, 0.5) / pct(http, 0.5), *ratio_interval(rt_rounds, http_rounds))
        print(f"   {n} concurrent: realtime p50 {pct(rt, 0.5) * 1000:.0f} ms p99 {pct(rt, 0.99) * 1000:.0f} ms"
              f"   HTTP p50 {pct(http, 0.5) * 1000:.0f} ms p99 {pct(http, 0.99) * 1000:.0f} ms"
              f"   ({len(rt)}/{len(http)} turns)   ratio p50 {ratios[n][0]:.2f} (95 % interval "
              f"{ratios[n][1]:.2f}-{ratios[n][2]:.2f})")
    return ratios


def part_vad(url: str, speech: Recordings, turns: int) -> None:
    print("2. server VAD (silence_duration_ms 500): end of speech -> speech_stopped; -> first audio")
    vad = [asyncio.run(vad_turn(url, speech.next())) for _ in range(turns)]
    stops, firsts = [v[0] for v in vad], [v[1] for v in vad]
    print(f"   speech_stopped p50 {pct(stops, 0.5) * 1000:.0f} ms p99 {pct(stops, 0.99) * 1000:.0f} ms;"
          f"   first audio p50 {pct(firsts, 0.5) * 1000:.0f} ms   ({len(vad)} turns)")


def part_barge_in(url: str, pcm: bytes, interruption: bytes, n: int) -> list[float]:
    print("3. barge-in: the user speaks over a long answer")
    cuts = [asyncio.run(barge_in(url, pcm, interruption)) for _ in range(n)]
    last, done, gap = [c[0] for c in cuts], [c[1] for c in cuts], [c[2] for c in cuts]
    print(f"   speech start -> last audio delta: p50 {pct(last, 0.5) * 1000:.0f} ms p99 {pct(last, 0.99) * 1000:.0f} ms"
          f";   -> response.done (cancelled): p50 {pct(done, 0.5) * 1000:.0f} ms p99 {pct(done, 0.99) * 1000:.0f} ms"
          f"   ({len(cuts)} barge-ins)")
    print(f"   audio was flowing: the last delta before speech start came p50 {pct(gap, 0.5) * 1000:.0f} ms, "
          f"p99 {pct(gap, 0.99) * 1000:.0f} ms before it")
    return last


def cpu_split(mode: str) -> tuple[set[int], set[int]] | None:
    """(the engines' CPUs, the load's CPUs) for `--cpus split`: the first CPU for the thinker and
    talker, the others for this client, the gateways and the uplink relay. In a deployment the
    engines have GPU nodes of their own, the gateway a CPU node and the users their devices;
    sharing every CPU, the client's and gateways' work for the users still speaking delays the
    engines' steps for the users being answered, which a deployment never sees."""
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "shared" or len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def start_thinker(engine: str, common: dict, log: Path, lower: bool) -> RuntimeProcess:
    """The transformers engine in this environment, or the launcher over `vllm serve` from
    .venv-vllm (OMNI_VLLM_VENV), its batch wide enough for every session at once; `lower`:
    vLLM's session at the lowest priority (see e2e/procs.py), for CPUs shared with the load."""
    if engine == "transformers":
        return RuntimeProcess("thinker", common, log, ("--engine", "transformers"))
    venv = vllm_venv()
    if not (venv / "bin" / "vllm").exists():
        raise SystemExit(f"{venv}/bin/vllm missing: run `make setup-vllm`, or pass --thinker transformers")
    env = {**common, **vllm_launcher_env(venv, ["--max-model-len", "4096", "--max-num-seqs", "16"])}
    thinker = RuntimeProcess("thinker", env, log, python=str(venv / "bin" / "python"))
    if lower:
        lower_session_group(thinker.popen)  # vLLM runs in a session of its own (see e2e/procs.py)
    return thinker


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=32,
                    help="voice-to-voice rounds (one turn per user each) per path at each concurrency")
    ap.add_argument("--vad-turns", type=int, default=6)
    ap.add_argument("--barge-ins", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="where the thinker and talker run: cpu or cuda")
    ap.add_argument("--thinker", choices=("vllm", "transformers"), default="vllm",
                    help="the thinker's engine (vllm: the CPU build in .venv-vllm)")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (comma-separated)")
    ap.add_argument("--uplink-mbps", type=float, default=0.0,
                    help="part 1: each user's client -> gateway bandwidth (0: loopback, unlimited)")
    ap.add_argument("--chunk-ms", type=int, default=CHUNK_MS, help="part 1: ms of audio per append event")
    ap.add_argument("--cpus", choices=("split", "shared"), default="shared",
                    help="split: the engines on the first CPU, the load on the others (see cpu_split); "
                         "shared: every process on every CPU")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the processes below on SIGTERM too

    from omni_runtime.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="realtime-bench-"))
    model = build_tiny_model(work / "model")
    pcm = speech_span(espeak_pcm16(UTTERANCE))
    interruption = speech_span(espeak_pcm16(INTERRUPTION))
    speech = Recordings(pcm)
    seconds = len(pcm) / 48000
    common = {"OMNI_MODEL": str(model), "OMNI_DEVICE": args.device, "OMNI_SERVED_MODEL_NAME": MODEL}
    procs = []
    split = cpu_split(args.cpus)
    try:
        if split:  # a child takes its parent's CPUs when it starts, its own children in turn
            os.sched_setaffinity(0, split[0])
        thinker = start_thinker(args.thinker, common, work / "thinker.log", lower=split is None)
        # a chunk every 4 codec frames (320 ms of speech), so audio is flowing when a user barges in
        talker = RuntimeProcess("talker", {**common, "OMNI_MAX_INFLIGHT": "16", "OMNI_MAX_QUEUE": "16",
                                           "OMNI_TALKER_CHUNK_CODES": "4"}, work / "talker.log")
        if split:
            os.sched_setaffinity(0, split[1])
        upstreams = {"OMNI_THINKER_SERVICE": f"127.0.0.1:{thinker.port}|{thinker.metrics_port}",
                     "OMNI_TALKER_SERVICE": f"127.0.0.1:{talker.port}|{talker.metrics_port}"}
        gw = RuntimeProcess("gateway", {
            **common, **upstreams, "OMNI_REALTIME_THINKER_PARAMS": json.dumps({"temperature": 0}),
            "OMNI_TALKER_GENERATION": json.dumps({"max_codes": CODES, "min_codes": CODES, "seed": 3})},
            work / "gateway.log")
        long_gw = RuntimeProcess("gateway", {
            **common, **upstreams, "OMNI_REALTIME_THINKER_PARAMS": json.dumps({"temperature": 0, "ignore_eos": True}),
            "OMNI_TALKER_GENERATION": json.dumps({"max_codes": 3000, "min_codes": 3000, "seed": 3})},
            work / "gateway-long.log")
        procs += [thinker, talker, gw, long_gw]
        for p in procs:
            p.wait_ready(timeout=600 if p is thinker and args.thinker == "vllm" else 180)
        users_url = gw.url
        if args.uplink_mbps > 0:
            uplink = Uplink(gw.port, args.uplink_mbps)
            procs.append(uplink)
            users_url = uplink.url
        asyncio.run(voice_to_voice(users_url, speech, 1, 2))  # warm-up, both paths

        where = "CPU" if args.device == "cpu" else args.device
        cpus = (f"engines on CPU {sorted(split[0])}, client and gateways on {sorted(split[1])}" if split
                else f"{os.cpu_count()} CPUs shared by all")
        print(f"# tiny model, {where} ({cpus}), thinker: {args.thinker}, OMP_NUM_THREADS=1 per process; "
              f"utterance {seconds:.2f} s; users' uplink: "
              + (f"{args.uplink_mbps:g} Mbit/s each" if args.uplink_mbps > 0 else "loopback") + f"; logs in {work}")
        parts = set(args.parts.split(","))
        ratios = part_voice_to_voice(users_url, speech, args.rounds, args.chunk_ms) if "1" in parts else {}
        if "2" in parts:
            part_vad(gw.url, speech, args.vad_turns)
        last = part_barge_in(long_gw.url, pcm, interruption, args.barge_ins) if "3" in parts else None
        summary = []
        if ratios:
            summary.append("realtime/HTTP voice-to-voice p50 " + ", ".join(
                f"{n}: {r:.2f} [{lo:.2f}-{hi:.2f}]" for n, (r, lo, hi) in ratios.items()) + " (goal <= 1.0)")
        if last is not None:
            summary.append(f"barge-in p99 {pct(last, 0.99) * 1000:.0f} ms (goal <= 200 ms)")
        print("ratios: " + "; ".join(summary))
        return 0
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
