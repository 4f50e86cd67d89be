"""The talker's eager decode path (OMNI_TALKER_DECODE=eager): transformers' own forward over a
dynamic KV cache, re-arranged whenever the batch changes. The reference the fixed-shape path
(fixed.py) is checked against, and the fallback when it misbehaves.

A stepper (this one or fixed.FixedStepper) owns the device state of the syntheses the decode
loop (batch.py) gives it: `admit` after a prefill, `first_frame` for the codes of the
prefill's position, `step` for one decode step of some of them, `release` when one leaves.
Each frame is (first code group as int, all code groups [groups]) per row.
"""

from __future__ import annotations

from omni_runtime.talker.engine import Prefilled, TalkerEngine, cache_of, kv_layers
from omni_runtime.talker.sampling import choose, process_first


class KVBatch:
    """The KV cache of the syntheses stepped together: rows left-padded to one length.
    Re-arranged only when the set of rows changes."""

    def __init__(self, torch):
        self.torch = torch
        self.rows: list = []
        self.cache = None
        self.pads: list[int] = []

    def _take_out(self) -> None:
        if self.cache is None:
            return
        kv = kv_layers(self.cache)
        for i, (s, pad) in enumerate(zip(self.rows, self.pads)):
            s.kv = [(k[i:i + 1, :, pad:], v[i:i + 1, :, pad:]) for k, v in kv]
        self.rows, self.cache, self.pads = [], None, []

    def arrange(self, rows: list) -> None:
        if rows == self.rows:
            return
        leaving = [s for s in self.rows if s not in rows]
        self._take_out()
        for s in leaving:  # own copies, so the old batch tensors can be freed
            if s.kv is not None:
                s.kv = [(k.clone(), v.clone()) for k, v in s.kv]
        if not rows:
            return
        pad = self.torch.nn.functional.pad
        width = max(s.length for s in rows)
        self.pads = [width - s.length for s in rows]
        layers = []
        for layer in range(len(rows[0].kv)):
            keys = [pad(s.kv[layer][0], (0, 0, p, 0)) for s, p in zip(rows, self.pads)]
            values = [pad(s.kv[layer][1], (0, 0, p, 0)) for s, p in zip(rows, self.pads)]
            layers.append((self.torch.cat(keys, dim=0), self.torch.cat(values, dim=0)))
        self.cache = cache_of(layers)
        self.rows = list(rows)
        for s in rows:
            s.kv = None

    def drop(self, s) -> None:
        """Forget a synthesis that ended (its rows go at the next arrange)."""
        if s in self.rows:
            self._take_out()
        s.kv = None

    def inputs(self, device):
        """Attention mask [B, L + 1] and 3D RoPE positions [3, B, 1] of the next step."""
        torch = self.torch
        width = max(s.length for s in self.rows) + 1
        mask = torch.ones((len(self.rows), width), dtype=torch.long, device=device)
        for i, p in enumerate(self.pads):
            if p:
                mask[i, :p] = 0
        pos = torch.tensor([[s.length + s.rope_delta] for s in self.rows], dtype=torch.long, device=device)
        return mask, pos.unsqueeze(0).expand(3, -1, -1)


class EagerStepper:
    """Decode steps through transformers' forward; no limit on syntheses or their length."""

    capacity = None  # cached positions per synthesis: unbounded

    def __init__(self, engine: TalkerEngine):
        self.engine = engine
        self.torch = engine.torch
        self.batch = KVBatch(self.torch)
        self.suppress = self.torch.tensor(engine.suppress, dtype=self.torch.long, device=engine.device)

    def free_slots(self) -> int:
        return 1 << 30

    def admit(self, s, pre: Prefilled) -> None:
        s.kv = pre.kv
        s.seen = self.torch.zeros(self.engine.tc.text_config.vocab_size, dtype=self.torch.bool,
                                  device=self.engine.device)

    def release(self, s) -> None:
        self.batch.drop(s)

    def first_frame(self, rows: list, prefilled: list[Prefilled]) -> list:
        torch = self.torch
        return self._frame(rows, torch.cat([p.hidden for p in prefilled]), torch.cat([p.logits for p in prefilled]))

    def step(self, rows: list, text_rows: list) -> list:
        torch, eng = self.torch, self.engine
        embeds = torch.cat([s.codec_embed + t.view(1, 1, -1) for s, t in zip(rows, text_rows)], dim=0)
        self.batch.arrange(rows)
        mask, positions = self.batch.inputs(eng.device)
        hidden, logits = eng.decode(embeds, self.batch.cache, mask, positions)
        return self._frame(rows, hidden, logits)

    def _frame(self, rows: list, hidden, logits) -> list:
        """Each row's first code group from the talker's logits, then the code predictor's
        residual groups for all rows in one batched pass."""
        torch, eng = self.torch, self.engine
        sampling = [s.sampling for s in rows]
        scores = process_first(torch, logits, sampling, torch.stack([s.seen for s in rows]),
                               [s.generated for s in rows], eng.codec_eos, self.suppress)
        first = choose(torch, scores, sampling)
        for s, code in zip(rows, first.tolist()):
            s.seen[code] = True
        codes, codec_embed = eng.residual_codes(hidden, first,
                                                lambda _g, lg: choose(torch, lg, sampling, residual=True))
        for j, s in enumerate(rows):
            s.codec_embed = codec_embed[j:j + 1]
        return [(row[0], c) for row, c in zip(codes.tolist(), codes)]
