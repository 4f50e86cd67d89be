"""A session's conversation: its items, in order, and the chat messages they make for the
thinker. Every turn sends the whole conversation, so the thinker's prefix cache serves
what earlier turns already computed (the same replica takes the session's turns).

User audio is kept as the thinker takes it (WAV, 16 kHz, base64), encoded once when the
item is made, so a turn's request is the same bytes as the previous turn's up to the new
items: vLLM keys its multimodal cache by the audio's content.

Pure: no I/O.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from omni_runtime.audio import wav_header
from omni_runtime.gateway.realtime.protocol import ProtocolError, check_keys, new_id, pcm16, string
from omni_runtime.gateway.realtime.resample import MODEL_RATE, to_model_rate

ROLES = ("user", "assistant", "system")
PART_TYPES = {"user": ("input_text", "input_audio"), "assistant": ("output_text", "output_audio", "text"),
              "system": ("input_text",)}


@dataclass
class Part:
    type: str               # input_text | input_audio | output_text | output_audio
    text: str = ""          # the text, or the transcript of output_audio
    wav_b64: str = ""       # input_audio: the audio as the thinker takes it
    seconds: float = 0.0    # input_audio: its length

    def to_json(self) -> dict:
        if self.type == "input_audio":
            return {"type": "input_audio", "transcript": None}  # the audio is not echoed back
        if self.type == "output_audio":
            return {"type": "output_audio", "transcript": self.text}
        return {"type": self.type, "text": self.text}


@dataclass
class Item:
    id: str
    role: str
    parts: list[Part] = field(default_factory=list)
    status: str = "completed"

    def to_json(self) -> dict:
        return {"id": self.id, "object": "realtime.item", "type": "message", "status": self.status,
                "role": self.role, "content": [p.to_json() for p in self.parts]}

    @property
    def audio_seconds(self) -> float:
        return sum(p.seconds for p in self.parts)

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts)


def audio_part(pcm16k: bytes) -> Part:
    """An input_audio part from 16 kHz PCM16."""
    wav = wav_header(MODEL_RATE, len(pcm16k) // 2) + pcm16k
    return Part("input_audio", wav_b64=base64.b64encode(wav).decode(), seconds=len(pcm16k) / 2 / MODEL_RATE)


def parse_item(obj) -> Item:
    """The item of a conversation.item.create: a user, assistant or system message."""
    it = check_keys(obj, ("id", "type", "object", "role", "content", "status"), "item")
    if it.get("type", "message") != "message":
        raise ProtocolError("unsupported_parameter", "item.type: only message items are served (no function "
                                                     "calls)", "item.type")
    role = it.get("role")
    if role not in ROLES:
        raise ProtocolError("invalid_value", "item.role must be user, assistant or system", "item.role")
    item_id = string(it["id"], "item.id", 32) if it.get("id") is not None else new_id("item")
    content = it.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError("invalid_value", "item.content must be a non-empty list", "item.content")
    parts = []
    for i, raw in enumerate(content):
        where = f"item.content[{i}]"
        part = check_keys(raw, ("type", "text", "audio", "transcript"), where)
        kind = part.get("type")
        if kind not in PART_TYPES[role]:
            raise ProtocolError("invalid_value", f"{where}.type: a {role} message takes "
                                                 f"{', '.join(PART_TYPES[role])}", f"{where}.type")
        if kind == "input_audio":
            raw_pcm = pcm16(part.get("audio"), f"{where}.audio")
            if not raw_pcm:
                raise ProtocolError("invalid_value", f"{where}.audio is empty", f"{where}.audio")
            parts.append(audio_part(to_model_rate(raw_pcm)))
        elif kind == "output_audio":  # assistant audio for priming: only its transcript is used
            parts.append(Part("output_audio", text=string(part.get("transcript", ""), f"{where}.transcript",
                                                          200_000, empty=True)))
        else:
            parts.append(Part("output_text" if kind == "text" else kind,
                              text=string(part.get("text", ""), f"{where}.text", 200_000, empty=True)))
    return Item(item_id, role, parts)


class Conversation:
    """The items of one session, and the limits that keep it bounded: beyond `max_audio_seconds`
    of user audio, `max_items` items or `max_text_chars` characters of text, the oldest items
    are dropped (`insert` returns them)."""

    def __init__(self, max_audio_seconds: float, max_items: int, max_text_chars: int):
        self.items: list[Item] = []
        self.max_audio_seconds, self.max_items, self.max_text_chars = max_audio_seconds, max_items, max_text_chars

    def index(self, item_id: str) -> int:
        for i, item in enumerate(self.items):
            if item.id == item_id:
                return i
        raise ProtocolError("item_not_found", f"no item {item_id[:40]!r} in the conversation", "item_id")

    def get(self, item_id: str) -> Item:
        return self.items[self.index(item_id)]

    def insert(self, item: Item, previous_item_id: str | None = None) -> tuple[str | None, list[Item]]:
        """Add `item` after `previous_item_id` ("root": first; None: last). (the id of the
        item now before it, the items dropped to keep the limits)."""
        if any(i.id == item.id for i in self.items):
            raise ProtocolError("invalid_value", f"item id {item.id!r} is already in the conversation", "item.id")
        if previous_item_id is None:
            at = len(self.items)
        elif previous_item_id == "root":
            at = 0
        else:
            at = self.index(previous_item_id) + 1
        self.items.insert(at, item)
        dropped = self._keep_limits(keep=item)
        pos = self.items.index(item)
        return (self.items[pos - 1].id if pos else None), dropped

    def _keep_limits(self, keep: Item) -> list[Item]:
        dropped = []
        while len(self.items) > 1 and (len(self.items) > self.max_items or
                                       sum(i.audio_seconds for i in self.items) > self.max_audio_seconds or
                                       sum(len(i.text) for i in self.items) > self.max_text_chars):
            victim = self.items[0] if self.items[0] is not keep else self.items[1]
            if victim.status == "in_progress":
                break  # the response being written stays
            self.items.remove(victim)
            dropped.append(victim)
        return dropped

    def delete(self, item_id: str) -> Item:
        return self.items.pop(self.index(item_id))

    @property
    def last_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    @property
    def has_audio(self) -> bool:
        return any(p.type == "input_audio" for i in self.items for p in i.parts)

    def messages(self, instructions: str) -> list[dict]:
        """The chat messages of the whole conversation, the instructions as the system
        message first; assistant turns with no text (nothing was said) are left out."""
        out = [{"role": "system", "content": instructions}] if instructions else []
        for item in self.items:
            if item.status == "in_progress":
                continue
            if item.role != "user":
                if item.text:
                    out.append({"role": item.role, "content": item.text})
                continue
            content = [{"type": "input_audio", "input_audio": {"data": p.wav_b64, "format": "wav"}}
                       if p.type == "input_audio" else {"type": "text", "text": p.text} for p in item.parts]
            if all(c["type"] == "text" for c in content):
                out.append({"role": "user", "content": "".join(c["text"] for c in content)})
            else:
                out.append({"role": "user", "content": content})
        return out
