"""Where syntheses live in the talker's fixed-shape decode path, and the shapes its steps take
(omni_runtime.talker.slots; no torch)."""

from __future__ import annotations

import random

import pytest

from omni_runtime.talker.slots import SlotTable, batch_buckets, bucket, length_buckets

pytestmark = pytest.mark.pure


def test_batch_buckets_end_at_the_slot_count():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(200) == [1, 2, 4, 8, 16, 32, 64, 128, 200]
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_length_buckets_double_up_to_the_slot_length():
    assert length_buckets(8192) == [128, 256, 512, 1024, 2048, 4096, 8192]
    assert length_buckets(1000) == [128, 256, 512, 1000]
    assert length_buckets(100) == [100]
    assert bucket(129, length_buckets(1000)) == 256 and bucket(1000, length_buckets(1000)) == 1000
    with pytest.raises(ValueError, match="exceeds"):
        bucket(1001, length_buckets(1000))


def test_slots_in_use_stay_dense_whatever_leaves():
    rng = random.Random(0)
    table = SlotTable(8)
    where: dict[str, int] = {}
    for step in range(500):
        if table.free and (not where or rng.random() < 0.55):
            name = f"s{step}"
            where[name] = table.take(name)
        elif where:
            name = rng.choice(sorted(where))
            moved = table.release(where.pop(name))
            if moved is not None:  # the last slot's holder takes the freed slot
                holder, old = moved
                assert where[holder] == old == table.used
                where[holder] = table.holders.index(holder)
        assert sorted(where.values()) == list(range(table.used))
        assert all(table.holders[slot] == name for name, slot in where.items())
    with pytest.raises(RuntimeError):
        full = SlotTable(1)
        full.take("a")
        full.take("b")
