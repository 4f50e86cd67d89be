"""What the speech path costs a user: time to first audio, and what a talker pod produces.

Real processes on loopback, the tiny random-weight model on CPU: one thinker
(transformers engine), one talker, and two gateways in front of them, one with the
streaming hand-off (the default) and one with OMNI_SPEECH_STREAMING=0, which sends the
talker the whole answer once the thinker has finished (the baseline, measured in the
same run).

  1. time to first audio through each gateway, for a long answer (300 tokens) and a
     short one (16 tokens): the streamed path should not grow with the answer;
  2. talker throughput (seconds of audio per wall-clock second) with 8 requests at once
     divided by that with 1: what batched decoding buys; on the talker's default decode path
     (fixed shapes, OMNI_TALKER_DECODE=graphs) and, as a baseline in the same run, on a second
     talker with OMNI_TALKER_DECODE=eager;
  3. p50/p99 time to first audio at the talker with 1, 4 and 8 concurrent streamed
     requests whose text arrives at a thinker's pace.

    .venv/bin/python -m bench.speech_bench [--rounds 3] [--device cuda]

`--device cuda` runs the thinker and talker on the GPU (bf16) instead.

Needs `make setup-runtime`. Prints figures; the last line holds the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from e2e.runtime_process import RuntimeProcess

CODES = 64           # codec frames per spoken answer in part 1 (5 s of audio on the real model)
THROUGHPUT_CODES = 120
TEXT_RATE = 50.0     # tokens per second the simulated thinker writes in part 3


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- 1: time to first audio through the gateway ------------------------------------------
async def gateway_ttfa(url: str, max_tokens: int) -> tuple[float, int]:
    """Seconds from sending a streamed speech request to its first audio chunk, and the
    number of answer tokens."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "pcm16"}, "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    started = time.monotonic()
    first = None
    text = 0
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"gateway answered {r.status}: {(await r.text())[:300]}")
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    line = event.decode().strip()
                    if not line.startswith("data:") or line.endswith("[DONE]"):
                        continue
                    msg = json.loads(line[5:])
                    if "error" in msg:
                        raise RuntimeError(f"speech failed: {msg['error']}")
                    audio = (msg.get("choices") or [{}])[0].get("delta", {}).get("audio") or {}
                    if audio.get("data") and first is None:
                        first = time.monotonic() - started
                    if audio.get("transcript"):
                        text += 1
    if first is None:
        raise RuntimeError("no audio in the answer")
    return first, text


# -- 2 and 3: the talker alone -------------------------------------------------------------
def talker_payload(prompt_ids: list[int], response: list[int], codes: int, seed: int) -> dict:
    return {"v": 1, "speaker": "Ethan", "prompt_ids": prompt_ids, "response_ids": response, "format": "pcm",
            "generation": {"max_codes": codes, "min_codes": codes, "seed": seed}}


async def talker_whole(session, url: str, payload: dict) -> int:
    async with session.post(url, json=payload) as r:
        if r.status != 200:
            raise RuntimeError(f"talker answered {r.status}: {(await r.text())[:300]}")
        return len(await r.read()) // 2


