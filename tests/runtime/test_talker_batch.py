"""The talker's decode loop on the tiny model, in process, on the fixed-shape and the eager
path: equal to transformers' own `talker.generate`, the same audio streamed or whole, batched or
alone, and the ways a synthesis ends early."""

from __future__ import annotations

import copy
import functools
import time

import pytest
import torch  # the runtime extra; `make test` installs it

from .talker_runs import Run, request

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def engine(tiny_model):
    from omni_runtime.talker.engine import TalkerEngine

    return TalkerEngine(str(tiny_model), device="cpu")


@pytest.fixture(params=["graphs", "eager"])
def loop(engine, request):
    """The decode loop on each path: fixed shapes ("graphs": no graphs on CPU, the same code) and eager."""
    from omni_runtime.talker.batch import DecodeLoop, DecodePlan

    batches = []
    lp = DecodeLoop(engine, text_wait=0.5, on_step=lambda n, stalled: batches.append((n, stalled)),
                    plan=DecodePlan(mode=request.param))
    lp.batches = batches
    yield lp
    lp.stop()


def transformers_codes(engine, req):
    """transformers' `talker.generate` on the same inputs (greedy), with every frame's code
    groups taken from its `residual_codes`."""
    g = req.generation
    kwargs = engine.build_inputs(req)
    frames = []
    talker = copy.copy(engine.talker)  # shares the weights; the tap below stays on the copy
    forward = type(talker).forward.__get__(talker)

    @functools.wraps(forward)
    def tapped(*args, **kw):
        if kw.get("residual_codes") is not None:
            frames.append(kw["residual_codes"][0])
        return forward(*args, **kw)

    talker.forward = tapped
    with torch.inference_mode():
        talker.generate(**kwargs, max_new_tokens=g["max_codes"], min_new_tokens=g.get("min_codes", 0),
                        do_sample=False, repetition_penalty=g.get("repetition_penalty", 1.05),
                        eos_token_id=engine.codec_eos, suppress_tokens=engine.suppress,
                        output_hidden_states=True, return_dict_in_generate=True)
    return torch.stack(frames)


def test_greedy_decoding_equals_transformers_generate(tiny_model, engine, loop):
    req = request(tiny_model, codes=30, do_sample=False)
    run = Run(loop, engine, req)
    stats, pcm = run.wait()
    reference = transformers_codes(engine, req)
    assert torch.equal(run.codes(), reference), "the decode loop must reproduce talker.generate code for code"
    assert stats.codes == reference.shape[0] and len(pcm) == 2 * stats.samples > 0


def test_streamed_text_gives_the_same_audio_as_the_whole_answer(tiny_model, engine, loop):
    req = request(tiny_model, codes=40, seed=11, response=list(range(40, 70)))
    whole = Run(loop, engine, req)
    whole_stats, whole_pcm = whole.wait()

    loop.batches.clear()
    streamed = Run(loop, engine, req, streamed_from=1)
    # the thinker is behind: the synthesis runs out of text and waits for it
    deadline = time.monotonic() + 30
    while not any(stalled for _, stalled in loop.batches) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(stalled for _, stalled in loop.batches), "the streamed synthesis must have waited for text"
    for tok in req.response_ids[1:]:
        time.sleep(0.02)
        streamed.feed.extend([tok])
    streamed.feed.end()
    stats, pcm = streamed.wait()
    assert torch.equal(streamed.codes(), whole.codes())
    assert pcm == whole_pcm and stats.samples == whole_stats.samples


def test_batched_syntheses_equal_their_solo_runs(tiny_model, engine, loop):
    settings = [dict(seed=1), dict(seed=2, top_p=0.7), dict(do_sample=False), dict(seed=3, temperature=1.3, top_k=5)]
    reqs = [request(tiny_model, codes=20 + 3 * i, response=list(range(40, 50 + 2 * i)), **s)
            for i, s in enumerate(settings)]
    solo = []
    for req in reqs:
        run = Run(loop, engine, req)
        solo.append((run.wait(), run.codes()))
    loop.batches.clear()
    together = [Run(loop, engine, req) for req in reqs]
    for run, ((stats, pcm), codes) in zip(together, solo):
        got_stats, got_pcm = run.wait()
        assert torch.equal(run.codes(), codes)
        assert got_stats.samples == stats.samples
    assert max(n for n, _ in loop.batches) >= 3, "the syntheses must have been stepped together"


def test_a_synthesis_waiting_for_text_does_not_hold_the_others(tiny_model, engine, loop):
    loop.text_wait = 30.0  # the fixture's 0.5 s could run out on a busy machine before `fast` is done
    slow = Run(loop, engine, request(tiny_model, codes=30, response=list(range(40, 60))), streamed_from=2)
    fast = Run(loop, engine, request(tiny_model, codes=10, seed=5))
    stats, pcm = fast.wait(timeout=30)
    assert not isinstance(stats, Exception) and pcm
    assert slow.result is None, "the slow synthesis is still waiting for its text"
    slow.feed.extend(list(range(42, 60)))
    slow.feed.end()
    stats, _ = slow.wait()
    assert not isinstance(stats, Exception) and stats.codes > 0


def test_ends_early_text_timeout_abandon_cancel(tiny_model, engine, loop):
    from omni_runtime.talker.batch import Cancelled, TextAbandoned, TextTimeout

    stalled = Run(loop, engine, request(tiny_model, codes=30), streamed_from=1)
    result, _ = stalled.wait(timeout=30)
    assert isinstance(result, TextTimeout)

    abandoned = Run(loop, engine, request(tiny_model, codes=30), streamed_from=1)
    abandoned.feed.abandon("the thinker stream broke")
    result, _ = abandoned.wait(timeout=30)
    assert isinstance(result, TextAbandoned) and "thinker stream broke" in str(result)

    cancelled = Run(loop, engine, request(tiny_model, codes=4000, min_codes=4000))
    time.sleep(0.3)
    cancelled.synthesis.cancel.set()
    result, _ = cancelled.wait(timeout=30)
    assert isinstance(result, Cancelled)

    bad = Run(loop, engine, request(tiny_model, codes=30), streamed_from=1)
    bad.feed.extend([10 ** 7])
    result, _ = bad.wait(timeout=30)
    assert isinstance(result, TextAbandoned) and "out of range" in str(result)


def test_the_text_ends_at_the_thinkers_end_of_turn(tiny_model, engine):
    from omni_runtime.talker.batch import TextFeed

    im_end = next(iter(engine.thinker_eos))
    req = request(tiny_model, response=[40, 41])
    feed = TextFeed.of(engine, req, complete=False)
    assert feed.at(1) == (True, 41, False) and feed.at(2) == (False, None, False)
    feed.extend([42, im_end, 43])
    assert feed.at(2) == (True, 42, False)
    assert feed.at(3) == (True, None, True), "tts_eos right after the last spoken token"
    assert feed.at(4) == (True, None, False), "then tts_pad"
