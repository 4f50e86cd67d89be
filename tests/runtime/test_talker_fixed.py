"""The talker's fixed-shape decode path (static KV slots, batch and length buckets, sampling
with tensors; replayed as CUDA graphs on a GPU) on the tiny model, on CPU: the same codes as
the eager path for the same seeds, whatever shares the batch and however slots move; the
bounds of a slot; no host round trip inside what a CUDA graph captures; code2wav batched."""

from __future__ import annotations

import collections
import time

import pytest
import torch  # the runtime extra; `make test` installs it
from torch.utils._python_dispatch import TorchDispatchMode

from omni_runtime.payload import PayloadError

from .talker_runs import Run, request

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def engine(tiny_model):
    from omni_runtime.talker.engine import TalkerEngine

    return TalkerEngine(str(tiny_model), device="cpu")


def loop_of(engine, **plan):
    from omni_runtime.talker.batch import DecodeLoop, DecodePlan

    return DecodeLoop(engine, text_wait=5.0, plan=DecodePlan(**plan))


SETTINGS = [dict(seed=1), dict(seed=2, top_p=0.7), dict(do_sample=False), dict(seed=3, temperature=1.3, top_k=5),
            dict(seed=4, repetition_penalty=1.3, top_k=0), dict(seed=5, min_codes=18, max_codes=18)]


def requests(tiny_model):
    # different lengths, so syntheses leave while others go on (the fixed path moves slots then)
    return [request(tiny_model, codes=14 + 4 * i, response=list(range(40, 48 + 3 * i)), **s)
            for i, s in enumerate(SETTINGS)]


def run_all(engine, reqs, streamed: int | None = None, **plan) -> list[tuple]:
    """Every request at once through one loop: (codes, pcm, result) per request; request
    `streamed` gets its text a token at a time."""
    loop = loop_of(engine, **plan)
    try:
        runs = [Run(loop, engine, req, streamed_from=1 if i == streamed else None) for i, req in enumerate(reqs)]
        if streamed is not None:
            for tok in reqs[streamed].response_ids[1:]:
                time.sleep(0.01)
                runs[streamed].feed.extend([tok])
            runs[streamed].feed.end()
        out = []
        for run in runs:
            result, pcm = run.wait()
            assert not isinstance(result, BaseException), result
            out.append((run.codes(), pcm, result))
        return out, loop
    finally:
        loop.stop()


def pcm_diff(a: bytes, b: bytes) -> int:
    """The largest difference between two PCM16 signals of the same length."""
    assert len(a) == len(b) > 0
    x, y = (torch.frombuffer(bytearray(p), dtype=torch.int16).int() for p in (a, b))
    return int((x - y).abs().max())


def test_the_fixed_shape_path_gives_the_eager_codes(tiny_model, engine):
    reqs = requests(tiny_model)
    eager, _ = run_all(engine, reqs, mode="eager")
    # fewer slots than requests: the others wait, then take the slots of those that left
    for plan in (dict(mode="graphs"), dict(mode="fixed", slots=4), dict(mode="fixed", slots=1)):
        fixed, loop = run_all(engine, reqs, streamed=2, **plan)
        for i, ((codes, pcm, stats), (ref_codes, ref_pcm, ref_stats)) in enumerate(zip(fixed, eager)):
            assert torch.equal(codes, ref_codes), f"request {i} ({SETTINGS[i]}) with {plan}"
            # code2wav batches differ between the runs: float rounding, never more than one PCM16 step
            assert stats.samples == ref_stats.samples and pcm_diff(pcm, ref_pcm) <= 1
    # min_codes = max_codes: each runs to its max_codes (the last code is the end, not a frame)
    assert [len(c) for c, _, _ in eager] == [13, 17, 21, 25, 29, 17]
    assert loop.stepper.moves == 0, "one slot: nothing to move"


def test_slots_stay_dense_as_syntheses_leave(tiny_model, engine):
    from omni_runtime.talker.batch import DecodeLoop, DecodePlan

    loop = DecodeLoop(engine, plan=DecodePlan(mode="fixed", slots=8))
    seen = []
    step = loop.stepper.step

    def watched(rows, text):
        seen.append([s.slot for s in loop.stepper.table.holders])
        return step(rows, text)

    loop.stepper.step = watched
    try:
        runs = [Run(loop, engine, r) for r in requests(tiny_model)]
        for run in runs:
            assert not isinstance(run.wait()[0], BaseException)
    finally:
        loop.stop()
    assert loop.stepper.moves >= 1, "the first to finish held slot 0 while others went on"
    assert all(slots == list(range(len(slots))) for slots in seen), "the holder of slot i knows it; slots are 0..n-1"
    assert max(len(s) for s in seen) == len(SETTINGS) and loop.stepper.table.used == 0


def test_a_synthesis_ends_when_its_slot_is_full(tiny_model, engine):
    req = request(tiny_model, codes=100)
    prompt = engine.prefill_inputs(req, req.response_ids[:1])["inputs_embeds"].shape[1]
    # the prefill's frame, then one per step until every position is taken: it ends with what fit
    (codes, _, stats), = run_all(engine, [req], mode="fixed", max_tokens=prompt + 11)[0]
    assert len(codes) == 12 and stats.codes == 12
    assert torch.equal(codes, run_all(engine, [req], mode="eager")[0][0][0][:12]), "the same codes as far as they go"

    loop = loop_of(engine, mode="fixed", max_tokens=prompt)
    try:
        result, pcm = Run(loop, engine, request(tiny_model)).wait()
    finally:
        loop.stop()
    assert isinstance(result, PayloadError) and "OMNI_TALKER_MAX_TOKENS" in str(result) and not pcm


