"""omni_runtime's vLLM plugin (entry point group `vllm.general_plugins`): export the
thinker's layer-`accept_hidden_layer` states at each request's multimodal positions, for
the talker (runtime/README.md, "Where the talker's inputs come from across pods").

Active only where OMNI_MM_STATES_DIR is set: the launcher sets it for the `vllm serve`
it runs and serves what lands there (mm_store.py). vLLM loads general plugins in every
process; the capture runs where the model runner lives (the engine-core worker).

How: vLLM's Qwen3-Omni thinker can return the hidden states of chosen layers next to its
output (its EAGLE-3 "auxiliary hidden states": `hidden_states + residual` after decoder
layer L-1, which is transformers' `hidden_states[L]`). Those are outputs of the compiled
graph, so they survive torch.compile and CUDA graphs, where a forward hook would not run.
The plugin turns them on for layer L in GPUModelRunner (CPUModelRunner subclasses it),
maps the batch's rows to requests with the scheduler's view (request order, tokens
scheduled, tokens already computed), and hands each request's rows to a writer thread
once all its multimodal positions are computed.

Limits: not with a speculative method that itself uses auxiliary states (EAGLE-3,
DFlash, extract_hidden_states), nor with pipeline parallelism; the plugin then logs why
and exports nothing (the launcher answers 404 and the gateway says so).
"""

from __future__ import annotations

import logging
import os
import queue
import threading

from omni_runtime.config import Env
from omni_runtime.thinker.mm_capture import (Capture, StatesCache, external_request_id, item_groups, item_keys,
                                             mm_positions, step_rows)
from omni_runtime.thinker.mm_store import encode_file, write_atomic

# Under vLLM's logger, so the messages appear in its log with its format.
log = logging.getLogger("vllm.omni_mm_states")

DEFAULT_CACHE_BYTES = 256 << 20
DTYPE_NAMES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}


def register() -> None:
    directory = os.environ.get(Env.MM_STATES_DIR)
    if not directory:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_omni_mm_states_patched", False):
        return
    GPUModelRunner._omni_mm_states_patched = True
    orig_setup = GPUModelRunner._setup_eagle3_aux_hidden_state_outputs
    orig_prepare = GPUModelRunner._prepare_inputs
    orig_execute = GPUModelRunner.execute_model

    # Both runners call this at the end of load_model, before compilation and warm-up.
    def setup(self):
        orig_setup(self)
        self._omni_exporter = Exporter.attach(self, directory)

    def prepare(self, scheduler_output, num_scheduled_tokens):
        ex = getattr(self, "_omni_exporter", None)
        if ex is not None:
            ex.plan_step(self, num_scheduled_tokens)
        return orig_prepare(self, scheduler_output, num_scheduled_tokens)

    def execute(self, scheduler_output, intermediate_tensors=None):
        out = orig_execute(self, scheduler_output, intermediate_tensors)
        ex = getattr(self, "_omni_exporter", None)
        if ex is not None:
            state = self.execute_model_state
            ex.collect(state.aux_hidden_states if state is not None else None)
            ex.forget(scheduler_output.finished_req_ids)
        return out

    GPUModelRunner._setup_eagle3_aux_hidden_state_outputs = setup
    GPUModelRunner._prepare_inputs = prepare
    GPUModelRunner.execute_model = execute


def feature_meta(mm_features) -> dict:
    """The talker's RoPE inputs (payload v1 `mm` fields) from vLLM's processed items, in
    prompt order."""
    meta = {"audio_feature_lengths": [], "image_grid_thw": [], "video_grid_thw": [], "video_second_per_grid": []}
    for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
        item = f.data
        if item is None:
            continue

        def value(key):
            return item[key].data if key in item else None

        if f.modality == "audio" and value("audio_feature_lengths") is not None:
            meta["audio_feature_lengths"].append(int(value("audio_feature_lengths").reshape(-1)[0]))
        elif f.modality == "image" and value("image_grid_thw") is not None:
            meta["image_grid_thw"].append([int(x) for x in value("image_grid_thw").reshape(-1).tolist()])
        elif f.modality == "video" and value("video_grid_thw") is not None:
            meta["video_grid_thw"].append([int(x) for x in value("video_grid_thw").reshape(-1).tolist()])
            spg = value("second_per_grid_ts")
            if spg is not None:
                meta["video_second_per_grid"].append(float(spg.reshape(-1)[0]))
    return {k: v for k, v in meta.items() if v}


