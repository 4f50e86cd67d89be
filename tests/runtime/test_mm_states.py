"""Multimodal states export: the pure bookkeeping of the vLLM plugin and the launcher's store
(real files in a temporary directory). The export itself runs over real vLLM in
test_vllm_thinker.py."""

from __future__ import annotations

import base64
import os
import time

import pytest
import torch

from omni_runtime.thinker.mm_capture import (Capture, StatesCache, external_request_id, item_groups, item_keys,
                                             mm_positions, prefix_key, step_rows)
from omni_runtime.thinker.mm_store import Entry, MMStatesStore, decode_file, encode_file, sweep_plan, write_atomic

pytestmark = pytest.mark.runtime


@pytest.mark.parametrize("vllm_id, rid", [
    ("chatcmpl-abc-123-0f3a9c1e", "abc-123"),
    ("chatcmpl-req-deadbeef-12345678", "req-deadbeef"),  # a hex-looking tail of the rid survives
    ("1_chatcmpl-x-0a1b2c3d", "x"),                       # parallel sampling child
    ("chatcmpl-no-suffix", "no-suffix"),                   # request id randomization turned off
])
def test_external_request_id(vllm_id, rid):
    assert external_request_id(vllm_id) == rid


def test_step_rows_maps_batch_rows_to_prompt_positions():
    # request 0: prefill of positions 0..9, mm at 2,3,4; request 1: decode (1 token at 40);
    # request 2: second prefill chunk 8..15 of a prompt with mm at 5..12.
    positions = {0: [2, 3, 4], 1: [1, 2], 2: list(range(5, 13))}
    out = step_rows([0, 40, 8], [10, 1, 8], positions.get)
    assert out == [(0, [2, 3, 4], [2, 3, 4]), (2, [11, 12, 13, 14, 15], [8, 9, 10, 11, 12])]
    assert step_rows([0], [4], lambda i: None) == []


def test_capture_fills_across_chunks_and_recomputation():
    cap = Capture("r", [3, 4, 7])
    cap.add([3, 4], [torch.tensor([1.0]), torch.tensor([2.0])])
    assert not cap.complete and cap.missing_before(5) == [] and cap.missing_before(8) == [7]
    cap.add([3], [torch.tensor([9.0])])  # recomputed after a preemption: replaced, not appended
    cap.add([7], [torch.tensor([3.0])])
    assert cap.complete and cap.assemble().tolist() == [[9.0], [2.0], [3.0]]


def test_prefix_key_depends_on_tokens_up_to_the_last_mm_position_and_the_media():
    ids = [1, 2, 9, 9, 3, 4]
    pos = mm_positions(ids, {9})
    assert pos == [2, 3]
    k = prefix_key(ids, pos, ["audio-hash-a"])
    assert k == prefix_key(ids[:4] + [7, 7, 7], pos, ["audio-hash-a"])  # what follows does not matter
    assert k != prefix_key(ids, pos, ["audio-hash-b"])
    assert k != prefix_key([5] + ids[1:], pos, ["audio-hash-a"])


def test_item_keys_survive_a_conversation_growing_by_later_turns():
    """Turn 2 of a realtime session = turn 1's prompt + the answer + new audio: the first
    audio item keeps its key (its rows can come from turn 1's export while vLLM's prefix
    cache skips computing them); the new item gets its own, and an edit before an item
    changes that item's key."""
    turn1 = [1, 9, 9, 9, 2, 3]                      # audio A at 1..3
    turn2 = turn1 + [4, 5, 9, 9, 6]                 # answer, then audio B at 8..9
    ranges1, ranges2 = [(1, 3)], [(1, 3), (8, 2)]
    g1 = item_groups(mm_positions(turn1, {9}), ranges1)
    g2 = item_groups(mm_positions(turn2, {9}), ranges2)
    assert g1 == [[1, 2, 3]] and g2 == [[1, 2, 3], [8, 9]]
    k1 = item_keys(turn1, g1, ["A"])
    k2 = item_keys(turn2, g2, ["A", "B"])
    assert k2[0] == k1[0] and k2[1] != k2[0]
    assert item_keys([7] + turn2[1:], g2, ["A", "B"])[0] != k1[0]  # an earlier token differs
    assert item_keys(turn2, g2, ["A2", "B"])[1] != k2[1]           # earlier media differs


def test_states_cache_is_bounded_least_recently_used_first():
    c = StatesCache(max_bytes=100)
    c.put("a", "A", {}, 40)
    c.put("b", "B", {}, 40)
    assert c.get("a")[0] == "A"  # a is now the most recent
    c.put("c", "C", {}, 40)
    assert c.get("b") is None and c.get("a") is not None and c.get("c") is not None and c.bytes == 80
    c.put("huge", "H", {}, 101)
    assert c.get("huge") is None and len(c) == 2


def test_sweep_plan_drops_expired_then_oldest_over_budget():
    now = 1000.0
    entries = [Entry("old", now - 200, 10), Entry("a", now - 50, 40), Entry("b", now - 40, 40), Entry("c", now - 1, 40)]
    assert sweep_plan(entries, now, ttl=120, max_bytes=1000) == ["old"]
    assert sweep_plan(entries, now, ttl=120, max_bytes=80) == ["old", "a"]
    assert sweep_plan(entries, now, ttl=10, max_bytes=1000) == ["old", "a", "b"]


def test_store_serves_once_keeps_errors_and_expires(tmp_path):
    store = MMStatesStore(tmp_path / "mm", ttl=60, max_bytes=1 << 20)
    raw = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    write_atomic(store.dir, "r1", encode_file({"layer": 24, "dtype": "float32", "shape": [2, 3]}, raw))
    assert decode_file((store.dir / "r1.oms").read_bytes()) == ({"layer": 24, "dtype": "float32", "shape": [2, 3]}, raw)
    obj = store.take("r1")
    assert obj["layer"] == 24 and obj["shape"] == [2, 3] and base64.b64decode(obj["data"]) == raw
    assert store.take("r1") is None  # fetched once
    write_atomic(store.dir, "r2", encode_file({"error": "prefix cache"}))
    assert store.take("r2") == {"error": "prefix cache"} and store.take("r2") == {"error": "prefix cache"}
    with pytest.raises(ValueError):
        store.take("../etc/passwd")
    old = time.time() - 3600
    os.utime(store.dir / "r2.oms", (old, old))
    assert store.sweep() == ["r2.oms"] and store.take("r2") is None
    assert not list(store.dir.glob(".*.tmp"))  # the rename left no temporary behind
