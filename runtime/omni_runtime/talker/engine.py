"""Talker + code2wav for one pod: the model, and the pure steps of speaking one or many
requests (prefill, and the eager path's batched decode step and residual code groups).
The loop that drives the steps for every active request at once is batch.py; the
fixed-shape path's steps are in fixed.py, code2wav's batches in code2wav.py.

The talker input is built exactly as Qwen3-Omni builds it inside one process
(user turns: thinker embeddings through `text_projection`, multimodal positions:
layer-`accept_hidden_layer` states through `hidden_projection`; assistant turn:
text embeddings plus the codec control tokens and the speaker), but the thinker
side arrives as a payload instead of living in the same process. The assistant text
after its first token is fed one token per codec step (`tts_eos` after the last,
`tts_pad` once it is over), so decoding can start before the thinker has finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from omni_runtime.checkpoint import load_module, load_prefixed, resolve_model_dir
from omni_runtime.payload import PayloadError, TalkerRequest

log = logging.getLogger("omni.talker")

TEXT_ROWS_KEPT = 16384  # projected text embeddings memoized per token id (a few MB on the real model)


@dataclass
class ChunkPolicy:
    first: int = 4  # codes before the first audio packet (12.5 codes/s on the real model)
    every: int = 25  # codes per following packet
    left_context: int = 25  # codes of left context re-decoded for continuity


@dataclass
class Prefilled:
    """One request after its prefill: what its first decode step needs."""
    hidden: object      # [1, 1, D] last-layer state of the last position (feeds the code predictor)
    logits: object      # [1, V] float32 logits of the first codec token
    kv: list            # per layer (keys, values), [1, heads, length, head_dim]
    length: int
    rope_delta: int     # 3D RoPE offset: position of the next token = length + rope_delta


class TalkerEngine:
    def __init__(self, model: str, revision: str | None = None, device: str = "cpu", dtype: str | None = None,
                 chunks: ChunkPolicy | None = None):
        import torch
        from transformers import AutoConfig

        t0 = time.monotonic()
        model_dir = resolve_model_dir(model, revision)
        config = AutoConfig.from_pretrained(model_dir)
        torch_dtype = _dtype(torch, device, dtype)
        parts = load_prefixed(
            model_dir,
            {"talker": "talker.", "code2wav": "code2wav.", "embed": "thinker.model.embed_tokens."},
            dtype=torch_dtype,
        )
        if "weight" not in parts["embed"]:
            raise RuntimeError("checkpoint lacks thinker.model.embed_tokens.weight")
        self._build(config, device, torch_dtype, chunks)
        load_module(self.talker, parts["talker"], "talker")
        load_module(self.code2wav, parts["code2wav"], "code2wav")
        self._finish(parts["embed"]["weight"].to(self.device), t0)
        log.info("talker loaded from %s in %.1fs on %s (%s)", model_dir, self.load_seconds, self.device, torch_dtype)

    @classmethod
    def random(cls, config, device: str = "cpu", dtype: str | None = None, chunks: ChunkPolicy | None = None,
               seed: int = 0) -> "TalkerEngine":
        """An engine with random weights built on the device from a Qwen3OmniMoeConfig, without a
        checkpoint: the benchmarks' full-size talker (memory and speed do not depend on the values)."""
        import torch

        from omni_runtime.tiny import draw_skipped_weights

        t0 = time.monotonic()
        engine = cls.__new__(cls)
        torch.manual_seed(seed)
        engine._build(config, device, _dtype(torch, device, dtype), chunks)
        draw_skipped_weights(engine, torch, config.talker_config.initializer_range)
        embed = torch.randn((config.thinker_config.text_config.vocab_size, config.thinker_config.text_config.hidden_size),
                            device=engine.device, dtype=engine.dtype) * 0.02
        engine._finish(embed, t0)
        return engine

    def _build(self, config, device: str, dtype, chunks: ChunkPolicy | None) -> None:
        """The talker and code2wav modules (weights as transformers initialises them)."""
        import torch
        from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunks = chunks or ChunkPolicy()
        self.config = config
        self.tc = config.talker_config
        with torch.device(self.device):
            self.talker = m.Qwen3OmniMoeTalkerForConditionalGeneration._from_config(self.tc, dtype=dtype)
            self.code2wav = m.Qwen3OmniMoeCode2Wav._from_config(config.code2wav_config, dtype=dtype)

    def _finish(self, thinker_embed, t0: float) -> None:
        tc = self.tc
        self.thinker_embed = thinker_embed
        self.talker.eval()
        self.code2wav.eval()
        self.upsample = int(self.code2wav.total_upsample)
        # 12.5 codes per second on the real model: 24 kHz / 1920 samples per code.
        self.sample_rate = int(getattr(self.config.code2wav_config, "sampling_rate", 0) or 24000)
        self.speakers = {k.lower(): v for k, v in (tc.speaker_id or {}).items()}
        self.mm_ids = {tc.audio_token_id, tc.image_token_id, tc.video_token_id}
        vocab = tc.text_config.vocab_size
        self.suppress = [i for i in range(max(0, vocab - 1024), vocab) if i != tc.codec_eos_token_id]
        thinker_eos = getattr(self.config, "im_end_token_id", None)
        self.thinker_eos = {thinker_eos} if thinker_eos is not None else set()
        self.load_seconds = time.monotonic() - t0
        self.text_vocab = int(self.thinker_embed.shape[0])
        self.code_groups = int(tc.num_code_groups)
        self.codec_eos = int(tc.codec_eos_token_id)
        self._text_rows: OrderedDict[int, object] = OrderedDict()
        self._text_lock = threading.Lock()

    # -- description ----------------------------------------------------------------
    def info(self) -> dict:
        return {
            "sample_rate": self.sample_rate,
            "speakers": sorted(self.speakers),
            "accept_hidden_layer": self.tc.accept_hidden_layer,
            "thinker_hidden_size": int(self.thinker_embed.shape[1]),
            "codes_per_second": self.sample_rate / self.upsample,
            "num_code_groups": self.tc.num_code_groups,
        }

    # -- input construction ---------------------------------------------------------
    def prompt_tail(self, prompt: list[int]) -> list[int]:
        """What the prompt already holds of the assistant turn after '<|im_start|>assistant\\n'
        (usually nothing): the talker speaks it before the response."""
        return prompt[self._assistant_start(prompt) + 3:]

    def spoken_tail(self, req: TalkerRequest) -> list[int]:
        """The assistant text the talker speaks: the prompt's tail, then the response up to
        the thinker's first <|im_end|>."""
        return self.prompt_tail(req.prompt_ids) + self.cut_at_end(req.response_ids)

    def cut_at_end(self, ids: list[int]) -> list[int]:
        for i, tok in enumerate(ids):
            if tok in self.thinker_eos:
                return list(ids[:i])
        return list(ids)

    def _assistant_start(self, prompt: list[int]) -> int:
        cfg = self.config
        start = None
        for i in range(len(prompt) - 1):
            if prompt[i] == cfg.im_start_token_id and prompt[i + 1] == cfg.assistant_token_id:
                start = i
        if start is None:
            raise PayloadError("prompt_ids has no '<|im_start|>assistant' turn (apply the chat template with a generation prompt)")
        return start

    def text_row(self, token_id: int):
        """The talker-side embedding of one text token ([D]), projected one row at a time so
        the value never depends on which other tokens were projected with it."""
        with self._text_lock:
            row = self._text_rows.get(token_id)
            if row is not None:
                self._text_rows.move_to_end(token_id)
                return row
        if not 0 <= token_id < self.thinker_embed.shape[0]:
            raise PayloadError(f"token id {token_id} out of range for a vocabulary of {self.thinker_embed.shape[0]}")
        with self.torch.inference_mode():
            row = self.talker.text_projection(self.thinker_embed[token_id:token_id + 1].to(self.dtype))[0]
        with self._text_lock:
            self._text_rows[token_id] = row
            if len(self._text_rows) > TEXT_ROWS_KEPT:
                self._text_rows.popitem(last=False)
        return row

    def trailing_row(self, token_id: int | None, ended: bool):
        """What step k adds to the codec embedding: text token k+1 of the spoken tail, `tts_eos`
        right after the last one (`ended`, token None), `tts_pad` from then on."""
        if token_id is not None:
            return self.text_row(token_id)
        return self.text_row(self.config.tts_eos_token_id if ended else self.config.tts_pad_token_id)

    def prefill_inputs(self, req: TalkerRequest, tail: list[int]) -> dict:
        """The talker's prefill for `req`: the prompt plus the first token of the spoken `tail`
        (the rest of the tail is fed step by step)."""
        torch = self.torch
        cfg, tc = self.config, self.tc
        speaker_id = self.speakers.get(req.speaker.lower())
        if speaker_id is None:
            raise PayloadError(f"unknown speaker {req.speaker!r}; known: {', '.join(sorted(self.speakers))}")
        if not tail:
            raise PayloadError("response_ids has no text before the end-of-turn token")
        prompt = req.prompt_ids
        vocab = self.thinker_embed.shape[0]
        if max(prompt) >= vocab or max(tail) >= vocab:
            raise PayloadError(f"token id out of range for a vocabulary of {vocab}")
        assistant_start = self._assistant_start(prompt)
        n_prompt = len(prompt)

        mm_positions = [i for i, t in enumerate(prompt) if t in self.mm_ids]
        n_states = req.mm.shape[0] if req.mm else 0
        if n_states != len(mm_positions):
            raise PayloadError(
                f"prompt_ids has {len(mm_positions)} multimodal tokens but the payload carries {n_states} hidden-state rows"
            )
        if req.mm and req.mm.shape[1] != self.thinker_embed.shape[1]:
            raise PayloadError(f"mm hidden size {req.mm.shape[1]} != thinker hidden size {self.thinker_embed.shape[1]}")
        if req.mm and req.mm.layer not in (-1, tc.accept_hidden_layer):
            raise PayloadError(f"mm states come from layer {req.mm.layer}, this talker accepts layer {tc.accept_hidden_layer}")

        dev, dt = self.device, self.dtype
        seq = torch.tensor(prompt[:assistant_start + 3] + tail[:1], dtype=torch.long, device=dev)
        embeds = self.thinker_embed[seq]  # layer-0 states of every position

        # user turns: every position whose enclosing <|im_start|> is followed by the user role token
        user_pos, role, cur = [], None, None
        for i, t in enumerate(prompt):
            if t == cfg.im_start_token_id:
                cur = i
                role = prompt[i + 1] if i + 1 < n_prompt else None
            elif cur is None:
                role = prompt[1] if n_prompt > 1 else None
            if role == cfg.user_token_id:
                user_pos.append(i)
        if not user_pos:
            raise PayloadError("prompt_ids has no user turn")
        mm_row = {p: r for r, p in enumerate(mm_positions)}
        states = req.mm.tensor().to(dev, dt) if req.mm else None
        proj_t, proj_h = self.talker.text_projection, self.talker.hidden_projection
        user_idx = torch.tensor(user_pos, device=dev)
        user_embeds = proj_t(embeds[user_idx].to(dt))
        mm_in_user = [(j, mm_row[p]) for j, p in enumerate(user_pos) if p in mm_row]
        if mm_in_user:
            cols = torch.tensor([j for j, _ in mm_in_user], device=dev)
            rows = torch.tensor([r for _, r in mm_in_user], device=dev)
            user_embeds[cols] = proj_h(states[rows])
        user_ids = seq[user_idx]

        special = torch.tensor([cfg.tts_bos_token_id, cfg.tts_pad_token_id], device=dev)
        tts_bos, tts_pad = proj_t(self.thinker_embed[special].to(dt)).chunk(2, dim=0)  # [1, D] each
        assistant = proj_t(embeds[assistant_start:].to(dt))  # <|im_start|> assistant \\n t0
        text_part = torch.cat((assistant[:3], tts_pad.expand(4, -1), tts_bos, assistant[3:4]), dim=0)
        codec_tokens = torch.tensor(
            [tc.codec_nothink_id, tc.codec_think_bos_id, tc.codec_think_eos_id, speaker_id, tc.codec_pad_id, tc.codec_bos_id],
            device=dev,
        )
        codec_part = torch.cat(
            (torch.zeros((3, text_part.shape[1]), device=dev, dtype=dt), self.talker.get_input_embeddings()(codec_tokens)),
            dim=0,
        )
        n_asst = min(text_part.shape[0], codec_part.shape[0])
        assistant_embeds = text_part[:n_asst] + codec_part[:n_asst]
        assistant_ids = torch.full((n_asst,), cfg.tts_pad_token_id, dtype=torch.long, device=dev)

        inputs_embeds = torch.cat((user_embeds, assistant_embeds), dim=0).unsqueeze(0)
        talker_ids = torch.cat((user_ids, assistant_ids), dim=0).unsqueeze(0)
        kwargs = dict(inputs_embeds=inputs_embeds, talker_input_ids=talker_ids, attention_mask=torch.ones_like(talker_ids))
        if req.mm:
            if req.mm.audio_feature_lengths:
                kwargs["audio_feature_lengths"] = torch.tensor(req.mm.audio_feature_lengths, device=dev)
            if req.mm.image_grid_thw:
                kwargs["image_grid_thw"] = torch.tensor(req.mm.image_grid_thw, device=dev)
            if req.mm.video_grid_thw:
                kwargs["video_grid_thw"] = torch.tensor(req.mm.video_grid_thw, device=dev)
            if req.mm.video_second_per_grid:
                kwargs["video_second_per_grid"] = torch.tensor(req.mm.video_second_per_grid, device=dev)
        return kwargs

    def build_inputs(self, req: TalkerRequest) -> dict:
        """Everything transformers' `talker.generate` takes for a finished answer: the prefill
        plus `trailing_text_hidden` and `tts_pad_embed` (what the decode loop feeds step by step)."""
        torch = self.torch
        tail = self.spoken_tail(req)
        kwargs = self.prefill_inputs(req, tail)
        rows = [self.text_row(t) for t in tail[1:]] + [self.trailing_row(None, True)]
        kwargs["trailing_text_hidden"] = torch.stack(rows).unsqueeze(0)
        kwargs["tts_pad_embed"] = self.trailing_row(None, False).view(1, 1, -1)
        return kwargs

    # -- the steps of decoding ------------------------------------------------------
    def prefill(self, kwargs: dict) -> Prefilled:
        """Run one request's prefill (batch of one) with a fresh cache."""
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.talker(**kwargs, cache=cache, use_cache=True, output_hidden_states=True)
        # forward() keeps the 3D RoPE offset on the module; read it before anything else runs
        delta = self.talker.rope_deltas
        rope_delta = int(delta.reshape(-1)[0]) if delta is not None else 0
        length = kwargs["inputs_embeds"].shape[1]
        hidden = out.hidden_states[0][-1][:, -1:]  # the last layer's output (already normed)
        return Prefilled(hidden=hidden, logits=out.logits[:, -1, :].float(), kv=kv_layers(cache),
                         length=length, rope_delta=rope_delta)

    def decode(self, embeds, cache, attention_mask, positions):
        """One decode step for a batch: embeds [B, 1, D] -> (hidden [B, 1, D], logits [B, V] float32)."""
        out = self.talker.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                cache=cache, use_cache=True)
        hidden = out.last_hidden_state
        return hidden, self.talker.codec_head(hidden)[:, -1, :].float()

    def residual_codes(self, hidden, first, pick):
        """The code predictor for a batch: the last talker states [B, 1, D] and the sampled first
        code groups [B] give the other groups. `pick(step, logits [B, V] float32)` chooses one code
        per row. Returns (codes [B, groups], the summed codec embedding [B, 1, D] of the next step)."""
        from transformers import DynamicCache

        torch = self.torch
        cp = self.talker.code_predictor
        first_embed = self.talker.get_input_embeddings()(first.view(-1, 1))  # [B, 1, D]
        cache = DynamicCache()
        embeds = torch.cat((hidden, first_embed), dim=1)
        hiddens = [first_embed]
        codes = [first.view(-1)]
        for step in range(self.code_groups - 1):
            out = cp.model(inputs_embeds=embeds, cache=cache, use_cache=True)
            logits = cp.lm_head[step](out.last_hidden_state)[:, -1, :].float()
            code = pick(step, logits)
            codes.append(code)
            embeds = cp.get_input_embeddings()[step](code.view(-1, 1))
            hiddens.append(embeds)
        return torch.stack(codes, dim=1), torch.cat(hiddens, dim=1).sum(1, keepdim=True)

    def sample_count(self, frames: int) -> int:
        """Samples code2wav gives for `frames` codes: its upsampling keeps every frame's samples,
        each decoder block's transposed convolution (kernel 2r, stride r) trims r on both sides."""
        cfg = self.config.code2wav_config
        n = frames
        for r in cfg.upsampling_ratios:
            n *= r
        for r in cfg.upsample_rates:
            n = (n - 1) * r
        return max(n, 0)


def _dtype(torch, device: str, dtype: str | None):
    """bf16 on a GPU, fp32 elsewhere, unless named."""
    if dtype is None:
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return getattr(torch, dtype)


def kv_layers(cache) -> list:
    """(keys, values) per layer of a transformers DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_of(kv: list):
    """A DynamicCache holding the given (keys, values) per layer."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache
