"""The streamed talker request body (`Content-Type: application/x-ndjson`): payload v1 as
the head line with the response ids known so far, `{"ids": [...]}` lines as the thinker
emits more, `{"end": true}` once its answer is complete. A body that stops without the end
line tells the talker the text was abandoned.

`IdFeed` holds what has been said so far, so a failover can start the body over on another
talker: every `body()` replays from the head line.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

NDJSON = "application/x-ndjson"


def line(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


END_LINE = line({"end": True})


class IdFeed:
    """The ids a talker body carries after its head line, and whether the text ended
    (`end()`) or was abandoned (`abort()`); either is final, the first one wins."""

    def __init__(self, head: dict):
        if not head.get("response_ids"):
            raise ValueError("the head line needs at least one response id")
        self.head = line(head)
        self.ids: list[int] = []
        self.ended = False
        self.aborted = False
        self._changed = asyncio.Event()  # set and replaced on every change

    @property
    def closed(self) -> bool:
        return self.ended or self.aborted

    def add(self, ids: list[int]) -> None:
        if ids and not self.closed:
            self.ids += ids
            self._wake()

    def end(self) -> None:
        if not self.closed:
            self.ended = True
            self._wake()

    def abort(self) -> None:
        if not self.closed:
            self.aborted = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def body(self) -> AsyncIterator[bytes]:
        """One request body: the head line, every id from the first on, then the end line;
        returns without it once aborted."""
        yield self.head
        sent = 0
        while not self.aborted:
            if len(self.ids) > sent:
                new = self.ids[sent:]
                sent += len(new)
                yield line({"ids": new})
            elif self.ended:
                yield END_LINE
                return
            else:
                await self._changed.wait()