# Ops that make the host wait for the device or copy host data in: none may run inside a
# captured CUDA graph (capture fails, or replays stale values).
HOST_ROUND_TRIPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.is_nonzero", "aten.equal",
                    "aten.lift_fresh", "aten._unique2", "aten.unique_consecutive", "aten.masked_select",
                    "aten.repeat_interleave", "aten.allclose", "aten.tolist"}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_what_a_cuda_graph_captures_never_waits_for_the_host(engine, monkeypatch):
    import transformers.utils.import_utils as hf_imports

    from omni_runtime.talker.fixed import FixedStepper

    # transformers skips its data-dependent shortcuts (e.g. "is this a packed sequence?") while
    # a CUDA stream captures; take the branches a capture takes
    monkeypatch.setattr(hf_imports, "is_cuda_stream_capturing", lambda: True)
    stepper = FixedStepper(engine, slots=4, max_tokens=256, graphs=False)
    codes = torch.zeros((2, engine.code_groups, 8), dtype=torch.long)  # a (rows, frames) bucket of code2wav
    recorded = {}
    with torch.inference_mode():
        stepper._neutral()
        for name, fn in (("talker step", lambda: stepper._talker_step(4, 128)), ("frame", lambda: stepper._frame(4)),
                         ("code2wav", lambda: engine.code2wav(codes))):
            with OpRecorder() as rec:
                fn()
            recorded[name] = set(rec.ops)
    for name, ops in recorded.items():
        assert ops and not ops & HOST_ROUND_TRIPS, (name, ops & HOST_ROUND_TRIPS)
    assert "aten.scaled_dot_product_attention" in recorded["talker step"]
    assert "aten.searchsorted" in recorded["frame"], "sampling happens inside the frame"


def test_padded_code2wav_batches_give_the_audio_of_each_chunk_alone(engine):
    from omni_runtime.talker.code2wav import Code2WavBatches

    g = torch.Generator().manual_seed(0)
    streams = [list(torch.randint(0, 128, (n, engine.code_groups), generator=g)) for n in (4, 29, 50, 75, 70)]
    # first chunk (no context), second (4 codes of context), steady (25 + 25), a final short one
    spans = [(streams[0], 0, 4), (streams[1], 4, 29), (streams[2], 25, 50), (streams[3], 50, 75), (streams[4], 50, 70)]
    exact = Code2WavBatches(engine, buckets=False, graphs=False)
    padded = Code2WavBatches(engine, buckets=True, graphs=False)
    with torch.inference_mode():
        alone = [exact.pcm([span])[0] for span in spans]
        together = padded.pcm(spans)
    assert [len(p) for p in together] == [len(p) for p in alone]
    assert len(alone[0]) == 2 * engine.sample_count(4) and len(alone[2]) == 2 * (engine.sample_count(50) - 25 * engine.upsample)
    for a, b in zip(alone, together):
        assert pcm_diff(a, b) <= 1, "padding changes float rounding only (at most one PCM16 step)"


def test_sample_count_is_what_code2wav_gives(engine):
    with torch.inference_mode():
        for frames in (1, 4, 29, 50):
            wav = engine.code2wav(torch.zeros((1, engine.code_groups, frames), dtype=torch.long))
            assert wav.shape[-1] == engine.sample_count(frames)


def test_the_vocoder_sends_first_chunks_ahead_and_keeps_each_synthesis_in_order(tiny_model, engine):
    """One vocoder pass with a long chunk of A queued first, then B's first chunk, then A's next
    (shorter) chunk: B's audio goes out before A's, A's chunks go out in their order, each
    synthesis ends after its audio."""
    from omni_runtime.talker.batch import Synthesis, TextFeed
    from omni_runtime.talker.code2wav import Code2WavBatches
    from omni_runtime.talker.vocoder import Vocoder

    events = []

    def synthesis(name):
        req = request(tiny_model)
        s = Synthesis(req, TextFeed.of(engine, req, complete=True), lambda pcm: events.append((name, pcm)),
                      lambda result: events.append((name, "done")))
        g = torch.Generator().manual_seed(len(name))
        s.codes = list(torch.randint(0, 128, (80, engine.code_groups), generator=g))
        return s

    a, b = synthesis("a"), synthesis("bb")
    vocoder = Vocoder(engine)
    try:
        with vocoder.cond:  # everything below is one pass
            vocoder.decode(a, 25, 75)   # 50 frames with its context
            vocoder.decode(b, 0, 4)     # 4 frames: decoded first
            vocoder.decode(a, 75, 79)   # 29 frames: decoded before a's first one, sent after it
            vocoder.finish(a, "a ended")
            vocoder.finish(b, "b ended")
        deadline = time.monotonic() + 60
        while len(events) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        vocoder.stop()
    exact = Code2WavBatches(engine, buckets=False, graphs=False)
    with torch.inference_mode():
        want = {"b": exact.pcm([(b.codes, 0, 4)])[0], "a1": exact.pcm([(a.codes, 25, 75)])[0],
                "a2": exact.pcm([(a.codes, 75, 79)])[0]}
    # b is over after the first (shortest) call, before a's long chunk is decoded
    assert [name for name, _ in events] == ["bb", "bb", "a", "a", "a"]
    assert pcm_diff(events[0][1], want["b"]) <= 1 and events[1][1] == "done"
    assert pcm_diff(events[2][1], want["a1"]) <= 1 and pcm_diff(events[3][1], want["a2"]) <= 1, "a in its order"
    assert events[4][1] == "done"
