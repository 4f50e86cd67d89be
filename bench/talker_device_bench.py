"""Talker speed on one device: the eager path and the fixed-shape path (CUDA graphs on a GPU) of
the pod's decode loop, in the same run on the same weights.

    python -m bench.talker_device_bench --scale full --out DIR          # on a GPU
    python -m bench.talker_device_bench --scale tiny --device cpu --out DIR
    python -m bench.talker_device_bench --scale full --dry-run           # dimensions only, any machine

--scale full builds the real checkpoint's talker (20 MoE layers of 128 experts), code predictor
(5 layers, 16 code groups) and code2wav with the dimensions of Qwen3-Omni-30B-A3B's config.json
(bench.model_memory_bench.FULL_SIZE) and random bf16 weights, on the device: nothing is
downloaded or installed, and speed does not depend on the weights' values. --scale tiny builds
the tiny test model (a rehearsal: its figures say nothing about a GPU). --dry-run builds the
modules on PyTorch's meta device (no memory) and prints their sizes, the KV cache per token and
the bytes one step reads.

For each path and each concurrency N, N clients each keep one synthesis in flight through the
decode loop (continuous batching, chunked code2wav on its own thread, as served) for --rounds
requests; request lengths spread +-50% around --codes so the clients fall out of step. Printed,
and written to OUT/talker_device_bench.json: seconds of audio per second, per-stream real-time
factor (p50, p90), time to first audio at the talker (p50, p99; every request, the first wave's
burst of prefills included), the median decode step beside the memory-bandwidth floor of one
step (bytes of weights and KV read / the GPU's bandwidth), the share of the time code2wav kept
the vocoder thread busy, peak memory, graph capture time.

Goals on one H100/H200 at full scale: the fixed-shape path >= 3x the eager path's throughput at
64 concurrent; per-stream RTF <= 0.3 and first audio <= 300 ms p99 at 64. The last line holds
the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _package_dir in ("runtime", "operator", ""):  # a checkout without the project installed
    if str(ROOT / _package_dir) not in sys.path:
        sys.path.append(str(ROOT / _package_dir))

GIB = 2 ** 30
# Peak memory bandwidth (bytes/s) by the name torch.cuda.get_device_name() reports (vendor sheets).
BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
             ("A100-SXM4-80GB", 2.04e12), ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12), ("L40S", 0.864e12)]
GOAL_SPEEDUP, GOAL_RTF, GOAL_TTFA_MS = 3.0, 0.3, 300.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- the model ---------------------------------------------------------------------------
def build_engine(scale: str, device: str, model: Path | None = None):
    """The talker of a checkpoint directory, or random weights at the real or the tiny dimensions."""
    from omni_runtime.talker.engine import TalkerEngine
    from omni_runtime.tiny import build_config

    if model is not None:
        return TalkerEngine(str(model), device=device)
    if scale == "full":
        from bench.model_memory_bench import FULL_SIZE

        return TalkerEngine.random(build_config(FULL_SIZE), device=device, dtype="bfloat16")
    return TalkerEngine.random(build_config(), device=device)


def describe(engine) -> dict:
    """Parameter counts and bytes of the parts a step reads."""
    talker = engine.talker
    text = engine.tc.text_config
    experts = sum(p.numel() for n, p in talker.model.named_parameters() if ".mlp.experts." in n)
    total = sum(p.numel() for p in talker.parameters())
    predictor = sum(p.numel() for p in talker.code_predictor.parameters())
    code2wav = sum(p.numel() for p in engine.code2wav.parameters())
    active = total - predictor - experts + experts * text.num_experts_per_tok / text.num_experts
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * talker.model.layers[0].self_attn.head_dim \
        * engine.thinker_embed.element_size()
    return {"talker_params": total - predictor, "talker_active_params": int(active), "experts": text.num_experts,
            "experts_per_token": text.num_experts_per_tok, "layers": text.num_hidden_layers,
            "code_predictor_params": predictor, "code2wav_params": code2wav, "code_groups": engine.code_groups,
            "kv_bytes_per_token": kv_per_token, "dtype": str(engine.dtype).removeprefix("torch.")}


def step_bytes(engine, rows: int, context: int) -> int:
    """Bytes one decode step for `rows` syntheses reads at least: every talker weight but the
    experts, the experts the rows route to (expected distinct: E(1-(1-k/E)^rows) per layer),
    the codec head, the code predictor once per residual group with that group's head, and
    each row's KV cache of `context` positions. code2wav runs apart and is not counted."""
    talker = engine.talker
    text = engine.tc.text_config
    size = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    experts = size(p for n, p in talker.model.named_parameters() if ".mlp.experts." in n)
    embeddings = size(talker.model.codec_embedding.parameters())
    dense = size(talker.model.parameters()) - experts - embeddings
    touched = text.num_experts * (1 - (1 - text.num_experts_per_tok / text.num_experts) ** rows)
    talker_bytes = dense + experts * touched / text.num_experts + size(talker.codec_head.parameters())
    cp = talker.code_predictor
    body = size(cp.model.parameters()) - size(cp.model.codec_embedding.parameters())
    heads = size(cp.lm_head.parameters())
    predictor_bytes = body * (engine.code_groups - 1) + heads
    return int(talker_bytes + predictor_bytes + rows * context * describe(engine)["kv_bytes_per_token"])


