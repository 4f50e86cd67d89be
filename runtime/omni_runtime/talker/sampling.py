"""Sampling the talker's codes for a whole batch at once, each row with its own settings
and its own random stream.

The logits processing is transformers' (`generate`'s order and arithmetic: repetition
penalty, minimum length, suppressed ids, temperature, top-k, top-p), vectorised over rows
with per-row parameters. The draw is an inverse-CDF lookup of one uniform number per row
from the synthesis' own `random.Random(seed)`, so a row's codes depend on its seed and
logits only, never on which other requests share the batch.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, field

from omni_runtime.payload import PayloadError

RESIDUAL_TOP_K = 50   # the code predictor samples as transformers' talker.generate does
RESIDUAL_TOP_P = 0.8


@dataclass
class Sampling:
    """One synthesis' settings (payload v1 `generation`) and random stream."""
    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    min_codes: int = 0
    max_codes: int = 4096
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def of(cls, generation: dict) -> "Sampling":
        g = generation
        s = cls(do_sample=g.get("do_sample", True), temperature=g.get("temperature", 0.9), top_k=g.get("top_k", 50),
                top_p=g.get("top_p", 1.0), repetition_penalty=g.get("repetition_penalty", 1.05),
                min_codes=g.get("min_codes", 0), max_codes=g.get("max_codes", 4096))
        if s.max_codes < 1:
            raise PayloadError("generation.max_codes must be at least 1")
        if s.min_codes < 0 or s.top_k < 0:
            raise PayloadError("generation.min_codes and generation.top_k must not be negative")
        if not s.temperature > 0:
            raise PayloadError("generation.temperature must be greater than 0 (do_sample: false for greedy)")
        if not 0 < s.top_p <= 1:
            raise PayloadError("generation.top_p must be in (0, 1]")
        if not s.repetition_penalty > 0:
            raise PayloadError("generation.repetition_penalty must be greater than 0")
        seed = g.get("seed")
        s.rng = random.Random(secrets.randbits(63) if seed is None else seed)
        return s


def process_first(torch, logits, rows: list[Sampling], seen, generated: list[int], eos: int, suppress):
    """The talker's logits [B, V] (float32) after the processors that look at each row's own
    history: `seen` [B, V] marks codes a row generated, `generated` counts them."""
    dev = logits.device
    penalty = torch.tensor([[r.repetition_penalty] for r in rows], dtype=logits.dtype, device=dev)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    scores = torch.where(seen, penalized, logits)
    early = torch.tensor([n < r.min_codes for n, r in zip(generated, rows)], device=dev)
    if bool(early.any()):
        scores[:, eos] = torch.where(early, torch.full_like(scores[:, eos], -float("inf")), scores[:, eos])
    return scores.index_fill(1, suppress, -float("inf"))


def choose(torch, scores, rows: list[Sampling], residual: bool = False):
    """One code per row [B]: greedy rows take the argmax; sampling rows are warped
    (temperature, top-k, top-p; the code predictor's fixed top-k/top-p when `residual`) and
    draw from their own stream."""
    picked = scores.argmax(dim=-1)
    sampling = [i for i, r in enumerate(rows) if r.do_sample]
    if not sampling:
        return picked
    dev = scores.device
    idx = torch.tensor(sampling, device=dev)
    sub = [rows[i] for i in sampling]
    s = scores[idx]
    vocab = s.shape[-1]
    if not residual:
        s = s / torch.tensor([[r.temperature] for r in sub], dtype=s.dtype, device=dev)
    ks = [RESIDUAL_TOP_K if residual else r.top_k for r in sub]
    if any(ks):
        kmax = min(max(ks), vocab)
        top = torch.topk(s, kmax).values
        k = torch.tensor([[min(max(x, 1), kmax) - 1] for x in ks], device=dev)
        floor = top.gather(1, k)
        floor = torch.where(torch.tensor([[x > 0] for x in ks], device=dev), floor, torch.full_like(floor, -float("inf")))
        s = s.masked_fill(s < floor, -float("inf"))
    ps = [RESIDUAL_TOP_P if residual else r.top_p for r in sub]
    if any(p < 1.0 for p in ps):
        ordered, order = torch.sort(s, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - torch.tensor([[p] for p in ps], dtype=s.dtype, device=dev))
        drop[:, -1] = False  # keep at least the most likely code
        s = s.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    cdf = s.softmax(dim=-1).cumsum(dim=-1)
    # (0, total]: never lands on a leading zero-probability code
    u = torch.tensor([[1.0 - r.rng.random()] for r in sub], dtype=cdf.dtype, device=dev) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u).clamp(max=vocab - 1).view(-1)
    picked[idx] = drawn
    return picked


