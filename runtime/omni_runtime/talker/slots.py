"""Where each synthesis lives in the fixed-shape decode path, and the shapes a step takes (pure).

Every synthesis in the decode loop owns one KV slot; the slots in use are always 0..n-1, so a
step over bucket B covers them with the first B slots of every preallocated tensor (a view
whose address never changes, which a CUDA graph needs). A synthesis that leaves hands its slot
to the one in the last slot (one copy of that synthesis' cached positions), keeping the prefix
dense. Steps are padded to a batch bucket and to a KV-length bucket, so a few graphs cover
every batch: attention reads only the length bucket, not the whole slot.
"""

from __future__ import annotations

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SMALLEST_LENGTH_BUCKET = 128


def batch_buckets(slots: int) -> list[int]:
    """The batch sizes steps are padded to: the standard buckets below `slots`, then `slots`
    (doubling past 64 when more slots than that are asked for)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    out = [b for b in BATCH_BUCKETS if b < slots]
    b = BATCH_BUCKETS[-1] * 2
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


def length_buckets(max_tokens: int, smallest: int = SMALLEST_LENGTH_BUCKET) -> list[int]:
    """KV lengths attention is padded to: powers of two from `smallest`, then `max_tokens`."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    out, n = [], smallest
    while n < max_tokens:
        out.append(n)
        n *= 2
    return out + [max_tokens]


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `n`."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class SlotTable:
    """Which synthesis holds which slot; the slots in use are 0..used-1."""

    def __init__(self, slots: int):
        self.holders: list[object] = []
        self.slots = slots

    @property
    def used(self) -> int:
        return len(self.holders)

    @property
    def free(self) -> int:
        return self.slots - len(self.holders)

    def take(self, holder: object) -> int:
        if not self.free:
            raise RuntimeError("no free talker slot")
        self.holders.append(holder)
        return len(self.holders) - 1

    def release(self, slot: int) -> tuple[object, int] | None:
        """Free `slot`. When it was not the last one, the last slot's holder moves into it:
        returns (that holder, the slot it leaves), and the caller copies its state over."""
        last = len(self.holders) - 1
        if not 0 <= slot <= last:
            raise ValueError(f"slot {slot} is not in use")
        mover = self.holders.pop()
        if slot == last:
            return None
        self.holders[slot] = mover
        return mover, last
