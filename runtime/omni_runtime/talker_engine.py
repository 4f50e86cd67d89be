"""Talker + code2wav inference for one pod: token ids (+ multimodal thinker states) in,
PCM chunks out, as the codec produces them.

The talker input is built exactly as Qwen3-Omni builds it inside one process
(user turns: thinker embeddings through `text_projection`, multimodal positions:
layer-`accept_hidden_layer` states through `hidden_projection`; assistant turn:
text embeddings plus the codec control tokens and the speaker), but the thinker
side arrives as a payload instead of living in the same process.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .payload import PayloadError, TalkerRequest
from .weights import load_module, load_prefixed, resolve_model_dir

log = logging.getLogger("omni.talker")


class Cancelled(Exception):
    pass


@dataclass
class ChunkPolicy:
    first: int = 4  # codes before the first audio packet (12.5 codes/s on the real model)
    every: int = 25  # codes per following packet
    left_context: int = 25  # codes of left context re-decoded for continuity


@dataclass
class SynthesisStats:
    codes: int = 0
    samples: int = 0
    started: float = 0.0
    first_audio: float | None = None
    finished: float = 0.0


class TalkerEngine:
    def __init__(self, model: str, revision: str | None = None, device: str = "cpu", dtype: str | None = None,
                 chunks: ChunkPolicy | None = None):
        import torch
        from transformers import AutoConfig
        from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

        self.torch = torch
        self.device = torch.device(device)
        if dtype is None:
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        self.chunks = chunks or ChunkPolicy()
        model_dir = resolve_model_dir(model, revision)
        self.config = AutoConfig.from_pretrained(model_dir)
        tc = self.config.talker_config
        self.tc = tc
        t0 = time.monotonic()
        parts = load_prefixed(
            model_dir,
            {"talker": "talker.", "code2wav": "code2wav.", "embed": "thinker.model.embed_tokens."},
            dtype=self.dtype,
        )
        with torch.device(self.device):
            self.talker = m.Qwen3OmniMoeTalkerForConditionalGeneration._from_config(tc, dtype=self.dtype)
            self.code2wav = m.Qwen3OmniMoeCode2Wav._from_config(self.config.code2wav_config, dtype=self.dtype)
        load_module(self.talker, parts["talker"], "talker")
        load_module(self.code2wav, parts["code2wav"], "code2wav")
        if "weight" not in parts["embed"]:
            raise RuntimeError("checkpoint lacks thinker.model.embed_tokens.weight")
        self.thinker_embed = parts["embed"]["weight"].to(self.device)
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
        self._slot_lock = threading.Lock()
        self._free_slots: list = []
        log.info("talker loaded from %s in %.1fs on %s (%s)", model_dir, self.load_seconds, self.device, dtype)

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
    def build_inputs(self, req: TalkerRequest) -> dict:
        torch = self.torch
        cfg, tc = self.config, self.tc
        speaker_id = self.speakers.get(req.speaker.lower())
        if speaker_id is None:
            raise PayloadError(f"unknown speaker {req.speaker!r}; known: {', '.join(sorted(self.speakers))}")
        vocab = self.thinker_embed.shape[0]
        if max(req.prompt_ids) >= vocab or max(req.response_ids) >= vocab:
            raise PayloadError(f"token id out of range for a vocabulary of {vocab}")
        # The spoken text ends at the thinker's first <|im_end|>; the talker gets an explicit
        # tts_eos after the last text token instead of the end-of-turn token itself.
        response = list(req.response_ids)
        for i, tok in enumerate(response):
            if tok in self.thinker_eos:
                response = response[:i]
                break
        if not response:
            raise PayloadError("response_ids has no text before the end-of-turn token")
        prompt = req.prompt_ids
        n_prompt = len(prompt)
        assistant_start = None
        for i in range(n_prompt - 1):
            if prompt[i] == cfg.im_start_token_id and prompt[i + 1] == cfg.assistant_token_id:
                assistant_start = i
        if assistant_start is None:
            raise PayloadError("prompt_ids has no '<|im_start|>assistant' turn (apply the chat template with a generation prompt)")

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
        seq = torch.tensor(prompt + response, dtype=torch.long, device=dev)
        embeds = self.thinker_embed[seq]  # [L, H_thinker], layer-0 states of every position

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

        special = torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id], device=dev)
        tts_bos, tts_eos, tts_pad = proj_t(self.thinker_embed[special].to(dt)).chunk(3, dim=0)  # [1, D] each
        assistant = proj_t(embeds[assistant_start:].to(dt))  # <|im_start|> assistant \n r0 r1 ...
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
        trailing = torch.cat((assistant[4:], tts_eos), dim=0)
        assistant_ids = torch.full((n_asst,), cfg.tts_pad_token_id, dtype=torch.long, device=dev)

        inputs_embeds = torch.cat((user_embeds, assistant_embeds), dim=0).unsqueeze(0)
        talker_ids = torch.cat((user_ids, assistant_ids), dim=0).unsqueeze(0)
        kwargs = dict(
            inputs_embeds=inputs_embeds,
            trailing_text_hidden=trailing.unsqueeze(0),
            tts_pad_embed=tts_pad.unsqueeze(0),
            talker_input_ids=talker_ids,
            attention_mask=torch.ones_like(talker_ids),
        )
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

    # -- generation -----------------------------------------------------------------
    def _slot(self):
        """A shallow copy of the talker: shares every weight, owns its per-request state
        (3D RoPE deltas, the code tap below), so concurrent syntheses do not interfere."""
        with self._slot_lock:
            if self._free_slots:
                return self._free_slots.pop()
        return copy.copy(self.talker)

    def _release(self, slot):
        slot.__dict__.pop("forward", None)
        with self._slot_lock:
            self._free_slots.append(slot)

    def synthesize(self, req: TalkerRequest, emit: Callable[[bytes], None], cancelled: Callable[[], bool]) -> SynthesisStats:
        """Run one synthesis on the calling thread; `emit` receives PCM16 little-endian
        chunks as code2wav produces them. Raises Cancelled if `cancelled()` turns true."""
        torch = self.torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stats = SynthesisStats(started=time.monotonic())
        with torch.inference_mode():
            kwargs = self.build_inputs(req)
            g = req.generation
            seed = g.get("seed")
            generator_state = None
            if seed is not None:
                generator_state = torch.random.get_rng_state()
                torch.manual_seed(seed)
            codes: list = []
            decoded_upto = 0
            next_at = self.chunks.first

            def flush(final: bool = False):
                nonlocal decoded_upto, next_at
                n = len(codes)
                if n == decoded_upto or (not final and n < next_at):
                    return
                ctx = min(self.chunks.left_context, decoded_upto)
                block = torch.stack(codes[decoded_upto - ctx: n], dim=-1).unsqueeze(0)  # [1, groups, T]
                wav = self.code2wav(block.to(self.device))[0, 0, ctx * self.upsample:]
                pcm = (wav.float().clamp(-1, 1) * 32767.0).round().to(torch.int16).cpu().numpy().astype("<i2").tobytes()
                decoded_upto = n
                next_at = n + self.chunks.every
                if pcm:
                    if stats.first_audio is None:
                        stats.first_audio = time.monotonic()
                    stats.samples += len(pcm) // 2
                    emit(pcm)

            slot = self._slot()
            original_forward = type(slot).forward.__get__(slot)

            @functools.wraps(original_forward)
            def tapped_forward(*args, **kwargs):
                rc = kwargs.get("residual_codes")
                if rc is not None:
                    codes.append(rc[0].detach())
                    stats.codes += 1
                    flush()
                if cancelled():
                    raise Cancelled()
                return original_forward(*args, **kwargs)

            class Stop(StoppingCriteria):
                def __call__(self, input_ids, scores, **kw):
                    return torch.full((input_ids.shape[0],), cancelled(), dtype=torch.bool, device=input_ids.device)

            slot.forward = tapped_forward
            try:
                slot.generate(
                    **kwargs,
                    max_new_tokens=g.get("max_codes", 4096),
                    min_new_tokens=g.get("min_codes", 0),
                    do_sample=g.get("do_sample", True),
                    top_k=g.get("top_k", 50),
                    top_p=g.get("top_p", 1.0),
                    temperature=g.get("temperature", 0.9),
                    repetition_penalty=g.get("repetition_penalty", 1.05),
                    eos_token_id=self.tc.codec_eos_token_id,
                    suppress_tokens=self.suppress,
                    output_hidden_states=True,
                    return_dict_in_generate=True,
                    stopping_criteria=StoppingCriteriaList([Stop()]),
                )
                if cancelled():
                    raise Cancelled()
                flush(final=True)
            finally:
                self._release(slot)
                if generator_state is not None:
                    torch.random.set_rng_state(generator_state)
        stats.finished = time.monotonic()
        return stats
