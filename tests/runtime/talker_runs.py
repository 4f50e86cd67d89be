"""Syntheses run in process through a talker decode loop (the tests of batch.py and fixed.py)."""

from __future__ import annotations

import threading

import torch

from omni_runtime.payload import parse

from .helpers import text_payload


def request(model, codes=24, seed=7, response=None, **gen):
    body = text_payload(model, codes=codes)
    body["generation"].update(seed=seed, **gen)
    if response is not None:
        body["response_ids"] = response
    return parse(body)


class Run:
    """One synthesis submitted to the loop; `wait()` gives (result, pcm). With `streamed_from`,
    only that many response ids are known at first: `feed` takes the rest."""

    def __init__(self, loop, engine, req, streamed_from: int | None = None):
        from omni_runtime.talker.batch import Synthesis, TextFeed

        self.pcm = bytearray()
        self.result = None
        self._done = threading.Event()
        head = req if streamed_from is None else parse({"prompt_ids": req.prompt_ids,
                                                        "response_ids": req.response_ids[:streamed_from]})
        self.feed = TextFeed.of(engine, head, complete=streamed_from is None)
        self.synthesis = Synthesis(req, self.feed, self.pcm.extend, self._finish)
        loop.submit(self.synthesis)

    def _finish(self, result):
        self.result = result
        self._done.set()

    def wait(self, timeout=120):
        assert self._done.wait(timeout), "synthesis did not finish"
        return self.result, bytes(self.pcm)

    def codes(self):
        return torch.stack(self.synthesis.codes)
