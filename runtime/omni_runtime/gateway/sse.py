"""Server-sent events as OpenAI streams them, and what the gateway reads from a thinker's
stream for speech (pure: no I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DONE = b"data: [DONE]\n\n"


def event(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def error_event(message: str, kind: str, code: int) -> bytes:
    return event({"error": {"message": message, "type": kind, "code": code}})


def split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """The `data:` payloads of the complete events in `buf` ([DONE] left out), and the
    incomplete rest to prepend to the next read."""
    out = []
    while b"\n\n" in buf:
        block, buf = buf.split(b"\n\n", 1)
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data and data != b"[DONE]":
                    out.append(data)
    return out, buf


@dataclass
class ThinkerReply:
    """What a thinker's chat stream said, accumulated chunk by chunk: the text, the token
    ids (vLLM's `return_token_ids`: `prompt_token_ids` once, `token_ids` per choice chunk),
    the finish reason, usage and the model name."""

    model: str | None = None
    text: str = ""
    prompt_ids: list[int] | None = None
    response_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    usage: dict | None = None
    tokens_seen: bool = False  # a generated token arrived: the prompt's prefill is done
    error: str | None = None   # an `error` event (vLLM sends one when generation fails mid-stream)

    def feed(self, obj: dict) -> str:
        """Take one chunk; returns its text delta ('' when none)."""
        self.model = obj.get("model", self.model)
        if obj.get("error"):
            err = obj["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)
        if obj.get("prompt_token_ids") is not None:
            self.prompt_ids = obj["prompt_token_ids"]
        if obj.get("usage"):
            self.usage = obj["usage"]
        text = ""
        for ch in obj.get("choices") or []:
            if ch.get("token_ids"):
                self.response_ids += ch["token_ids"]
                self.tokens_seen = True
            delta = (ch.get("delta") or {}).get("content")
            if delta:
                text += delta
                self.tokens_seen = True
            if ch.get("finish_reason"):
                self.finish = ch["finish_reason"]
        self.text += text
        return text

    @property
    def complete(self) -> bool:
        """The answer ended as answers do: a finish reason and no error event."""
        return self.finish is not None and self.error is None