class Writer(threading.Thread):
    """Serializes and writes exported states off the model runner's thread."""

    def __init__(self, directory: str, layer: int):
        super().__init__(name="omni-mm-states", daemon=True)
        self.directory, self.layer = directory, layer
        self.q: queue.Queue = queue.Queue()

    def run(self):
        import torch

        while True:
            rid, tensor, meta, error = self.q.get()
            try:
                if error:
                    blob = encode_file({"error": error})
                else:
                    dtype = DTYPE_NAMES[str(tensor.dtype)]
                    t = tensor.contiguous()
                    raw = (t.view(torch.int16) if dtype == "bfloat16" else t).numpy().tobytes()
                    blob = encode_file({"layer": self.layer, "dtype": dtype, "shape": list(t.shape), **meta}, raw)
                write_atomic(self.directory, rid, blob)
            except Exception:  # noqa: BLE001 - one bad request must not stop the thread
                log.exception("writing mm states of %s failed", rid)


class Exporter:
    def __init__(self, directory: str, layer: int, mm_ids: set[int], cache_bytes: int):
        self.layer = layer
        self.mm_ids = mm_ids
        self.captures: dict[str, Capture | None] = {}  # vLLM request id -> capture (None: no mm tokens)
        self.cache = StatesCache(cache_bytes)
        self.plan: list = []
        self.writer = Writer(directory, layer)
        self.writer.start()

    @classmethod
    def attach(cls, runner, directory: str) -> "Exporter | None":
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
        from vllm.model_executor.models.interfaces import supports_eagle3

        hf = runner.model_config.hf_config
        talker, thinker = getattr(hf, "talker_config", None), getattr(hf, "thinker_config", None)
        if talker is None or thinker is None:
            log.info("omni mm states: %s has no talker; nothing to export", type(hf).__name__)
            return None
        if runner.use_aux_hidden_state_outputs:
            log.warning("omni mm states: disabled, the speculative method already uses auxiliary hidden states")
            return None
        if get_pp_group().world_size > 1:
            log.warning("omni mm states: disabled under pipeline parallelism")
            return None
        if not supports_eagle3(runner.get_model()):
            log.warning("omni mm states: disabled, %s cannot return auxiliary hidden states",
                        type(runner.get_model()).__name__)
            return None
        layer = int(talker.accept_hidden_layer)
        deepstack = len(getattr(thinker.vision_config, "deepstack_visual_indexes", None) or [])
        if layer <= deepstack:
            # vLLM adds deepstack visual features to layer L-1's output before it is captured;
            # transformers records that output without them. Real checkpoints accept layer 24.
            log.warning("omni mm states: layer %d is within the %d deepstack layers: image/video rows include "
                        "the deepstack features transformers' hidden_states[%d] leaves out", layer, deepstack, layer)
        extra = runner.vllm_config.additional_config
        if not isinstance(extra, dict):
            log.warning("omni mm states: disabled, additional_config is not a dict (it keys the compile cache)")
            return None
        # The extra graph output must be part of vLLM's compile-cache key, or a thinker with
        # and one without the export would load each other's compiled graph.
        extra["omni_mm_states_aux_layers"] = [layer]
        runner.use_aux_hidden_state_outputs = True
        runner.get_model().set_aux_hidden_state_layers((layer,))
        # Every tensor-parallel rank holds the same rows; rank 0 exports them.
        if get_tensor_model_parallel_rank() != 0:
            return None
        mm_ids = {thinker.audio_token_id, thinker.image_token_id, thinker.video_token_id}
        cache_bytes = int(os.environ.get(Env.MM_STATES_CACHE_BYTES, DEFAULT_CACHE_BYTES))
        log.info("omni mm states: exporting layer %d at tokens %s into %s", layer, sorted(mm_ids), directory)
        return cls(directory, layer, mm_ids, cache_bytes)

    def _first_sight(self, req_id: str, req_state, start: int) -> Capture | None:
        prompt = req_state.prompt_token_ids
        positions = mm_positions(prompt, self.mm_ids) if prompt is not None else []
        if not positions:
            return None
        features = sorted(req_state.mm_features, key=lambda f: f.mm_position.offset)
        identifiers = [f.identifier for f in features]
        cap = Capture(external_request_id(req_id), positions, feature_meta(features))
        groups = item_groups(positions, [(f.mm_position.offset, f.mm_position.length) for f in features])
        cap.items = [(k, g) for k, g in zip(item_keys(prompt, groups, identifiers), groups) if g]
        for key, group in cap.items:  # items an earlier request exported (a conversation's earlier turns)
            cached = self.cache.get(key)
            if cached is not None:
                cap.add(group, cached[0].unbind(0))
        if cap.complete:
            self._publish(cap.rid, cap.assemble(), cap.meta)
            cap.rows, cap.done = {}, True
        elif cap.missing_before(start):
            self._fail(cap, "its multimodal prefix came from vLLM's prefix cache and its states are no longer held "
                            f"(raise {Env.MM_STATES_CACHE_BYTES})")
        return cap

    def plan_step(self, runner, num_scheduled_tokens) -> None:
        batch = runner.input_batch
        n = batch.num_reqs
        req_ids = batch.req_ids[:n]
        starts = batch.num_computed_tokens_cpu[:n].tolist()
        caps = []
        for req_id, start in zip(req_ids, starts):
            if req_id not in self.captures:
                self.captures[req_id] = self._first_sight(req_id, runner.requests[req_id], start)
            cap = self.captures[req_id]
            caps.append(cap if cap is not None and not cap.done else None)
        if not any(caps):
            self.plan = []
            return
        self.plan = [(caps[i], rows, pos) for i, rows, pos in
                     step_rows(starts, num_scheduled_tokens.tolist(), lambda i: caps[i].positions if caps[i] else None)]

    def collect(self, aux_hidden_states) -> None:
        plan, self.plan = self.plan, []
        if not plan or not aux_hidden_states:
            return
        import torch

        hidden = aux_hidden_states[0]
        rows = [r for _, rs, _ in plan for r in rs]
        # One gather and one device-to-host copy per step; index_select copies, so the
        # rows outlive the runner's reused buffers.
        picked = hidden.index_select(0, torch.tensor(rows, device=hidden.device)).to("cpu")
        offset = 0
        for cap, rs, pos in plan:
            cap.add(pos, picked[offset:offset + len(rs)].unbind(0))
            offset += len(rs)
            if cap.complete and not cap.done:
                tensor = cap.assemble()
                for key, group in cap.items:
                    rows = torch.stack([cap.rows[p] for p in group])
                    self.cache.put(key, rows, {}, rows.numel() * rows.element_size())
                cap.rows, cap.done = {}, True
                self._publish(cap.rid, tensor, cap.meta)

    def forget(self, finished_req_ids) -> None:
        for req_id in finished_req_ids or ():
            cap = self.captures.pop(req_id, None)
            if cap is not None and not cap.done:
                self._fail(cap, "the request ended before its multimodal prompt was computed")

    def _publish(self, rid: str, tensor, meta: dict) -> None:
        self.writer.q.put((rid, tensor, meta, None))

    def _fail(self, cap: Capture, why: str) -> None:
        cap.done, cap.rows = True, {}
        log.warning("omni mm states for %s: %s", cap.rid, why)
        self.writer.q.put((cap.rid, None, None, why))
