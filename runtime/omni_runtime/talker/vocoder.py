"""code2wav on its own thread: the chunks the decode loop (batch.py) hands over, decoded in
batches (code2wav.py), each synthesis' audio and end delivered in order."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from omni_runtime.talker.code2wav import Code2WavBatches

log = logging.getLogger("omni.talker")


class Worker:
    """A daemon thread running `_run`, woken through `cond`, stopped with `stop`."""

    def __init__(self, name: str):
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def stop(self, wait: float = 10.0) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join(wait)


class Vocoder(Worker):
    """code2wav on its own thread (and its own CUDA stream), so decoding never waits for audio:
    jobs of one synthesis run in order, the chunks queued meanwhile by all syntheses are decoded
    together (code2wav.py)."""

    def __init__(self, engine, graphed: bool = False):
        super().__init__("talker-vocoder")  # stop() lets it finish the queued jobs first
        self.engine = engine
        self.batches = Code2WavBatches(engine, buckets=graphed, graphs=graphed)
        self.stream = engine.torch.cuda.Stream(engine.device) if engine.device.type == "cuda" else None
        self.jobs: list[tuple] = []
        self.thread.start()

    def warm(self) -> None:
        with self.engine.torch.inference_mode(), self._on_stream():
            self.batches.warm()

    def decode(self, s, start: int, end: int) -> None:
        self._put(("pcm", s, start, end))

    def finish(self, s, result) -> None:
        self._put(("done", s, result))

    def backlog(self) -> int:
        with self.cond:
            return len(self.jobs)

    def _put(self, job) -> None:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify()

    def _run(self) -> None:
        torch = self.engine.torch
        while True:
            with self.cond:
                while not self.jobs and not self.stopped:
                    self.cond.wait()
                if not self.jobs:
                    return
                jobs, self.jobs = self.jobs, []
            spans = [j for j in jobs if j[0] == "pcm" and not j[1].cancel.is_set()]
            ready: dict[int, bytes] = {}
            handled: set[int] = set()
            try:
                with torch.inference_mode(), self._on_stream():
                    for done in self.batches.calls([(s.codes, a, b) for _, s, a, b in spans]):
                        ready.update((id(spans[i]), pcm) for i, pcm in done.items())
                        self._hand_out(jobs, ready, handled)  # first chunks go out before longer ones decode
            except Exception as exc:  # noqa: BLE001 - fails the syntheses whose audio it was
                log.exception("code2wav failed for %d chunk(s)", len(spans))
                for _, s, _a, _b in spans:
                    s.cancel.set()
                    s.done(exc)
            self._hand_out(jobs, ready, handled, last=True)  # the rest, and the ends of the others

    def _hand_out(self, jobs: list, ready: dict, handled: set, last: bool = False) -> None:
        """Emit what is decoded and end what is over, each synthesis' jobs in their order: a job
        waits while an earlier one of its synthesis is still being decoded."""
        waiting = set()
        for job in jobs:
            s = job[1]
            if id(job) in handled or s in waiting:
                continue
            if job[0] == "done":
                s.done(job[2])
            elif id(job) in ready:
                if not s.finished:
                    self._emit(s, ready[id(job)])
            elif not last and not s.cancel.is_set():
                waiting.add(s)
                continue
            handled.add(id(job))

    def _on_stream(self):
        torch = self.engine.torch
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    @staticmethod
    def _emit(s, chunk: bytes) -> None:
        if not chunk:
            return
        if s.stats.first_audio is None:
            s.stats.first_audio = time.monotonic()
        s.stats.samples += len(chunk) // 2
        s.emit(chunk)
