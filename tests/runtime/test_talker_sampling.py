"""Batched sampling with per-row settings: the same arithmetic as transformers' logits
processors, draws confined to what top-k/top-p allow, and per-request random streams."""

from __future__ import annotations

import pytest
import torch  # the runtime extra; `make test` installs it

from omni_runtime.payload import PayloadError
from omni_runtime.talker.sampling import Sampling, choose, process_first

pytestmark = pytest.mark.runtime

V = 64
EOS = 60


def logits(rows=3, seed=0):
    return torch.randn((rows, V), generator=torch.Generator().manual_seed(seed)) * 3


def test_history_processors_equal_transformers():
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    scores = logits()
    rows = [Sampling(repetition_penalty=1.3, min_codes=5), Sampling(repetition_penalty=1.0),
            Sampling(repetition_penalty=0.8, min_codes=2)]
    histories = [[1, 2, 2, 7], [3], [4, 5]]
    suppress = [61, 62, 63]
    seen = torch.zeros((3, V), dtype=torch.bool)
    for i, h in enumerate(histories):
        seen[i, h] = True
    mine = process_first(torch, scores, rows, seen, [len(h) for h in histories], EOS, torch.tensor(suppress))
    for i, (row, h) in enumerate(zip(rows, histories)):
        ref = scores[i:i + 1]
        ids = torch.tensor([h])
        if row.repetition_penalty != 1.0:
            ref = RepetitionPenaltyLogitsProcessor(row.repetition_penalty)(ids, ref)
        if row.min_codes:
            ref = MinNewTokensLengthLogitsProcessor(0, row.min_codes, EOS)(ids, ref)
        ref = SuppressTokensLogitsProcessor(suppress)(ids, ref)
        assert torch.equal(mine[i:i + 1], ref), i
    assert mine[0, EOS] == -float("inf") and mine[1, EOS] != -float("inf") and mine[2, EOS] != -float("inf")


def test_draws_stay_inside_top_k_and_top_p_and_greedy_rows_take_the_argmax():
    import random

    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = logits()
    # Row 0's top three codes are close, so 300 seeded draws reach each of them: random
    # logits could leave one at a fraction of a percent and the assertion down to chance.
    scores[0, [23, 45, 59]] = scores[0].max() + torch.tensor([1.0, 1.5, 2.0])
    rows = [Sampling(top_k=3, temperature=1.0, rng=random.Random(3)),
            Sampling(top_k=0, top_p=0.5, temperature=0.7, rng=random.Random(4)), Sampling(do_sample=False)]
    allowed = [
        set(torch.nonzero(TopKLogitsWarper(3)(None, scores[0:1])[0] > -float("inf")).view(-1).tolist()),
        set(torch.nonzero(TopPLogitsWarper(0.5)(None, scores[1:2] / 0.7)[0] > -float("inf")).view(-1).tolist()),
    ]
    drawn = [set(), set()]
    for _ in range(300):
        picked = choose(torch, scores, rows).tolist()
        drawn[0].add(picked[0])
        drawn[1].add(picked[1])
        assert picked[2] == int(scores[2].argmax())
    assert allowed[0] == {23, 45, 59}
    assert drawn[0] == allowed[0], "every top-3 code is drawn, nothing else"
    assert drawn[1] <= allowed[1] and len(drawn[1]) >= 1


def test_a_seed_fixes_the_draws_whatever_else_is_in_the_batch():
    scores = logits(rows=4, seed=1)
    alone = Sampling.of({"seed": 42})
    together = [Sampling.of({"seed": 42}), Sampling.of({"seed": 1}), Sampling.of({}), Sampling.of({"do_sample": False})]
    first = [int(choose(torch, scores[0:1], [alone])[0]) for _ in range(50)]
    batched = [int(choose(torch, scores, together)[0]) for _ in range(50)]
    assert first == batched
    assert len(set(first)) > 1, "the stream advances between draws"


@pytest.mark.parametrize("gen, needle", [
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_codes": 0}, "max_codes"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"top_k": -2}, "top_k"),
])
def test_bad_settings_are_payload_errors(gen, needle):
    with pytest.raises(PayloadError, match=needle):
        Sampling.of(gen)


def test_fixed_shape_sampling_draws_what_choose_draws():
    """The tensor form the CUDA graphs run (every row warped, settings as tensors, draws taken
    up front) picks the same codes as `process_first` + `choose`, row by row."""
    import random

    from omni_runtime.talker.sampling import RESIDUAL_TOP_P, draw_first, draw_residual, first_scores, uniforms

    settings = [dict(), dict(top_k=3), dict(top_k=0, top_p=0.5, temperature=0.7), dict(do_sample=False),
                dict(repetition_penalty=1.4, min_codes=3, top_p=0.9), dict(temperature=1.7, top_k=200)]
    suppress = torch.tensor([61, 62, 63])
    suppressed = torch.zeros(V, dtype=torch.bool)
    suppressed[suppress] = True
    same = 0
    for trial in range(40):
        scores = logits(rows=len(settings), seed=trial)
        seen = torch.rand((len(settings), V), generator=torch.Generator().manual_seed(trial)) < 0.2
        generated = [trial % 5] * len(settings)
        eager = [Sampling(**s, rng=random.Random(trial * 10 + i)) for i, s in enumerate(settings)]
        fixed = [Sampling(**s, rng=random.Random(trial * 10 + i)) for i, s in enumerate(settings)]
        processed = process_first(torch, scores, eager, seen, generated, EOS, suppress)
        want = choose(torch, processed, eager)
        want_residual = choose(torch, scores, eager, residual=True)

        u = torch.tensor(uniforms(fixed, 2))
        mine = first_scores(torch, scores, seen, torch.tensor([[r.repetition_penalty] for r in fixed]),
                            torch.tensor([n < r.min_codes for n, r in zip(generated, fixed)]), EOS, suppressed)
        do_sample = torch.tensor([r.do_sample for r in fixed])
        got = draw_first(torch, mine, do_sample, torch.tensor([[r.temperature] for r in fixed]),
                         torch.tensor([r.top_k for r in fixed]), torch.tensor([[r.top_p] for r in fixed]), u[:, 0])
        got_residual = draw_residual(torch, scores, do_sample, torch.tensor([[RESIDUAL_TOP_P]]), u[:, 1])
        assert torch.equal(mine, processed)
        assert torch.equal(got, want) and torch.equal(got_residual, want_residual), trial
        same += int((got == scores.argmax(-1)).all())
    assert same < 40, "the draws are not all the argmax"
