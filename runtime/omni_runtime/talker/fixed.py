"""The talker's fixed-shape decode path (OMNI_TALKER_DECODE=graphs, the default, or fixed).

Everything a step touches is preallocated for `slots` syntheses: the talker's KV cache
([layers, slots, KV heads, max_tokens + 1 rounded up to 128, head dim], 20 KiB per position on the
real model),
the code predictor's (one frame: num_code_groups positions), each slot's repetition history,
codec embedding, the step's inputs and outputs. A decode step is two functions over the first
B slots (B a batch bucket, see slots.py):

  talker step (per batch bucket B and KV-length bucket L): one decoder step of the talker
      for every slot, writing its K/V at the slot's own position, attention over the first L
      positions, then the codec head -> last hidden state and first-group logits;
  frame (per B): the first code group sampled, then the code predictor's 15 steps with
      in-graph sampling -> the frame's codes and the codec embedding of the next step.

On CUDA each is captured once per bucket as a CUDA graph (graphs.py) and replayed; on CPU the
same functions run as they are. Slots that do not step (padding up to the bucket, or a
synthesis waiting for text) run along: their K/V go to a trash position past the end that no
mask of a stepping slot reaches, and their repetition history and codec embedding are kept
by `where(stepped, ...)`, so their state is untouched. Length buckets are multiples of 128.

Sampling stays per request: each row's settings arrive as tensors and each sampling row's
uniform draws (one per code group, in the order the eager path takes them) come from the
synthesis' own seeded stream on the host, so a row's codes never depend on its neighbours.
"""

from __future__ import annotations

from omni_runtime.payload import PayloadError
from omni_runtime.talker.engine import Prefilled, TalkerEngine
from omni_runtime.talker.graphs import StepGraphs
from omni_runtime.talker.sampling import RESIDUAL_TOP_P, draw_first, draw_residual, first_scores, uniforms
from omni_runtime.talker.slots import SlotTable, batch_buckets, bucket, length_buckets

# columns of the per-step input tensors
WRITE, ROPE, STEPPED, EARLY, DO_SAMPLE, TOP_K = range(6)  # int64 [slots, 6]
PENALTY, TEMPERATURE, TOP_P, U = range(4)  # float32 [slots, 3 + groups]: U.. one uniform per code group
ALIGN = 128