def bandwidth(torch, device: str, override: float | None) -> float | None:
    if override:
        return override * 1e9
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in BANDWIDTH if key in name), None)


# -- the load ------------------------------------------------------------------------------
def prompt_ids(tokens: int) -> list[int]:
    """A chat prompt whose user turn has `tokens` byte tokens, ending with the assistant's turn."""
    from omni_runtime.tiny import token_ids

    ids = token_ids()
    text = [40 + i % 80 for i in range(tokens)]
    return [ids["<|im_start|>"], ids["user"], 10] + text + [ids["<|im_end|>"], 10, ids["<|im_start|>"],
                                                             ids["assistant"], 10]


def requests_for(prompt: list[int], codes: int, count: int, seed: int) -> list:
    import random

    from omni_runtime.payload import parse

    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = max(4, round(codes * rng.uniform(0.5, 1.5)))
        out.append(parse({"v": 1, "speaker": "Ethan", "prompt_ids": prompt, "response_ids": list(range(40, 100)),
                          "generation": {"max_codes": n, "min_codes": n, "seed": seed + i}, "format": "pcm"}))
    return out


def run_clients(loop, engine, clients: int, reqs: list, made: list | None = None) -> list:
    """`clients` syntheses in flight until `reqs` are all done; each one's stats. `made` (a list)
    receives each request's Synthesis, in request order."""
    from omni_runtime.talker.batch import Synthesis, TextFeed

    done: queue.Queue = queue.Queue()
    todo = [Synthesis(r, TextFeed.of(engine, r, complete=True), lambda _pcm: None, done.put) for r in reqs]
    if made is not None:
        made.extend(todo)
    results = []

    def submit():
        loop.submit(todo.pop(0))

    for _ in range(min(clients, len(todo))):
        submit()
    while len(results) < len(reqs):
        result = done.get(timeout=1800)
        if isinstance(result, BaseException):
            raise result
        results.append(result)
        if todo:
            submit()
    return results


def same_codes(engine, modes: list[str], prompt: list[int], codes: int = 40) -> dict:
    """The same eight requests (four greedy, four seeded sampling) four at a time on each path:
    frames whose codes equal the first path's. Greedy codes identical is the goal on a GPU too
    (bf16: sampled codes may part where a draw lands within rounding of a boundary)."""
    from omni_runtime.payload import parse
    from omni_runtime.talker.batch import DecodeLoop, DecodePlan

    reqs = [parse({"v": 1, "speaker": "Ethan", "prompt_ids": prompt, "response_ids": list(range(40 + i, 90 + i)),
                   "generation": {"max_codes": codes, "min_codes": codes, "seed": i, "do_sample": i >= 4},
                   "format": "pcm"}) for i in range(8)]
    got = {}
    for mode in modes:
        loop = DecodeLoop(engine, plan=DecodePlan(mode=mode, slots=4, max_tokens=len(prompt) + codes + 32))
        try:
            syntheses: list = []
            run_clients(loop, engine, 4, reqs, syntheses)
            got[mode] = [[c.tolist() for c in s.codes] for s in syntheses]
        finally:
            loop.stop()
    ref, out = got[modes[0]], {}
    for mode in modes[1:]:
        pairs = [(a == b) for x, y in zip(ref, got[mode]) for a, b in zip(x, y)]
        greedy = [(a == b) for x, y in zip(ref[:4], got[mode][:4]) for a, b in zip(x, y)]
        out[mode] = {"frames": len(pairs), "equal": sum(pairs), "greedy_frames": len(greedy),
                     "greedy_equal": sum(greedy), "greedy_identical": all(greedy) and len(greedy) == 4 * (codes - 1)}
    return out


def figures(stats: list, rate: int) -> dict:
    wall = max(s.finished for s in stats) - min(s.started for s in stats)
    audio = sum(s.samples for s in stats) / rate
    rtf = [(s.finished - s.started) / (s.samples / rate) for s in stats]
    ttfa = [s.first_audio - s.started for s in stats]
    return {"requests": len(stats), "wall_s": wall, "audio_s": audio, "audio_s_per_s": audio / wall,
            "rtf_p50": pct(rtf, 0.5), "rtf_p90": pct(rtf, 0.9),
            "ttfa_p50_ms": 1000 * pct(ttfa, 0.5), "ttfa_p99_ms": 1000 * pct(ttfa, 0.99)}


