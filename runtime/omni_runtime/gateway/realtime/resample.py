"""PCM16 <-> float samples, and a streaming rational resampler.

Realtime input is PCM16 mono at 24 kHz; the thinker's audio encoder (Whisper features) and
the VAD take 16 kHz. Linear interpolation would fold the 8-12 kHz band of the input back
into the speech band, so the resampler is a windowed-sinc FIR (Kaiser window) at the common
rate, fed chunk by chunk: a stream resampled in pieces equals the stream resampled at once.
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
    """`rate_in` -> `rate_out` on consecutive float32 chunks: zero-stuff by `up`, low-pass,
    keep every `down`-th sample (numpy's convolution does the filtering in C). The output
    lags the input by the filter's half length (TAPS_PER_PHASE / 2 input samples); `flush()`
    returns that tail."""

    def __init__(self, rate_in: int, rate_out: int, taps_per_phase: int = TAPS_PER_PHASE):
        if rate_in <= 0 or rate_out <= 0:
            raise ValueError("sample rates must be positive")
        g = gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        self.identity = self.up == self.down
        self.k = taps_per_phase
        n = taps_per_phase * self.up
        # the low-pass at the upsampled rate, cut below the lower of the two Nyquist frequencies
        cutoff = ROLLOFF * 0.5 / max(self.up, self.down)  # cycles per upsampled sample
        t = np.arange(n) - (n - 1) / 2
        self.taps = (2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(n, KAISER_BETA) * self.up).astype(np.float32)
        self.tail = np.zeros(n - 1, dtype=np.float32)  # the upsampled stream before the next chunk (silence at first)
        self.at = 0        # upsampled-stream index of the next chunk's first sample
        self.next_out = 0  # upsampled-stream index of the next output sample (a multiple of `down`)

    def process(self, x: np.ndarray) -> np.ndarray:
        if self.identity:
            return np.asarray(x, dtype=np.float32)
        stuffed = np.zeros(len(x) * self.up, dtype=np.float32)
        stuffed[::self.up] = x
        stream = np.concatenate([self.tail, stuffed])
        first, self.at = self.at, self.at + len(stuffed)  # the filter's output i is stream index first + i
        self.tail = stream[len(stream) - len(self.tail):]
        skip = self.next_out - first
        if skip >= len(stuffed):
            return np.zeros(0, dtype=np.float32)
        y = np.convolve(stream, self.taps, mode="valid")[skip::self.down]
        self.next_out += len(y) * self.down
        return y.astype(np.float32, copy=False)

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