async def talker_throughput(url: str, prompt_ids, concurrency: int, rounds: int) -> float:
    """Seconds of audio per wall-clock second with `concurrency` requests in flight."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        started = time.monotonic()
        samples = 0
        for r in range(rounds):
            got = await asyncio.gather(*(talker_whole(s, url, talker_payload(
                prompt_ids, list(range(40, 60)), THROUGHPUT_CODES, 1000 * r + i)) for i in range(concurrency)))
            samples += sum(got)
        return samples / 24000 / (time.monotonic() - started)


async def talker_streamed_ttfa(session, url: str, prompt_ids, seed: int) -> float:
    """A streamed request whose text arrives at TEXT_RATE tokens/s: seconds to its first audio."""
    ids = list(range(40, 140))

    async def body():
        yield (json.dumps(talker_payload(prompt_ids, ids[:1], CODES, seed)) + "\n").encode()
        for tok in ids[1:]:
            await asyncio.sleep(1 / TEXT_RATE)
            yield (json.dumps({"ids": [tok]}) + "\n").encode()
        yield b'{"end": true}\n'

    started = time.monotonic()
    async with session.post(url, data=body(), headers={"Content-Type": "application/x-ndjson"}) as r:
        if r.status != 200:
            raise RuntimeError(f"talker answered {r.status}: {(await r.text())[:300]}")
        await r.content.readany()
        first = time.monotonic() - started
        await r.read()
    return first


async def talker_ttfa_at(url: str, prompt_ids, concurrency: int, rounds: int) -> list[float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        out: list[float] = []
        for r in range(rounds):
            out += await asyncio.gather(*(talker_streamed_ttfa(s, url, prompt_ids, 100 * r + i)
                                          for i in range(concurrency)))
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the thinker and talker run: cpu or cuda")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from omni_runtime.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="speech-bench-"))
    model = build_tiny_model(work / "model")
    tok = AutoTokenizer.from_pretrained(model)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": "Say something."}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    common = {"OMNI_MODEL": str(model), "OMNI_DEVICE": args.device, "OMNI_SERVED_MODEL_NAME": "tiny"}
    roles = []
    try:
        thinker = RuntimeProcess("thinker", {**common, "OMNI_ROLE": "thinker"}, work / "thinker.log",
                                 ("--engine", "transformers"))
        talker = RuntimeProcess("talker", {**common, "OMNI_ROLE": "talker", "OMNI_MAX_INFLIGHT": "16",
                                           "OMNI_MAX_QUEUE": "16"}, work / "talker.log")
        eager = RuntimeProcess("talker", {**common, "OMNI_ROLE": "talker", "OMNI_MAX_INFLIGHT": "16",
                                          "OMNI_MAX_QUEUE": "16", "OMNI_TALKER_DECODE": "eager"},
                               work / "talker-eager.log")
        roles += [thinker, talker, eager]
        gateways = {}
        for name, streaming in (("streamed", "1"), ("whole answer", "0")):
            gateways[name] = RuntimeProcess("gateway", {
                **common, "OMNI_ROLE": "gateway", "OMNI_SPEECH_STREAMING": streaming,
                "OMNI_THINKER_SERVICE": f"127.0.0.1:{thinker.port}|{thinker.metrics_port}",
                "OMNI_TALKER_SERVICE": f"127.0.0.1:{talker.port}|{talker.metrics_port}",
                "OMNI_TALKER_GENERATION": json.dumps({"max_codes": CODES, "min_codes": CODES, "seed": 3}),
            }, work / f"gateway-{streaming}.log")
            roles.append(gateways[name])
        for r in roles:
            r.wait_ready(timeout=180)
        synth = talker.url + "/v1/talker/synthesize"
        synth_eager = eager.url + "/v1/talker/synthesize"
        asyncio.run(talker_throughput(synth, prompt_ids, 2, 1))  # warm-up
        asyncio.run(talker_throughput(synth_eager, prompt_ids, 2, 1))
        asyncio.run(gateway_ttfa(gateways["streamed"].url, 8))

        where = "CPU" if args.device == "cpu" else args.device
        print(f"# tiny model, {where} ({os.cpu_count()} cores), OMP_NUM_THREADS=1 per process; logs in {work}")
        print(f"1. time to first audio through the gateway ({CODES} codes of speech, median of {args.rounds})")
        ratios = {}
        for name, gw in gateways.items():
            figures = {}
            for label, max_tokens in (("short", 16), ("long", 300)):
                runs = [asyncio.run(gateway_ttfa(gw.url, max_tokens)) for _ in range(args.rounds)]
                figures[label] = statistics.median(t for t, _ in runs)
                print(f"   {name:13s} {label:5s} answer ({max_tokens:3d} tokens): {figures[label]:.3f} s")
            ratios[name] = figures["long"] / figures["short"]
            print(f"   {name:13s} long / short: {ratios[name]:.2f}")

        print(f"2. talker throughput, {THROUGHPUT_CODES} codes per request (audio s per wall s)")
        tput = {}
        for name, url in (("fixed shapes", synth), ("eager", synth_eager)):
            one = asyncio.run(talker_throughput(url, prompt_ids, 1, args.rounds + 1))
            eight = asyncio.run(talker_throughput(url, prompt_ids, 8, args.rounds))
            tput[name] = eight / one
            print(f"   {name:12s} 1 at a time: {one:.2f}   8 at once: {eight:.2f}   ratio {eight / one:.2f}")

        print(f"3. time to first audio at the talker, streamed text at {TEXT_RATE:g} tokens/s")
        for n in (1, 4, 8):
            ttfa = asyncio.run(talker_ttfa_at(synth, prompt_ids, n, max(args.rounds, 8 // n)))
            print(f"   {n} concurrent: p50 {pct(ttfa, 0.5) * 1000:.0f} ms   p99 {pct(ttfa, 0.99) * 1000:.0f} ms"
                  f"   ({len(ttfa)} requests)")
        print(f"ratios: ttfa long/short {ratios['streamed']:.2f} (goal <= 1.3; whole-answer baseline "
              f"{ratios['whole answer']:.2f}), talker throughput 8/1 {tput['fixed shapes']:.2f} (goal >= 4; "
              f"eager path {tput['eager']:.2f})")
        return 0
    finally:
        for r in roles:
            r.stop()


if __name__ == "__main__":
    sys.exit(main())
