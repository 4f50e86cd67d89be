"""Which rows of a vLLM batch are a request's multimodal states, and collecting them.

Pure bookkeeping for the vLLM plugin (`vllm_plugin.py`), kept free of vLLM so it can be
tested on its own. A model-runner step computes the scheduled tokens of all its requests
flattened into one tensor: request i contributes `num_scheduled[i]` rows for prompt
positions `num_computed[i] ..`. The talker needs the rows at the prompt's multimodal
positions (audio/image/video pad tokens), in prompt order, possibly spread over several
steps (chunked prefill) and recomputed after a preemption.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field

# vLLM 0.32 schedules a chat request as "chatcmpl-<X-Request-Id>-<8 random hex>"; parallel
# sampling (n > 1) prefixes "<index>_".
_VLLM_ID = re.compile(r"^(?:\d+_)?(?:chatcmpl-)?(?P<rid>.+)-[0-9a-f]{8}$")
RID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def external_request_id(vllm_request_id: str) -> str:
    """The caller's X-Request-Id from the id vLLM schedules."""
    m = _VLLM_ID.match(vllm_request_id)
    if m:
        return m.group("rid")
    return vllm_request_id.removeprefix("chatcmpl-")


def mm_positions(prompt_ids, mm_token_ids) -> list[int]:
    """Prompt positions holding a multimodal placeholder token, ascending."""
    return [i for i, t in enumerate(prompt_ids) if t in mm_token_ids]


def prefix_key(prompt_ids, positions: list[int], identifiers) -> str:
    """Identifies the states: a causal model's rows at `positions` depend only on the
    tokens up to the last one and on the media behind the placeholders."""
    h = hashlib.sha256()
    h.update(",".join(map(str, prompt_ids[: positions[-1] + 1])).encode())
    for ident in identifiers:
        h.update(b"|" + str(ident).encode())
    return h.hexdigest()


def item_groups(positions: list[int], ranges) -> list[list[int]]:
    """`positions` split by multimodal item: `ranges` are the items' (offset, length)
    placeholder ranges in prompt order; each group holds the positions inside one range."""
    return [[p for p in positions if offset <= p < offset + length] for offset, length in ranges]


def item_keys(prompt_ids, groups: list[list[int]], identifiers) -> list[str]:
    """One key per item: its rows depend on the tokens up to its last position and on the
    media of it and every item before it (a causal model), never on what follows. So an
    item keeps its key when later turns are appended to the conversation."""
    return [prefix_key(prompt_ids, group, identifiers[:i + 1]) if group else ""
            for i, group in enumerate(groups)]


def step_rows(starts, counts, positions_of) -> list[tuple[int, list[int], list[int]]]:
    """For one step: [(request index, batch rows, prompt positions)] of the multimodal
    tokens it computes. `starts[i]`/`counts[i]`: first position and number of tokens
    scheduled for request i; `positions_of(i)`: its sorted multimodal positions (or None)."""
    out, offset = [], 0
    for i, (start, n) in enumerate(zip(starts, counts)):
        pos = positions_of(i)
        if pos:
            lo, hi = bisect.bisect_left(pos, start), bisect.bisect_left(pos, start + n)
            if hi > lo:
                sel = pos[lo:hi]
                out.append((i, [offset + p - start for p in sel], sel))
        offset += n
    return out


@dataclass
class Capture:
    """The multimodal rows of one request, filled as steps compute them."""

    rid: str
    positions: list[int]
    meta: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)  # position -> row (a 1-D tensor)
    done: bool = False
    items: list[tuple[str, list[int]]] = field(default_factory=list)  # (item key, its positions)

    def add(self, positions: list[int], rows) -> None:
        # A recomputed position (after preemption) replaces the earlier row.
        for p, r in zip(positions, rows):
            self.rows[p] = r

    def missing_before(self, start: int) -> list[int]:
        """Positions below `start` never computed here (served from the prefix cache)."""
        return [p for p in self.positions if p < start and p not in self.rows]

    @property
    def complete(self) -> bool:
        return len(self.rows) == len(self.positions)

    def assemble(self):
        import torch

        return torch.stack([self.rows[p] for p in self.positions])


class StatesCache:
    """Recently exported states of each multimodal item by its key (item_keys), so a request
    whose multimodal prefix vLLM serves from its prefix cache (rows never computed) still gets
    them: the same prompt again, or a conversation that grew by later turns. Bounded in bytes,
    least recently used dropped first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[object, dict, int]] = OrderedDict()

    def get(self, key: str):
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0], item[1]

    def put(self, key: str, tensor, meta: dict, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        self._items[key] = (tensor, meta, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, _, n) = self._items.popitem(last=False)
            self.bytes -= n

    def __len__(self) -> int:
        return len(self._items)