# -- the same arithmetic with fixed shapes ---------------------------------------------------
# The fixed-shape decode path (fixed.py) runs sampling inside a CUDA graph: no host reads, no
# row subsets, no Python branches on tensor values. Every row is processed the same way (a
# row's settings arrive as tensors) and the greedy/sampled choice is a `where` at the end.
# Applying a warper with its neutral setting (temperature 1, top-k 0, top-p 1) leaves a row's
# draw unchanged, so these give the same codes as `process_first` + `choose` row by row.

def uniforms(rows: list[Sampling], count: int) -> list[list[float]]:
    """`count` draws per row from each sampling row's own stream, in the order `choose` takes
    them (the first code group, then the residual groups); greedy rows draw nothing."""
    return [[1.0 - r.rng.random() for _ in range(count)] if r.do_sample else [1.0] * count for r in rows]


def first_scores(torch, logits, seen, penalty, early, eos: int, suppressed):
    """`process_first` for fixed shapes: `penalty` [B, 1] float, `early` [B] bool (fewer codes than
    min_codes so far), `suppressed` [V] bool."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    scores = torch.where(seen, penalized, logits)
    scores[:, eos] = torch.where(early, torch.full_like(scores[:, eos], -float("inf")), scores[:, eos])
    return scores.masked_fill(suppressed, -float("inf"))


def draw_first(torch, scores, do_sample, temperature, top_k, top_p, u):
    """`choose` for the first code group with fixed shapes: `do_sample` [B] bool, `temperature`
    and `top_p` [B, 1] float, `top_k` [B] long (0: off), `u` [B] the row's uniform draw."""
    s = scores / temperature
    ordered = torch.sort(s, dim=-1, descending=True).values  # the k-th largest value, for any k
    k = top_k.clamp(min=1, max=s.shape[-1]).sub(1).view(-1, 1)
    floor = torch.where(top_k.view(-1, 1) > 0, ordered.gather(1, k), torch.full_like(s[:, :1], -float("inf")))
    s = s.masked_fill(s < floor, -float("inf"))
    return _top_p_draw(torch, scores.argmax(dim=-1), s, do_sample, top_p, u)


def draw_residual(torch, scores, do_sample, top_p, u):
    """`choose(..., residual=True)` with fixed shapes: the code predictor's fixed top-k and top-p
    (`top_p` [1, 1] float holding RESIDUAL_TOP_P in the scores' dtype)."""
    kmax = min(RESIDUAL_TOP_K, scores.shape[-1])
    floor = torch.topk(scores, kmax).values[:, -1:]
    s = scores.masked_fill(scores < floor, -float("inf"))
    return _top_p_draw(torch, scores.argmax(dim=-1), s, do_sample, top_p, u)


def _top_p_draw(torch, greedy, s, do_sample, top_p, u):
    ordered, order = torch.sort(s, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)
    drop[:, -1] = False
    s = s.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    cdf = s.softmax(dim=-1).cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, u.view(-1, 1).to(cdf.dtype) * cdf[:, -1:]).clamp(max=s.shape[-1] - 1).view(-1)
    return torch.where(do_sample, drawn, greedy)
