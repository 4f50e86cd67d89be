"""PCM16 <-> float samples, and a streaming rational resampler.

Realtime input is PCM16 mono at 24 kHz; the thinker's audio encoder (Whisper features) and
the VAD take 16 kHz. Linear interpolation would fold the 8-12 kHz band of the input back
into the speech band, so the resampler is a polyphase windowed-sinc FIR (Kaiser window),
fed chunk by chunk: a stream resampled in pieces equals the stream resampled at once.
"""

from __future__ import annotations

from math import gcd

import numpy as np

MODEL_RATE = 16000    # what the thinker's audio encoder and the VAD take
TAPS_PER_PHASE = 24   # FIR taps per output sample: ~0.5 ms of input context at 24 kHz
ROLLOFF = 0.92        # pass band edge as a fraction of the lower Nyquist frequency
KAISER_BETA = 8.0     # about 80 dB of stop band attenuation


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian PCM16 bytes (even length) -> float32 samples in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()


class Resampler:
    """`rate_in` -> `rate_out` on consecutive float32 chunks. The output lags the input by
    the filter's half length (TAPS_PER_PHASE / 2 input samples); `flush()` returns it."""

    def __init__(self, rate_in: int, rate_out: int, taps_per_phase: int = TAPS_PER_PHASE):
        if rate_in <= 0 or rate_out <= 0:
            raise ValueError("sample rates must be positive")
        g = gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        self.identity = self.up == self.down
        k = taps_per_phase
        self.k = k
        n = k * self.up
        # the prototype low-pass at the upsampled rate, cut below the lower of the two Nyquists
        cutoff = ROLLOFF * 0.5 / max(self.up, self.down)  # cycles per upsampled sample
        t = np.arange(n) - (n - 1) / 2
        h = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(n, KAISER_BETA) * self.up
        self.phases = h.reshape(k, self.up).T.astype(np.float32)  # phases[p, j] = h[p + j * up]
        self.history = np.zeros(k - 1, dtype=np.float32)  # input before the first sample is silence
        self.base = -(k - 1)   # stream index of history[0]
        self.next_out = 0      # stream index of the next output sample

    def process(self, x: np.ndarray) -> np.ndarray:
        if self.identity:
            return np.asarray(x, dtype=np.float32)
        self.history = np.concatenate([self.history, np.asarray(x, dtype=np.float32)])
        total = self.base + len(self.history)  # input samples seen
        # output m needs input sample floor(m * down / up), which must exist: m * down < total * up
        end = (total * self.up + self.down - 1) // self.down
        if end <= self.next_out:
            return np.zeros(0, dtype=np.float32)
        m = np.arange(self.next_out, end)
        at = m * self.down
        newest = at // self.up - self.base  # history index of each output's newest input sample
        window = self.history[newest[:, None] - np.arange(self.k)[None, :]]
        y = np.einsum("ij,ij->i", self.phases[at % self.up], window).astype(np.float32)
        self.next_out = end
        keep_from = (end * self.down) // self.up - (self.k - 1) - self.base
        if keep_from > 0:
            self.history = self.history[keep_from:]
            self.base += keep_from
        return y

    def flush(self) -> np.ndarray:
        """The tail still inside the filter (half its length of silence pushed through)."""
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        return self.process(np.zeros(self.k // 2, dtype=np.float32))


def to_model_rate(pcm24k: bytes, rate: int = 24000) -> bytes:
    """A whole PCM16 clip at `rate` -> PCM16 at MODEL_RATE."""
    r = Resampler(rate, MODEL_RATE)
    x = pcm16_to_float(pcm24k)
    return float_to_pcm16(np.concatenate([r.process(x), r.flush()]))