def measure(engine, mode: str, args, prompt: list[int]) -> dict:
    import torch

    from omni_runtime.talker.batch import DecodeLoop, DecodePlan

    cuda = engine.device.type == "cuda"
    slots = max(args.concurrency)
    max_tokens = len(prompt) + 16 + int(args.codes * 1.5) + 8
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loop = DecodeLoop(engine, plan=DecodePlan(mode=mode, slots=slots, max_tokens=max_tokens))
    steps: list[tuple[int, float]] = []
    step = loop.stepper.step

    def timed(rows, text):
        t0 = time.perf_counter()
        out = step(rows, text)  # returns after reading the codes back: the step is complete
        steps.append((len(rows), time.perf_counter() - t0))
        return out

    loop.stepper.step = timed
    vocoder_busy = [0.0]
    calls = loop.vocoder.batches.calls

    def timed_calls(spans):  # each call ends reading its PCM back: the time is the device's too
        it = calls(spans)
        while True:
            t0 = time.perf_counter()
            try:
                done = next(it)
            except StopIteration:
                return
            finally:
                vocoder_busy[0] += time.perf_counter() - t0
            yield done

    loop.vocoder.batches.calls = timed_calls
    try:
        t0 = time.monotonic()
        loop.warm()
        capture = time.monotonic() - t0
        step_graphs = getattr(loop.stepper, "graphs", None)  # the eager path has none
        graphs = (len(step_graphs.graphs) if step_graphs else 0) + len(loop.vocoder.batches.graphs.graphs)
        run_clients(loop, engine, 2, requests_for(prompt, 8, 2, seed=999))  # kernels, allocator
        out = {"mode": mode, "capture_s": capture, "graphs": graphs, "slots": slots, "max_tokens": max_tokens, "by_concurrency": {}}
        for n in args.concurrency:
            steps.clear()
            vocoder_busy[0] = 0.0
            stats = run_clients(loop, engine, n, requests_for(prompt, args.codes, n * args.rounds, seed=1000 * n))
            row = figures(stats, engine.sample_rate)
            row["code2wav_busy"] = vocoder_busy[0] / row["wall_s"]  # 1: the vocoder thread never idled
            row["step_ms_p50"] = 1000 * statistics.median(t for _, t in steps)
            row["step_rows_p50"] = statistics.median(r for r, _ in steps)
            out["by_concurrency"][n] = row
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if cuda else None
        return out
    finally:
        loop.stop()


# -- report --------------------------------------------------------------------------------
def report(result: dict) -> list[str]:
    lines = [f"# talker, {result['scale']} scale, {result['device_name']}, torch {result['torch']}, "
             f"transformers {result['transformers']}, {result['model']['dtype']}; {result['codes']} codes +-50% per "
             f"request, {result['rounds']} per client, prompt {result['prompt_tokens']} tokens",
             f"# command: {result['command']}"]
    m = result["model"]
    lines.append(f"talker {m['talker_params'] / 1e6:.1f} M params ({m['talker_active_params'] / 1e6:.1f} M active per "
                 f"token), code predictor {m['code_predictor_params'] / 1e6:.1f} M, code2wav "
                 f"{m['code2wav_params'] / 1e6:.1f} M; KV {m['kv_bytes_per_token'] / 1024:.2f} KiB per token; "
                 "graphs: fixed shapes, replayed as CUDA graphs on a GPU only")
    lines.append(f"{'path':7} {'N':>3} {'audio s/s':>9} {'RTF p50':>8} {'RTF p90':>8} {'TTFA p50':>9} {'TTFA p99':>9} "
                 f"{'step ms':>8} {'floor ms':>9} {'rows':>5} {'c2w busy':>8}")
    for mode in result["modes"].values():
        for n, row in mode["by_concurrency"].items():
            floor = result["floor_ms"].get(str(n))
            floor_text = "-" if floor is None else f"{floor:.2f}"
            lines.append(f"{mode['mode']:7} {n:>3} {row['audio_s_per_s']:9.2f} {row['rtf_p50']:8.3f} "
                         f"{row['rtf_p90']:8.3f} {row['ttfa_p50_ms']:7.0f}ms {row['ttfa_p99_ms']:7.0f}ms "
                         f"{row['step_ms_p50']:8.2f} {floor_text:>9} {row['step_rows_p50']:5.0f} "
                         f"{row['code2wav_busy']:8.2f}")
        peak = f"{mode['peak_gib']:.1f} GiB" if mode["peak_gib"] is not None else "-"
        lines.append(f"{mode['mode']:7} peak memory {peak}, {mode['graphs']} CUDA graphs captured in "
                     f"{mode['capture_s']:.1f} s "
                     f"({mode['slots']} slots x {mode['max_tokens']} positions)")
    for mode, same in result["same_codes"].items():
        lines.append(f"same codes as {next(iter(result['modes']))}: {mode} greedy {same['greedy_equal']}/"
                     f"{same['greedy_frames']} frames, all {same['equal']}/{same['frames']} (seeded sampling included)")
    r = result["ratios"]
    lines.append(f"ratios at {r['concurrency']} concurrent: {r['fast']}/eager audio throughput {r['speedup']:.2f} "
                 f"(goal >= {GOAL_SPEEDUP:g}); {r['fast']} per-stream RTF p50 {r['rtf']:.3f} (goal <= {GOAL_RTF:g}); "
                 f"{r['fast']} first audio p99 {r['ttfa_p99_ms']:.0f} ms (goal <= {GOAL_TTFA_MS:g})")
    return lines


