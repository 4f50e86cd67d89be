"""Talk to a Qwen3-Omni deployment over the OpenAI Realtime API: stream a WAV file as if it
were spoken into a microphone (real time, 20 ms chunks), print the answer's transcript as it
arrives and write the spoken answer to a WAV file.

    pip install "openai[realtime]" numpy
    python examples/realtime_client.py question.wav --url http://127.0.0.1:8080 --out answer.wav

The gateway's server VAD finds the end of the question (1 s of silence is streamed after the
file); `--manual` commits the audio and asks for the answer instead. The API key comes from
--api-key or OPENAI_API_KEY (any value when the gateway has no keys configured).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time
import wave

import numpy as np

RATE = 24000   # audio/pcm: PCM16 mono at 24 kHz, both ways
CHUNK = 480    # samples per append: 20 ms


def read_wav_24k(path: str) -> bytes:
    """Any PCM WAV -> PCM16 mono 24 kHz (linear interpolation: good enough for a demo)."""
    with wave.open(path, "rb") as w:
        width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        frames = w.readframes(w.getnframes())
    if width != 2:
        sys.exit(f"{path}: only 16-bit PCM WAV files are read (this one has {8 * width}-bit samples)")
    x = np.frombuffer(frames, "<i2").astype(np.float32)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    if rate != RATE:
        n = int(round(len(x) * RATE / rate))
        x = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x)
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


async def speak(conn, pcm: bytes, manual: bool) -> None:
    """Stream the question at 1x real time, then end the turn."""
    step = 2 * CHUNK
    if not manual:
        pcm += bytes(RATE * 2)  # a second of silence: the server VAD hears the question end
    start = time.monotonic()
    for n, i in enumerate(range(0, len(pcm), step)):
        await asyncio.sleep(max(0.0, start + n * CHUNK / RATE - time.monotonic()))
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())
    if manual:
        await conn.input_audio_buffer.commit()
        await conn.response.create()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wav", help="the question, a 16-bit PCM WAV file")
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway (its Service, or a port-forward)")
    ap.add_argument("--model", default=None, help="the served model name (default: the gateway's)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    ap.add_argument("--voice", default="Ethan", help="a speaker of the model (Qwen3-Omni: Ethan, Chelsie, Aiden)")
    ap.add_argument("--instructions", default="You are a helpful voice assistant. Answer briefly.")
    ap.add_argument("--manual", action="store_true", help="commit the turn instead of the server VAD")
    ap.add_argument("--out", default="answer.wav")
    args = ap.parse_args()

    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=args.api_key, base_url=args.url.rstrip("/") + "/v1")
    question = read_wav_24k(args.wav)
    audio = bytearray()
    connect = client.realtime.connect(model=args.model) if args.model else client.realtime.connect()
    async with connect as conn:
        await conn.session.update(session={
            "type": "realtime", "instructions": args.instructions, "output_modalities": ["audio"],
            "audio": {"input": {"turn_detection": None if args.manual else {"type": "server_vad"}},
                      "output": {"voice": args.voice}}})
        talking = asyncio.ensure_future(speak(conn, question, args.manual))
        sent = None
        async for event in conn:
            if event.type == "error":
                print(f"\nerror: {event.error.code}: {event.error.message}", file=sys.stderr)
            elif event.type == "input_audio_buffer.speech_stopped":
                print(f"[end of question heard at {event.audio_end_ms} ms]")
            elif event.type == "response.created":
                sent = time.monotonic()
            elif event.type == "response.output_audio_transcript.delta":
                print(event.delta, end="", flush=True)
            elif event.type == "response.output_audio.delta":
                if not audio and sent is not None:
                    print(f"\n[first audio {1000 * (time.monotonic() - sent):.0f} ms after the response started]")
                audio += base64.b64decode(event.delta)
            elif event.type == "response.done":
                print(f"\n[{event.response.status}; {event.response.usage.output_tokens} output tokens]")
                break
        talking.cancel()
    with wave.open(args.out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(bytes(audio))
    print(f"wrote {len(audio) / 2 / RATE:.1f} s of speech to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
