"""Continuous batching for the talker: one decode thread per pod steps every active
synthesis together.

A synthesis joins after its own prefill and leaves when its codec ends, between steps.
One whose next text token has not arrived yet (streaming hand-off) sits out the steps
until it does, for at most `text_wait` seconds. Each synthesis keeps its own random
generator and sampling parameters, so its audio does not depend on what else shares the
batch, and a fixed seed gives the same audio whether the text came whole or streamed.

The device side of a step is a stepper's (DecodePlan): the fixed-shape path (fixed.py,
CUDA graphs on a GPU) or the eager one (eager.py); code2wav runs on the vocoder thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from omni_runtime.payload import PayloadError, TalkerRequest
from omni_runtime.talker.eager import EagerStepper
from omni_runtime.talker.engine import TalkerEngine
from omni_runtime.talker.fixed import FixedStepper
from omni_runtime.talker.sampling import Sampling
from omni_runtime.talker.vocoder import Vocoder, Worker

log = logging.getLogger("omni.talker")


DECODE_MODES = ("graphs", "fixed", "eager")


@dataclass(frozen=True)
class DecodePlan:
    """How the loop steps (OMNI_TALKER_DECODE): "graphs", fixed shapes replayed as CUDA graphs on
    CUDA (as "fixed" elsewhere); "fixed", fixed shapes without graphs; "eager", transformers'
    forward over a dynamic cache. With fixed shapes at most `slots` syntheses are in the loop at
    once (OMNI_MAX_INFLIGHT), each holding up to `max_tokens` positions (OMNI_TALKER_MAX_TOKENS:
    prompt and codes)."""

    mode: str = "graphs"
    slots: int = 16
    max_tokens: int = 8192

    def stepper(self, engine: TalkerEngine):
        if self.mode == "eager":
            return EagerStepper(engine)
        if self.mode in ("graphs", "fixed"):
            return FixedStepper(engine, self.slots, self.max_tokens, graphs=self.mode == "graphs")
        raise ValueError(f"unknown talker decode mode {self.mode!r} (one of {', '.join(DECODE_MODES)})")


class Cancelled(Exception):
    """The client went away or the pod is shutting down."""


class TextAbandoned(Exception):
    """The text stream ended without saying the answer was complete."""


class TextTimeout(Exception):
    """The next text token did not arrive within the wait."""


class TextFeed:
    """The text one synthesis speaks, as the thinker writes it: append-only, thread-safe.
    Ends at the first of `stop_ids` (the thinker's <|im_end|>)."""

    def __init__(self, stop_ids: set[int], vocab: int):
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._stop = stop_ids
        self._vocab = vocab
        self._ended = False
        self._abandoned: str | None = None
        self.on_change: Callable[[], None] = lambda: None

    @classmethod
    def of(cls, engine: TalkerEngine, req: TalkerRequest, complete: bool) -> "TextFeed":
        """The feed of `req`: what the prompt holds of the assistant turn, then its response ids;
        `complete` when no more ids will come."""
        vocab = engine.text_vocab
        if max(req.prompt_ids) >= vocab or max(req.response_ids) >= vocab:
            raise PayloadError(f"token id out of range for a vocabulary of {vocab}")
        feed = cls(engine.thinker_eos, vocab)
        feed.extend(engine.prompt_tail(req.prompt_ids) + list(req.response_ids))
        if complete:
            feed.end()
        return feed

    def _append(self, ids) -> None:
        for tok in ids:
            if tok in self._stop:
                self._ended = True
                return
            self._ids.append(tok)

    def extend(self, ids: list[int]) -> None:
        bad = next((t for t in ids if not 0 <= t < self._vocab), None)
        if bad is not None:  # caught here, so it fails this synthesis and not the batch it is in
            self.abandon(f"token id {bad} out of range for a vocabulary of {self._vocab}")
            return
        with self._lock:
            if not self._ended and self._abandoned is None:
                self._append(ids)
        self.on_change()

    def end(self) -> None:
        with self._lock:
            self._ended = True
        self.on_change()

    def abandon(self, reason: str) -> None:
        with self._lock:
            if not self._ended:
                self._abandoned = reason
        self.on_change()

    def first(self) -> int | None:
        with self._lock:
            return self._ids[0] if self._ids else None

    def at(self, k: int) -> tuple[bool, int | None, bool]:
        """(known, token, ended) for token k: (True, id, _) when it is there, (True, None, True)
        when the text ended before it, (False, None, False) while it is still to come."""
        with self._lock:
            if k < len(self._ids):
                return True, self._ids[k], False
            if self._ended:
                return True, None, k == len(self._ids)
            if self._abandoned is not None:
                raise TextAbandoned(self._abandoned)
            return False, None, False


@dataclass
class SynthesisStats:
    codes: int = 0
    samples: int = 0
    started: float = 0.0
    first_audio: float | None = None
    finished: float = 0.0


class Synthesis:
    """One request in the decode loop. `emit(pcm)` and `done(stats or exception)` are called
    on the vocoder thread, `done` exactly once; `cancel` may be set from any thread."""

    def __init__(self, req: TalkerRequest, feed: TextFeed, emit: Callable[[bytes], None],
                 done: Callable[[object], None]):
        self.req, self.feed, self.emit = req, feed, emit
        self._done, self._done_lock, self.finished = done, threading.Lock(), False
        self.cancel = threading.Event()
        self.stats = SynthesisStats(started=time.monotonic())
        self.sampling: Sampling | None = None
        self.length = 0               # cached positions (without batch padding)
        self.rope_delta = 0
        self.step = 0                 # decode steps taken; step k adds text token k+1
        self.generated = 0            # first-group codes so far (the codec end included)
        # the stepper's device state: the eager path's own cache, history and codec embedding
        # (eager.py), or the fixed-shape path's slot (fixed.py)
        self.kv: list | None = None
        self.seen = None
        self.codec_embed = None
        self.slot: int | None = None
        self.codes: list = []         # [groups] per frame, append-only
        self.decoded = 0              # frames handed to the vocoder
        self.next_flush = 0
        self.stalled_since: float | None = None

    def done(self, result) -> None:
        with self._done_lock:
            if self.finished:
                return
            self.finished = True
        self.stats.finished = time.monotonic()
        self._done(result)


class DecodeLoop(Worker):
    """The talker's decode thread. `submit` hands it a synthesis; `on_step(batch, stalled)`
    reports each step's batch size and how many syntheses wait for text."""

    def __init__(self, engine: TalkerEngine, text_wait: float = 30.0,
                 on_step: Callable[[int, int], None] = lambda batch, stalled: None,
                 plan: DecodePlan | None = None):
        super().__init__("talker-decode")
        self.engine = engine
        self.torch = engine.torch
        self.text_wait = text_wait
        self.on_step = on_step
        self.plan = plan or DecodePlan()
        self.stepper = self.plan.stepper(engine)
        self.pending: list[Synthesis] = []
        self.active: list[Synthesis] = []
        self.vocoder = Vocoder(engine, graphed=self.plan.mode == "graphs" and engine.device.type == "cuda")
        self.thread.start()

    def warm(self) -> None:
        """Capture the CUDA graphs of every bucket before the first request (no-op elsewhere)."""
        warm = getattr(self.stepper, "warm", None)
        if warm is not None:
            with self.torch.inference_mode():
                warm()
        self.vocoder.warm()

    def submit(self, s: Synthesis) -> None:
        s.feed.on_change = self.wake
        with self.cond:
            self.pending.append(s)
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def stop(self, wait: float = 10.0) -> None:
        super().stop(wait)
        self.vocoder.stop(wait)

    # -- the loop -------------------------------------------------------------------
    def _run(self) -> None:
        torch = self.torch
        while True:
            with self.cond:
                while not self.stopped and not self._admissible() and not self._anything_to_do():
                    self.cond.wait(timeout=0.25)
                if self.stopped:
                    break
                room = self.stepper.free_slots()  # the others wait for a synthesis to leave
                new, self.pending = self.pending[:room], self.pending[room:]
            with torch.inference_mode():
                started = []
                for s in new:
                    pre = self._guard([s], self._start, s)
                    if pre is not None:
                        started.append((s, pre))
                if started:
                    self._guard([s for s, _ in started], self._first_frames, started)
                ready = self._ready()
                if ready:
                    self._guard(ready, self._step, ready)
        for s in self.pending + self.active:
            self.vocoder.finish(s, Cancelled("talker is shutting down"))

    def _admissible(self) -> bool:
        """Under the condition: is a submitted synthesis waiting that has a slot to go to?"""
        return bool(self.pending) and self.stepper.free_slots() > 0

    def _anything_to_do(self) -> bool:
        """Under the condition: is a synthesis ready, cancelled, or past its text wait?"""
        now = time.monotonic()
        return any(self._next_for(s, now)[0] != "waiting" for s in self.active)

    def _next_for(self, s: Synthesis, now: float) -> tuple[str, Exception | None]:
        """What a synthesis needs: "ready" (its next text token is known), "waiting" for
        the thinker, or to end ("cancelled", "abandoned", "timed_out") with this error."""
        if s.cancel.is_set():
            return "cancelled", Cancelled("synthesis cancelled")
        try:
            known, _, _ = s.feed.at(s.step + 1)
        except TextAbandoned as exc:
            return "abandoned", exc
        if known:
            return "ready", None
        if s.stalled_since is not None and now - s.stalled_since > self.text_wait:
            return "timed_out", TextTimeout(f"the next text token did not arrive within {self.text_wait:g} s")
        return "waiting", None

    def _guard(self, rows: list[Synthesis], fn, arg):
        """Run one phase and return what it returns; an error fails the syntheses it touched
        (None then) and never the thread."""
        try:
            return fn(arg)
        except Exception as exc:  # noqa: BLE001 - reported to each request
            if not isinstance(exc, PayloadError):
                log.exception("talker decode step failed for %d synthesis(es)", len(rows))
            for s in rows:
                self._finish(s, exc)
            return None

    def _finish(self, s: Synthesis, result) -> None:
        """Out of the loop; `done` follows the audio still queued for the vocoder."""
        if s in self.active:
            self.active.remove(s)
        self.stepper.release(s)
        self.vocoder.finish(s, result)

    def _ready(self) -> list[Synthesis]:
        """The syntheses whose next text token is known; ends the cancelled, abandoned and
        timed-out ones."""
        now = time.monotonic()
        ready, stalled = [], 0
        for s in list(self.active):
            state, error = self._next_for(s, now)
            if error is not None:
                self._finish(s, error)
            elif state == "ready":
                s.stalled_since = None
                ready.append(s)
            else:
                if s.stalled_since is None:
                    s.stalled_since = now
                stalled += 1
        self.on_step(len(ready), stalled)
        return ready

    # -- phases ---------------------------------------------------------------------
    def _start(self, s: Synthesis):
        """Prefill one synthesis and hand its state to the stepper (None: it was cancelled)."""
        eng = self.engine
        if s.cancel.is_set():
            s.done(Cancelled("synthesis cancelled"))
            return None
        first = s.feed.first()
        if first is None:
            raise PayloadError("response_ids has no text before the end-of-turn token")
        s.sampling = Sampling.of(s.req.generation)
        s.next_flush = eng.chunks.first
        pre = eng.prefill(eng.prefill_inputs(s.req, [first]))
        s.length, s.rope_delta = pre.length, pre.rope_delta
        self.stepper.admit(s, pre)
        self.active.append(s)
        return pre

    def _first_frames(self, started: list) -> None:
        rows = [s for s, _ in started]
        self._land(rows, self.stepper.first_frame(rows, [pre for _, pre in started]))

    def _step(self, rows: list[Synthesis]) -> None:
        eng = self.engine
        text = []
        for s in rows:
            _, token, ended = s.feed.at(s.step + 1)
            text.append(eng.trailing_row(token, ended))
        frames = self.stepper.step(rows, text)
        for s in rows:
            s.length += 1
            s.step += 1
        self._land(rows, frames)

    def _land(self, rows: list[Synthesis], frames: list) -> None:
        """Each row's frame (first code group, all groups): rows that go on keep the codes and
        maybe hand the vocoder a chunk. The codec's end or max_codes end a row without a frame
        (transformers' generate stops there too); a full KV slot ends it after this frame."""
        eng, capacity = self.engine, self.stepper.capacity
        going, ended = [], []
        for s, (first, codes) in zip(rows, frames):
            s.generated += 1
            if first == eng.codec_eos or s.generated >= s.sampling.max_codes:
                ended.append(s)
                continue
            s.codes.append(codes)
            s.stats.codes += 1
            (ended if capacity is not None and s.length >= capacity else going).append(s)
        if ended:
            self._flush(ended, final=True)
            for s in ended:
                self._finish(s, s.stats)
        self._flush(going)

    def _flush(self, rows: list[Synthesis], final: bool = False) -> None:
        """Hand the vocoder the frames of rows that have enough new ones (all when `final`)."""
        for s in rows:
            n = len(s.codes)
            if n > s.decoded and (final or n >= s.next_flush):
                self.vocoder.decode(s, s.decoded, n)
                s.decoded = n
                s.next_flush = n + self.engine.chunks.every
