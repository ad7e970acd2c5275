"""Which KV-cache slots are free. Pure bookkeeping: no tensors, so the scheduler can own it."""

from __future__ import annotations

import heapq


class SlotAllocator:
    """Hands out slot numbers 0..num_slots-1, lowest first, and takes them back.

    Lowest-first keeps the running batch packed at the front of the cache, so a decode step
    can usually read a contiguous range of slots instead of gathering them.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def free_slots(self) -> list[int]:
        return list(self._free)

    def allocate(self, slot: int | None = None) -> int:
        """The lowest free slot, or ``slot`` (which must be free)."""
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        if slot is None:
            slot = heapq.heappop(self._free)
        else:
            self._free.remove(slot)  # ValueError if it is not free
            heapq.heapify(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise RuntimeError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)
