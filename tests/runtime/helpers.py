"""Client helpers for the runtime tests (aiohttp, run synchronously)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import struct
import wave

import aiohttp


def run(coro):
    return asyncio.run(coro)


def chat_prompt_ids(model_dir, messages) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def text_payload(model_dir, codes: int = 30, fmt: str = "wav", **extra) -> dict:
    ids = chat_prompt_ids(model_dir, [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Say hello."}])
    body = {"v": 1, "speaker": "Ethan", "prompt_ids": ids, "response_ids": [72, 105, 33, 32, 111, 107],
            "generation": {"max_codes": codes, "min_codes": codes, "seed": 7}, "format": fmt}
    body.update(extra)
    return body


async def post_stream(url: str, body, headers=None, timeout: float = 120):
    """POST and read the whole (streamed) body: (status, headers, bytes, chunk_count)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with s.post(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}) as r:
            chunks = []
            async for c in r.content.iter_any():
                chunks.append(c)
            return r.status, dict(r.headers), b"".join(chunks), len(chunks)


def sine_wav(seconds: float = 0.5, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        n = int(seconds * rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(n)))
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sse_events(raw: bytes) -> list:
    out = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].strip()
                out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def answered(proc, code: int) -> float:
    """How many requests `proc` answered with `code` (its omni_requests_total)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(proc.metrics_text()) for s in family.samples
               if s.name == "omni_requests_total" and s.labels.get("code") == str(code))
