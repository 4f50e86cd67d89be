"""Real speech for the realtime tests and benchmark: espeak-ng (Debian; `make system-tools`
installs it) speaks a sentence, returned as PCM16 mono at the rate asked for."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np


def espeak_pcm16(text: str, rate: int = 24000, voice: str = "en-us", words_per_minute: int = 175) -> bytes:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is missing: `make system-tools` installs it (Debian package espeak-ng)")
    wav = subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "--stdout", text], capture_output=True,
                         check=True, timeout=60).stdout
    with wave.open(io.BytesIO(wav)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
        source = w.getframerate()
    from omni_runtime.gateway.realtime.resample import Resampler, float_to_pcm16

    r = Resampler(source, rate)
    return float_to_pcm16(np.concatenate([r.process(x), r.flush()]))


def silence(seconds: float, rate: int = 24000) -> bytes:
    return bytes(2 * int(seconds * rate))
