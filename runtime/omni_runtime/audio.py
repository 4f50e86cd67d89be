"""WAV/PCM helpers (no numpy needed for the framing)."""

from __future__ import annotations

import io
import struct
import wave

STREAMING_SIZE = 0xFFFFFFFF  # RIFF/data size of a WAV whose length is not known yet


def wav_header(sample_rate: int, n_samples: int | None = None, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte PCM WAV header. With n_samples=None the sizes are 0xFFFFFFFF, the usual
    marker for a stream; players and decoders read until the connection ends."""
    block = channels * bits // 8
    if n_samples is None:
        data_size = riff_size = STREAMING_SIZE
    else:
        data_size = n_samples * block
        riff_size = 36 + data_size
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
        + b"data" + struct.pack("<I", data_size)
    )


def parse_wav_header(data: bytes) -> dict:
    """Read a PCM WAV header (streaming sizes allowed); returns rate, channels, bits, data offset."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE stream")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            tag, ch, rate, _byte_rate, _block, bits = struct.unpack("<HHIIHH", data[body:body + 16])
            fmt = {"format_tag": tag, "channels": ch, "sample_rate": rate, "bits": bits}
        elif cid == b"data":
            if fmt is None:
                raise ValueError("data chunk before fmt chunk")
            fmt["data_offset"] = body
            fmt["data_size"] = size
            return fmt
        if size == STREAMING_SIZE:
            break
        pos = body + size + (size & 1)
    raise ValueError("no data chunk")


def decode_wav(data: bytes):
    """Decode a PCM WAV file to (float32 mono numpy array, sample_rate)."""
    import numpy as np

    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            frames = w.readframes(n)
    except (wave.Error, EOFError, struct.error) as exc:
        raise ValueError(f"not a readable PCM WAV file: {exc}") from exc
    if width == 2:
        x = np.frombuffer(frames, dtype="<i2").astype("float32") / 32768.0
    elif width == 1:
        x = (np.frombuffer(frames, dtype="u1").astype("float32") - 128.0) / 128.0
    elif width == 4:
        x = np.frombuffer(frames, dtype="<i4").astype("float32") / 2147483648.0
    else:
        raise ValueError(f"unsupported WAV sample width {width}")
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return x, rate


def resample_linear(x, rate: int, target: int):
    import numpy as np

    if rate == target or len(x) == 0:
        return x
    n = max(1, int(round(len(x) * target / rate)))
    return np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype("float32")
