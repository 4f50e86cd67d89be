"""Talker engine on each device this machine has: load from a weights directory laid out as the
cache leaves it, then time syntheses of the same request (fixed seed, fixed code count) through
the pod's decode loop, one at a time and `--batch` at once.

    python -m bench.talker_device_bench [--model DIR] [--requests 5] [--codes 60] [--batch 8]

Without --model a tiny random-weight checkpoint is built locally. Prints, per device: load
time, peak accelerator memory, time to first audio, real-time factor and throughput alone and
batched; the last line is the throughput of the accelerator relative to the CPU measured in the
same run (batched).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _request(model_dir: Path, codes: int):
    from transformers import AutoTokenizer

    from omni_runtime.payload import parse

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    return parse({"v": 1, "speaker": "Ethan", "prompt_ids": ids, "response_ids": [72, 105, 33, 32, 111, 107],
                  "generation": {"max_codes": codes, "min_codes": codes, "seed": 7}, "format": "pcm"})


def synthesize_all(loop, engine, reqs) -> list:
    """Submit every request at once to the decode loop; their stats when all are done."""
    from omni_runtime.talker.batch import Synthesis, TextFeed

    results, left = [None] * len(reqs), threading.Semaphore(0)

    def done(i, result):
        results[i] = result
        left.release()

    for i, req in enumerate(reqs):
        loop.submit(Synthesis(req, TextFeed.of(engine, req, complete=True), lambda _pcm: None,
                              lambda r, i=i: done(i, r)))
    for _ in reqs:
        left.acquire()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def measure(model_dir: Path, device: str, requests: int, codes: int, batch: int) -> dict:
    import torch

    from omni_runtime.talker.batch import DecodeLoop
    from omni_runtime.talker.engine import TalkerEngine

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    engine = TalkerEngine(str(model_dir), device=device)
    load = time.monotonic() - t0
    req = _request(model_dir, codes)
    loop = DecodeLoop(engine)
    try:
        synthesize_all(loop, engine, [req])  # warm-up: kernels, allocator
        ttfa, rtf, samples = [], [], 0
        t_all = time.monotonic()
        for _ in range(requests):
            stats = synthesize_all(loop, engine, [req])[0]
            ttfa.append(stats.first_audio - stats.started)
            rtf.append((stats.finished - stats.started) / (stats.samples / engine.sample_rate))
            samples += stats.samples
        alone = samples / engine.sample_rate / (time.monotonic() - t_all)
        t_all = time.monotonic()
        batched = synthesize_all(loop, engine, [req] * batch)
        together = sum(s.samples for s in batched) / engine.sample_rate / (time.monotonic() - t_all)
    finally:
        loop.stop()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"device": device, "dtype": str(engine.dtype).removeprefix("torch."), "load_s": load,
            "ttfa_s": statistics.median(ttfa), "rtf": statistics.median(rtf),
            "audio_s_per_s": alone, "batched_audio_s_per_s": together, "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: build the tiny model)")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--codes", type=int, default=60, help="codes per request (12.5 per second of audio)")
    parser.add_argument("--batch", type=int, default=8, help="requests decoded together for the batched figure")
    args = parser.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from omni_runtime.tiny import build_tiny_model

            model_dir = build_tiny_model(Path(tmp) / "model")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        results = [measure(model_dir, d, args.requests, args.codes, args.batch) for d in devices]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no accelerator"
    print(f"talker, {args.requests} requests x {args.codes} codes, torch {torch.__version__}, {name}")
    print(f"{'device':6} {'dtype':9} {'load s':>7} {'peak MiB':>9} {'TTFA s':>7} {'RTF':>6} {'audio s/s':>9} "
          f"{'x' + str(args.batch) + ' audio s/s':>14}")
    for r in results:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{r['device']:6} {r['dtype']:9} {r['load_s']:7.2f} {peak:>9} {r['ttfa_s']:7.3f} {r['rtf']:6.3f} "
              f"{r['audio_s_per_s']:9.2f} {r['batched_audio_s_per_s']:14.2f}")
    base = results[0]["batched_audio_s_per_s"]
    best = results[-1]
    print(f"ratio {best['device']}/cpu audio throughput (x{args.batch} batched): "
          f"{best['batched_audio_s_per_s'] / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
