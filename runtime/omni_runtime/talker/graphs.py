"""CUDA graphs of the talker's fixed-shape steps, one per bucket.

A step function reads only preallocated input buffers and writes only preallocated output
buffers, so replaying what it launched once replays the step. On CUDA the first call for a
key warms the step up on a side stream (lazy initialisation, allocator) and captures it into
a `torch.cuda.CUDAGraph`; later calls replay it. Everywhere else (CPU, or graphs switched
off) the same function simply runs: the tests on CPU run exactly the Python that is captured
on a GPU.

Why raw `torch.cuda.CUDAGraph` and not `torch.compile(mode="reduce-overhead")`: the captured
code is the code the CPU tests check, with no compiler in between; capture costs one step per
bucket instead of an inductor compile (minutes for a 20-layer MoE, per shape); and the buckets
and the memory pool are explicit, so start-up time and memory are predictable. All graphs share
one memory pool: they never run concurrently, so their intermediates can overlap.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Hashable

log = logging.getLogger("omni.talker")


class StepGraphs:
    """Replays of fixed-shape step functions, keyed by bucket."""

    def __init__(self, torch, device, capture: bool):
        self.torch = torch
        self.capture = bool(capture) and device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: dict[Hashable, object] = {}
        self.capture_seconds = 0.0

    def __contains__(self, key: Hashable) -> bool:
        return key in self.graphs

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        """Run `step`: replay its graph on CUDA (`ensure` must have captured it)."""
        if self.capture:
            self.graphs[key].replay()
        else:
            step()

    def ensure(self, key: Hashable, step: Callable[[], None], neutral: Callable[[], None] = lambda: None) -> None:
        """Capture `step` under `key` if it is not yet (no-op without capture). Call it before
        writing the step's real inputs: `neutral()` first sets inputs whose warm-up run changes
        no state that matters, since the warm-up really runs."""
        if not self.capture or key in self.graphs:
            return
        torch = self.torch
        t0 = time.monotonic()
        neutral()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the graph: cuBLAS handles, lazy module state
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the decode and vocoder threads each capture and replay their own graphs
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            step()
        self.graphs[key] = graph
        took = time.monotonic() - t0
        self.capture_seconds += took
        log.info("captured talker graph %s in %.2fs", key, took)