class FixedStepper:
    """Static KV slots, bucketed batches and (on CUDA) one CUDA graph per bucket."""

    def __init__(self, engine: TalkerEngine, slots: int, max_tokens: int, graphs: bool = True):
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import apply_rotary_pos_emb, repeat_kv

        torch = engine.torch
        self.engine, self.torch = engine, torch
        self.rotate, self.repeat_kv = apply_rotary_pos_emb, repeat_kv
        talker = engine.talker
        dev, dt = engine.device, engine.dtype
        text = engine.tc.text_config
        cp = talker.code_predictor
        pcfg = cp.config
        if any(kind != "full_attention" for kind in getattr(pcfg, "layer_types", None) or []):
            raise ValueError("the fixed-shape path assumes the code predictor attends over the whole frame")
        self.groups = engine.code_groups
        self.slots, self.capacity = slots, max_tokens
        # positions stored per slot, a multiple of 128 (attention kernels want aligned masks);
        # the last one is the trash where slots that do not step write
        stored = -(-(max_tokens + 1) // ALIGN) * ALIGN
        self.trash = stored - 1
        attn = talker.model.layers[0].self_attn
        self.head_dim, self.kv_heads = attn.head_dim, text.num_key_value_heads
        self.query_groups = text.num_attention_heads // self.kv_heads
        hidden, vocab = text.hidden_size, text.vocab_size
        zeros = lambda *shape, dtype=dt: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        layers = len(talker.model.layers)
        self.keys = zeros(layers, slots, self.kv_heads, stored, self.head_dim)
        self.values = zeros(layers, slots, self.kv_heads, stored, self.head_dim)
        pattn = cp.model.layers[0].self_attn
        p_kv_heads = pcfg.num_key_value_heads
        self.p_keys = zeros(len(cp.model.layers), slots, p_kv_heads, self.groups, pattn.head_dim)
        self.p_values = zeros(len(cp.model.layers), slots, p_kv_heads, self.groups, pattn.head_dim)
        self.p_groups = pcfg.num_attention_heads // p_kv_heads
        self.seen = zeros(slots, vocab, dtype=torch.bool)   # codes each slot generated (repetition penalty)
        self.codec = zeros(slots, 1, hidden)                 # codec embedding of each slot's next step
        self.text = zeros(slots, 1, hidden)                  # this step's text embedding per slot
        self.hidden = zeros(slots, 1, hidden)                # the talker's last state per slot
        self.logits = zeros(slots, vocab, dtype=torch.float32)
        self.ints = zeros(slots, 6, dtype=torch.long)
        self.floats = zeros(slots, U + self.groups, dtype=torch.float32)
        self.codes = zeros(slots, self.groups, dtype=torch.long)
        self.positions = torch.arange(stored, device=dev)
        self.suppressed = zeros(vocab, dtype=torch.bool)
        self.suppressed[torch.tensor(engine.suppress, dtype=torch.long, device=dev)] = True
        self.residual_top_p = torch.full((1, 1), RESIDUAL_TOP_P, dtype=torch.float32, device=dev)
        with torch.inference_mode():
            pos = torch.arange(self.groups, device=dev).view(1, -1)
            self.p_cos, self.p_sin = cp.model.rotary_emb(self.codec[:1], pos)  # [1, groups, head dim]
        self.batch_buckets = batch_buckets(slots)
        self.length_buckets = length_buckets(-(-max_tokens // ALIGN) * ALIGN, smallest=ALIGN)
        self.table = SlotTable(slots)
        self.moves = 0  # syntheses moved to a lower slot when another left
        self.graphs = StepGraphs(torch, dev, graphs)
        # slots that do not step: write to the trash position, change nothing, draw nothing
        self.neutral_int_row = [self.trash, 0, 0, 0, 0, 0]
        self.neutral_float_row = [1.0, 1.0, 1.0] + [1.0] * self.groups

    # -- the stepper interface (eager.py) ---------------------------------------------
    def free_slots(self) -> int:
        return self.table.free

    def admit(self, s, pre: Prefilled) -> None:
        """Copy a prefill's KV cache into a free slot."""
        if pre.length >= self.capacity:
            raise PayloadError(f"the talker prompt has {pre.length} positions; a synthesis may hold "
                               f"{self.capacity} (OMNI_TALKER_MAX_TOKENS)")
        slot = self.table.take(s)
        s.slot = slot
        n = pre.length
        for layer, (k, v) in enumerate(pre.kv):
            self.keys[layer, slot, :, :n].copy_(k[0])
            self.values[layer, slot, :, :n].copy_(v[0])
        self.seen[slot].zero_()
        self.hidden[slot].copy_(pre.hidden[0])
        self.logits[slot].copy_(pre.logits[0])

    def release(self, s) -> None:
        slot = getattr(s, "slot", None)
        if slot is None:
            return
        s.slot = None
        moved = self.table.release(slot)
        if moved is None:
            return
        mover, old = moved
        n = mover.length
        self.keys[:, slot, :, :n].copy_(self.keys[:, old, :, :n])
        self.values[:, slot, :, :n].copy_(self.values[:, old, :, :n])
        for state in (self.seen, self.codec, self.hidden, self.logits):
            state[slot].copy_(state[old])
        mover.slot = slot
        self.moves += 1

    def first_frame(self, rows: list, prefilled: list[Prefilled]) -> list:
        """The codes of each new synthesis' prefill position (admit put its state in place)."""
        b = self._batch()
        self.graphs.ensure(("frame", b), lambda: self._frame(b), self._neutral)
        self._write_inputs(b, rows, None)
        self.graphs.run(("frame", b), lambda: self._frame(b))
        return self._read(b, rows)

    def step(self, rows: list, text_rows: list) -> list:
        """One decode step of `rows` (the others in their slots sit it out)."""
        b = self._batch()
        length = bucket(max(s.length for s in rows) + 1, self.length_buckets)
        self.graphs.ensure(("step", b, length), lambda: self._talker_step(b, length), self._neutral)
        self.graphs.ensure(("frame", b), lambda: self._frame(b), self._neutral)
        self._write_inputs(b, rows, text_rows)
        self.graphs.run(("step", b, length), lambda: self._talker_step(b, length))
        self.graphs.run(("frame", b), lambda: self._frame(b))
        return self._read(b, rows)

    def warm(self) -> None:
        """Capture every bucket's graphs now (start-up) rather than at their first use."""
        for b in self.batch_buckets:
            self.graphs.ensure(("frame", b), lambda b=b: self._frame(b), self._neutral)
            for length in self.length_buckets:
                self.graphs.ensure(("step", b, length), lambda b=b, n=length: self._talker_step(b, n), self._neutral)

    # -- host side ----------------------------------------------------------------------
    def _batch(self) -> int:
        return bucket(max(self.table.used, 1), self.batch_buckets)

    def _neutral(self) -> None:
        torch = self.torch
        self.ints.copy_(torch.tensor([self.neutral_int_row] * self.slots, dtype=torch.long))
        self.floats.copy_(torch.tensor([self.neutral_float_row] * self.slots, dtype=torch.float32))

    def _write_inputs(self, b: int, rows: list, text_rows: list | None) -> None:
        """This step's per-slot inputs: positions, sampling settings and draws for the rows that
        step, neutral values for the others."""
        torch = self.torch
        ints = [self.neutral_int_row] * b
        floats = [self.neutral_float_row] * b
        for s, u in zip(rows, uniforms([s.sampling for s in rows], self.groups)):
            g = s.sampling
            ints[s.slot] = [s.length, s.length + s.rope_delta, 1, int(s.generated < g.min_codes), int(g.do_sample),
                            g.top_k]
            floats[s.slot] = [g.repetition_penalty, g.temperature, g.top_p] + u
        self.ints[:b].copy_(torch.tensor(ints, dtype=torch.long))
        self.floats[:b].copy_(torch.tensor(floats, dtype=torch.float32))
        if text_rows is not None:
            idx = torch.tensor([s.slot for s in rows], dtype=torch.long, device=self.text.device)
            self.text[:, 0].index_copy_(0, idx, torch.stack(text_rows).to(self.text.dtype))

    def _read(self, b: int, rows: list) -> list:
        codes = self.codes[:b].to("cpu", copy=True)  # on CPU .cpu() would alias the buffer
        return [(int(codes[s.slot, 0]), codes[s.slot]) for s in rows]

    # -- the fixed-shape functions (captured on CUDA) --------------------------------------
    def _talker_step(self, b: int, length: int) -> None:
        """One talker decoder step for slots [0, b) attending over positions [0, length)."""
        torch = self.torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
        model = self.engine.talker.model
        write = self.ints[:b, WRITE]
        rope = self.ints[:b, ROPE].view(1, b, 1).expand(3, b, 1)
        x = self.codec[:b] + self.text[:b]
        cos, sin = model.rotary_emb(x, rope)
        visible = (self.positions[:length].view(1, length) <= write.view(b, 1)).view(b, 1, 1, length)
        at = write.view(b, 1, 1, 1).expand(b, self.kv_heads, 1, self.head_dim)
        hd, kvh = self.head_dim, self.kv_heads
        for i, layer in enumerate(model.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_norm(a.q_proj(h).view(b, 1, -1, hd)).transpose(1, 2)
            k = a.k_norm(a.k_proj(h).view(b, 1, -1, hd)).transpose(1, 2)
            v = a.v_proj(h).view(b, 1, -1, hd).transpose(1, 2)
            q, k = self.rotate(q, k, cos, sin)
            keys, values = self.keys[i, :b], self.values[i, :b]
            keys.scatter_(2, at, k)
            values.scatter_(2, at, v)
            # the query heads of one KV head side by side: no copy of the cache per query head
            q = q.reshape(b, kvh, self.query_groups, hd)
            out = sdpa(q, keys[:, :, :length], values[:, :, :length], attn_mask=visible, scale=a.scaling)
            x = x + a.o_proj(out.reshape(b, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = model.norm(x)
        self.hidden[:b].copy_(x)
        self.logits[:b].copy_(self.engine.talker.codec_head(x)[:, -1, :].float())

    def _frame(self, b: int) -> None:
        """The first code group from the talker's logits, then the code predictor's groups."""
        torch = self.torch
        talker = self.engine.talker
        cp = talker.code_predictor
        ints, floats = self.ints[:b], self.floats[:b]
        stepped = ints[:, STEPPED].bool().view(b, 1)
        do_sample = ints[:, DO_SAMPLE].bool()
        scores = first_scores(torch, self.logits[:b], self.seen[:b], floats[:, PENALTY:PENALTY + 1],
                              ints[:, EARLY].bool(), self.engine.codec_eos, self.suppressed)
        first = draw_first(torch, scores, do_sample, floats[:, TEMPERATURE:TEMPERATURE + 1], ints[:, TOP_K],
                           floats[:, TOP_P:TOP_P + 1], floats[:, U])
        seen = self.seen[:b]
        seen.scatter_(1, first.view(b, 1), seen.gather(1, first.view(b, 1)) | stepped)
        embed = talker.get_input_embeddings()(first.view(b, 1))
        x = torch.cat((self.hidden[:b], embed), dim=1)
        embeds, codes = [embed], [first]
        for g in range(self.groups - 1):
            start = 0 if g == 0 else g + 1  # the first predictor step reads the state and the first group
            h = self._predictor(x, b, start)
            logits = cp.lm_head[g](h)[:, -1, :].float()
            code = draw_residual(torch, logits, do_sample, self.residual_top_p, floats[:, U + 1 + g])
            codes.append(code)
            x = cp.get_input_embeddings()[g](code.view(b, 1))
            embeds.append(x)
        self.codes[:b].copy_(torch.stack(codes, dim=1))
        summed = torch.cat(embeds, dim=1).sum(1, keepdim=True)
        self.codec[:b].copy_(torch.where(stepped.view(b, 1, 1), summed, self.codec[:b]))

    def _predictor(self, x, b: int, start: int):
        """The code predictor over x [b, n, D] at positions start..start+n-1 of the frame."""
        torch = self.torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
        model = self.engine.talker.code_predictor.model
        n = x.shape[1]
        end = start + n
        cos, sin = self.p_cos[:, start:end], self.p_sin[:, start:end]
        for i, layer in enumerate(model.layers):
            a = layer.self_attn
            hd = a.head_dim
            h = layer.input_layernorm(x)
            q = a.q_norm(a.q_proj(h).view(b, n, -1, hd)).transpose(1, 2)
            k = a.k_norm(a.k_proj(h).view(b, n, -1, hd)).transpose(1, 2)
            v = a.v_proj(h).view(b, n, -1, hd).transpose(1, 2)
            q, k = self.rotate(q, k, cos, sin)
            keys, values = self.p_keys[i, :b], self.p_values[i, :b]
            keys[:, :, start:end].copy_(k)
            values[:, :, start:end].copy_(v)
            out = sdpa(q, self.repeat_kv(keys[:, :, :end], self.p_groups), self.repeat_kv(values[:, :, :end], self.p_groups),
                       is_causal=n > 1, scale=a.scaling)
            x = x + a.o_proj(out.transpose(1, 2).reshape(b, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.norm(x)