def ratios(modes: dict) -> dict:
    fast = "graphs" if "graphs" in modes else next(m for m in modes if m != "eager")
    n = max(modes[fast]["by_concurrency"])
    row = modes[fast]["by_concurrency"][n]
    eager = modes.get("eager", {}).get("by_concurrency", {}).get(n)
    return {"concurrency": n, "fast": fast, "speedup": row["audio_s_per_s"] / eager["audio_s_per_s"] if eager else 0.0,
            "rtf": row["rtf_p50"], "ttfa_p99_ms": row["ttfa_p99_ms"]}


def dry_run(args) -> int:
    """The full-size modules on the meta device: sizes, KV per token, bytes per step."""
    engine = build_engine(args.scale, "meta")
    m = describe(engine)
    context = args.prompt_tokens + 16 + args.codes // 2
    print(f"# talker at {args.scale} scale on the meta device (no weights allocated)")
    print(json.dumps(m, indent=1))
    for n in args.concurrency:
        b = step_bytes(engine, n, context)
        print(f"N={n:3}: one step reads {b / 1e9:.2f} GB: floor {b / 3.35e12 * 1e3:.2f} ms on an H100 SXM "
              f"(3.35 TB/s), {b / 4.8e12 * 1e3:.2f} ms on an H200 (4.8 TB/s)")
    print(f"dry run: {m['talker_params'] / 1e9:.2f} B talker params, {m['kv_bytes_per_token'] / 1024:.1f} KiB KV "
          f"per token, {m['layers']} layers x {m['experts']} experts")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--model", type=Path, help="a checkpoint directory instead of random weights")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--out", type=Path, help="directory for talker_device_bench.json")
    ap.add_argument("--modes", nargs="+", default=["eager", "graphs"], choices=("eager", "fixed", "graphs"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--codes", type=int, default=100, help="codes per request, +-50%% (12.5 per second of audio)")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--prompt-tokens", type=int, default=120)
    ap.add_argument("--bandwidth-gbs", type=float, help="GPU memory bandwidth in GB/s (default: by device name)")
    ap.add_argument("--dry-run", action="store_true", help="build on the meta device and print dimensions only")
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if args.out is None:
        ap.error("--out is required (where the JSON goes)")

    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.monotonic()
    engine = build_engine(args.scale, device, args.model)
    built = time.monotonic() - t0
    prompt = prompt_ids(args.prompt_tokens)
    bw = bandwidth(torch, device, args.bandwidth_gbs)
    context = len(prompt) + 16 + args.codes // 2
    result = {
        "command": " ".join(["python -m bench.talker_device_bench"] + (argv if argv is not None else sys.argv[1:])),
        "scale": args.scale, "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)",
        "codes": args.codes, "rounds": args.rounds, "prompt_tokens": len(prompt), "build_s": built,
        "model": describe(engine), "bandwidth_bytes_per_s": bw,
        "weights_gib": torch.cuda.memory_allocated() / GIB if device.startswith("cuda") else None,
        "step_bytes": {str(n): step_bytes(engine, n, context) for n in args.concurrency},
    }
    result["floor_ms"] = {n: b / bw * 1e3 for n, b in result["step_bytes"].items()} if bw else {}
    result["same_codes"] = same_codes(engine, args.modes, prompt) if len(args.modes) > 1 else {}
    result["modes"] = {mode: measure(engine, mode, args, prompt) for mode in args.modes}
    result["ratios"] = ratios(result["modes"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "talker_device_bench.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n".join(report(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
