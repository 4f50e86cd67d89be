"""code2wav for the chunks of every active synthesis at once.

A chunk is codes[start:end] of one synthesis plus up to `left_context` earlier codes decoded
again for continuity and cut off afterwards. code2wav is causal: its convolutions and attention
look back, and its transposed convolutions look one frame ahead only within the samples they
keep, so padding a chunk on the right leaves the samples of its real frames as they were (up
to float rounding: 1e-7 on the tiny model in float32, below one PCM16 step). Chunks of
different lengths can therefore share one batch.

  shapes "exact" (CPU): chunks of the same frame count are decoded together, unpadded, so the
      audio is bit for bit what a chunk decoded alone gives;
  shapes "buckets" (CUDA graphs): chunks are right-padded to a frame bucket and batches to a
      row bucket, and each (rows, frames) pair is one CUDA graph (graphs.py). A batch of more
      rows than the largest row bucket is split.
"""

from __future__ import annotations

from omni_runtime.talker.graphs import StepGraphs
from omni_runtime.talker.slots import bucket

FRAME_BUCKETS = (8, 16, 32, 64)  # the default chunks are 4, 29 and 50 frames; longer ones run unpadded
ROW_BUCKETS = (1, 2, 4, 8)  # more rows per call only grow the activations (~1 GB at 8 x 64 on the real model)


class Code2WavBatches:
    """PCM16 of many chunks from one code2wav call per shape."""

    def __init__(self, engine, buckets: bool, graphs: bool):
        self.engine = engine
        self.torch = engine.torch
        self.buckets = buckets
        self.graphs = StepGraphs(engine.torch, engine.device, graphs and buckets)
        self.inputs: dict[tuple[int, int], object] = {}   # (rows, frames) -> codes [rows, groups, frames]
        self.outputs: dict[tuple[int, int], object] = {}  # -> float32 waveform [rows, samples]

    def pcm(self, spans: list[tuple[list, int, int]]) -> list[bytes]:
        """PCM16 little-endian of codes[start:end] for each (codes, start, end): the codes of one
        synthesis so far (each [groups], on any device)."""
        out: list[bytes] = [b""] * len(spans)
        for done in self.calls(spans):
            for i, pcm in done.items():
                out[i] = pcm
        return out

    def calls(self, spans: list[tuple[list, int, int]]):
        """`pcm` one code2wav call at a time, the shortest chunks first (a synthesis' first chunk
        is its shortest): yields {span index: PCM16} after each call."""
        left = self.engine.chunks.left_context
        chunks = []
        for codes, start, end in spans:
            ctx = min(left, start)
            chunks.append((codes[start - ctx:end], ctx))
        for rows, frames in sorted(self._batches([len(c) for c, _ in chunks]), key=lambda b: b[1]):
            wav = self._decode([chunks[i][0] for i in rows], frames)
            done = {}
            for j, i in enumerate(rows):
                codes, ctx = chunks[i]
                done[i] = self._pcm16(wav[j, ctx * self.engine.upsample:self._samples(len(codes))])
            yield done

    def warm(self) -> None:
        """Capture every (rows, frames) graph now (start-up) rather than at its first use."""
        if not self.graphs.capture:
            return
        for rows in ROW_BUCKETS:
            for frames in FRAME_BUCKETS:
                self._decode([[self.torch.zeros(self.engine.code_groups, dtype=self.torch.long)] * frames] * rows,
                             frames)

    # -- shapes ---------------------------------------------------------------------------
    def _batches(self, lengths: list[int]) -> list[tuple[list[int], int]]:
        """(chunk indices, padded frame count) per code2wav call."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            key = n if not self.buckets or n > FRAME_BUCKETS[-1] else bucket(n, list(FRAME_BUCKETS))
            groups.setdefault(key, []).append(i)
        if not self.buckets:
            return [(rows, frames) for frames, rows in groups.items()]
        top = ROW_BUCKETS[-1]
        return [(rows[k:k + top], frames) for frames, rows in groups.items() for k in range(0, len(rows), top)]

    def _samples(self, frames: int) -> int:
        """Samples code2wav gives for `frames` codes (its transposed convolutions trim a few)."""
        return self.engine.sample_count(frames)

    # -- decoding -------------------------------------------------------------------------
    def _decode(self, chunks: list, frames: int):
        torch, eng = self.torch, self.engine
        blocks = [torch.stack(c, dim=-1) for c in chunks]  # [groups, n] each
        if not self.buckets or frames > FRAME_BUCKETS[-1]:
            return eng.code2wav(torch.stack(blocks).to(eng.device))[:, 0].float()
        rows = bucket(len(blocks), list(ROW_BUCKETS))
        key = (rows, frames)
        if key not in self.inputs:
            self.inputs[key] = torch.zeros((rows, eng.code_groups, frames), dtype=torch.long, device=eng.device)
            self.outputs[key] = torch.zeros((rows, self._samples(frames)), dtype=torch.float32, device=eng.device)
        codes, wav = self.inputs[key], self.outputs[key]

        def run():
            wav.copy_(eng.code2wav(codes)[:, 0].float())

        self.graphs.ensure(key, run)
        codes.zero_()
        for j, b in enumerate(blocks):
            codes[j, :, :b.shape[-1]].copy_(b)
        self.graphs.run(key, run)
        return wav

    def _pcm16(self, wav) -> bytes:
        return (wav.clamp(-1, 1) * 32767.0).round().to(self.torch.int16).cpu().numpy().astype("<i2").tobytes()
