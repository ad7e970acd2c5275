"""Which KV-cache slots hold which prompt prefixes: the index behind automatic prefix reuse.

A prompt is cut into blocks of ``block_tokens`` tokens. A block is known by its tokens and the
block before it (a chain from a root), so two slots hold "the same block" only when they hold the
same tokens at the same positions from position 0. Block ids are exact, not hashes: a block's key
is ``(id of the block before, its tokens)``, so no collision can ever hand out wrong keys and
values. Each slot lists the blocks it holds, in order; a block lives while some slot holds it.

A slot holds blocks while its sequence runs (the blocks its prompt has computed so far) and after
it is freed, until it is given to a request that does not reuse them. Free slots are handed out
empty ones first (lowest number: the batch stays packed), then the least recently used.

With ``across_tenants`` off, each tenant's chains start from a root of its own: a prefix is
reused only by requests of the tenant that computed it.

Pure bookkeeping, like slots.py: no tensors. The scheduler decides what to reuse (scheduler.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Block = tuple[int, ...]


@dataclass(frozen=True)
class Match:
    """The longest chain of a prompt's blocks held by some slot: how many blocks, and the slots
    that hold them all."""

    num_blocks: int
    slots: frozenset[int]


class PrefixCache:
    def __init__(self, num_slots: int, block_tokens: int, across_tenants: bool = True) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self.across_tenants = across_tenants
        # (block before, or the root: a tenant name, "" across tenants; tokens) -> block id
        self._ids: dict[tuple[int | str, Block], int] = {}
        self._keys: dict[int, tuple[int | str, Block]] = {}
        self._holders: dict[int, set[int]] = {}  # block id -> slots that hold it
        self._slot_blocks: list[list[int]] = [[] for _ in range(num_slots)]
        self._used_at = [0] * num_slots
        self._clock = itertools.count(1)
        self._new_id = itertools.count(1)

    # -- what a prompt matches -----------------------------------------------------------------

    def blocks(self, tokens: Sequence[int]) -> list[Block]:
        """The prompt's whole blocks (a last partial block is never reused)."""
        b = self.block_tokens
        return [tuple(tokens[i : i + b]) for i in range(0, len(tokens) - b + 1, b)]

    def match(self, blocks: Sequence[Block], tenant: str) -> Match:
        """The longest prefix of ``blocks`` that a slot holds, and every slot that holds it."""
        parent: int | str = self._root(tenant)
        holders: frozenset[int] = frozenset()
        num = 0
        for block in blocks:
            block_id = self._ids.get((parent, block))
            if block_id is None:
                break
            holders, num, parent = frozenset(self._holders[block_id]), num + 1, block_id
        return Match(num, holders)

    # -- what slots hold -----------------------------------------------------------------------

    def num_blocks(self, slot: int) -> int:
        return len(self._slot_blocks[slot])

    @property
    def occupancy(self) -> int:
        """Blocks held over all slots (a block held by two slots counts twice)."""
        return sum(len(blocks) for blocks in self._slot_blocks)

    def extend(self, slot: int, blocks: Sequence[Block], num_blocks: int, tenant: str) -> None:
        """The slot now holds the first ``num_blocks`` of ``blocks`` (it held a prefix of them)."""
        held = self._slot_blocks[slot]
        parent: int | str = held[-1] if held else self._root(tenant)
        for block in blocks[len(held) : num_blocks]:
            key = (parent, block)
            block_id = self._ids.get(key)
            if block_id is None:
                block_id = next(self._new_id)
                self._ids[key], self._keys[block_id], self._holders[block_id] = block_id, key, set()
            self._holders[block_id].add(slot)
            held.append(block_id)
            parent = block_id

    def copy(self, source: int, target: int, num_blocks: int) -> None:
        """``target``'s keys and values are now a copy of ``source``'s first blocks."""
        self.truncate(target, 0)
        for block_id in self._slot_blocks[source][:num_blocks]:
            self._holders[block_id].add(target)
            self._slot_blocks[target].append(block_id)

    def truncate(self, slot: int, num_blocks: int) -> None:
        """The slot keeps its first ``num_blocks`` (the rest is about to be overwritten)."""
        held = self._slot_blocks[slot]
        while len(held) > num_blocks:
            block_id = held.pop()
            holders = self._holders[block_id]
            holders.discard(slot)
            if not holders:  # nobody holds it: forget it (its descendants went first)
                del self._holders[block_id], self._ids[self._keys.pop(block_id)]

    def touch(self, slot: int) -> None:
        """The slot was used now (least recently used free slots are reused first)."""
        self._used_at[slot] = next(self._clock)

    def choose_free(self, free: Iterable[int]) -> int:
        """The free slot to give a request that reuses nothing: an empty one (the lowest), else
        the least recently used."""
        return min(free, key=lambda slot: (bool(self._slot_blocks[slot]), self._used_at[slot], slot))

    def _root(self, tenant: str) -> str:
        return "" if self.across_tenants else tenant
