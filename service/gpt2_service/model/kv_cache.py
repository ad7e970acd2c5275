"""The preallocated KV-cache, and the writes and reads attention makes of it.

Shape per layer: (num_slots, n_head, max_len, head_dim). The whole budget is allocated (and
zero-filled, so the memory is really committed) at start-up; nothing grows at run time.

In each layer, attention hands the cache the step's new keys and values (``KVCache.update``): the
cache writes them at their (slot, position) and gives back the keys and values the queries attend
over (``KeyValues``). An ``AttentionLayout``, built by the runner once per forward pass and shared
by all layers, says where the batch's tokens go and what each query sees.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2_service.model import pages, skinny


@dataclass
class AttentionLayout:
    """Where a batch's tokens live in the KV-cache. Built once per forward, shared by all layers.

    write_slots/write_positions list the (slot, position) of every real (non-padding) token in
    row-major order of the (B, T) input; ``write_span`` (first, end) says instead that every row
    writes positions first..end-1, with no padding (a slice copy rather than a scatter). Each query
    attends to cached positions 0..num_keys-1 of its row's slot, limited by ``mask``
    (B, 1, T, num_keys): True where the key is visible. ``mask`` is None when causality alone
    decides and T == 1 or T == num_keys: every row decodes at position num_keys-1, or every row
    prefills positions 0..T-1.

    ``one_query`` (decode steps, where ``KVCache.attends_one_query``): each row's one query
    attends by skinny.c's decode attention, which is batch-invariant by construction.

    ``rows`` (batch-invariant mode) lists each row's (slot, first position, real tokens): attention
    then runs row by row at the row's exact size, so padding and neighbours cannot change a bit of
    it (``mask`` is unused).
    """

    slots: Tensor  # (B,) slot of each row
    slot_range: tuple[int, int] | None  # (first, end) when slots are consecutive: read a view
    valid: Tensor | None  # (B, T) bool, True for real tokens; None when every token is real
    write_slots: Tensor  # (N,)
    write_positions: Tensor  # (N,)
    num_keys: int
    mask: Tensor | None  # (B, 1, T, num_keys) bool
    write_span: tuple[int, int] | None = None
    rows: tuple[tuple[int, int, int], ...] | None = None
    # every row is one query at its write position, attending over its slot's keys up to there:
    # ``KVCache.attend_one`` writes and attends in one call (``mask``, ``rows`` unused)
    one_query: bool = False
    # row indices of the written (slot, head, position)s in a cache layer seen as (S*nh*L, hs),
    # made by the first layer's write and reused by the others
    flat_write_index: Tensor | None = None


@dataclass(frozen=True)
class KeyValues:
    """Keys and values that queries attend over: those of the whole batch, or of one row alone.

    ``mask`` None means causal with the queries at the last positions: query i of T sees keys
    0..Tk-T+i (see ``kernels.attention``). ``row`` (batch-invariant mode) is (batch row, number of
    real queries): these are that row's keys at its exact length, for its first queries only.
    """

    keys: Tensor  # (B, nh, Tk, hs), or (1, nh, Tk, hs) for one row
    values: Tensor  # same shape as keys
    mask: Tensor | None = None  # (B, 1, T, Tk) bool, True where the key is visible
    row: tuple[int, int] | None = None


class KVCache:
    def __init__(
        self,
        n_layer: int,
        num_slots: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layer, num_slots, n_head, max_len, head_dim)
        self.k = pages.zeros(shape, dtype, device)  # on huge pages where the machine offers them
        self.v = pages.zeros(shape, dtype, device)
        self._layers = tuple(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # views, made once
        self.num_slots = num_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def release(self) -> None:
        """Give the keys' and values' memory back at once (the engine has stopped; nothing reads
        the cache after): an engine object kept alive by a reference cycle until the garbage
        collector runs would otherwise hold it (measured: 0.6 GB per stopped engine in a
        benchmark that starts one per run, until the process ran out of memory)."""
        self.k = self.k.new_empty((self.k.shape[0], 0, *self.k.shape[2:]))
        self.v = self.v.new_empty((self.v.shape[0], 0, *self.v.shape[2:]))
        self._layers = ()

    @functools.cached_property
    def attends_one_query(self) -> bool:
        """Whether ``attend_one`` serves: float32 on the CPU, where skinny.c is built."""
        return self.k.device.type == "cpu" and self.k.dtype == torch.float32 and skinny.library() is not None

    def attend_one(self, layer: int, layout: AttentionLayout, qkv: Tensor) -> Tensor:
        """A decode step's attention in ``layer``: qkv (B, 3 * C) holds each row's query, key and
        value (heads side by side); the key and value go to the row's (write slot, write position),
        and the query attends over that slot's keys up to there. (B, C). Needs
        ``attends_one_query``; see ``skinny.attend``."""
        k_cache, v_cache = self._layers[layer]
        lib = skinny.library()
        assert lib is not None, "attend_one needs skinny.c (KVCache.attends_one_query)"
        return skinny.attend(lib, qkv, k_cache, v_cache, layout.write_slots, layout.write_positions)

    @property
    def bytes_per_slot(self) -> int:
        return self.nbytes // self.num_slots

    def update(self, layer: int, layout: AttentionLayout, k: Tensor, v: Tensor) -> list[KeyValues]:
        """Stores a step's keys and values k, v (B, nh, T, hs) of ``layer`` where ``layout`` says,
        and returns what the queries attend over: one ``KeyValues`` for the whole batch, or in
        batch-invariant mode (``layout.rows``) one per row at that row's exact length."""
        self.write(layer, layout, k, v)
        if layout.rows is None:
            keys, values = self.read(layer, layout)
            return [KeyValues(keys, values, layout.mask)]
        return [
            KeyValues(*self.read_slot(layer, slot, start + n), row=(b, n))
            for b, (slot, start, n) in enumerate(layout.rows)
        ]

    def write(self, layer: int, layout: AttentionLayout, k: Tensor, v: Tensor) -> None:
        """k, v (B, nh, T, hs) into their (slot, position); padding tokens are not written."""
        k_cache, v_cache = self._layers[layer]  # (S, nh, L, hs)
        if layout.write_span is not None:  # every row writes the same positions: copy slices
            start, end = layout.write_span
            if layout.slot_range is not None:
                first, last = layout.slot_range
                k_cache[first:last, :, start:end] = k
                v_cache[first:last, :, start:end] = v
            else:
                k_cache[:, :, start:end].index_copy_(0, layout.slots, k)
                v_cache[:, :, start:end].index_copy_(0, layout.slots, v)
            return
        k_rows = k.transpose(1, 2)  # (B, T, nh, hs)
        v_rows = v.transpose(1, 2)
        if layout.valid is not None:
            k_rows, v_rows = k_rows[layout.valid], v_rows[layout.valid]  # (N, nh, hs)
        else:
            k_rows, v_rows = k_rows.reshape(-1, *k_rows.shape[2:]), v_rows.reshape(-1, *v_rows.shape[2:])
        _, n_head, max_len, head_dim = k_cache.shape
        if layout.flat_write_index is None:  # one row of head_dim values per (token, head)
            heads = torch.arange(n_head, device=k_rows.device)
            base = (layout.write_slots[:, None] * n_head + heads[None, :]) * max_len  # (N, nh)
            layout.flat_write_index = (base + layout.write_positions[:, None]).reshape(-1)
        # index_copy_ of whole rows: 50-100x faster than the equivalent k_cache[slots, :, positions] = ...
        k_cache.view(-1, head_dim).index_copy_(0, layout.flat_write_index, k_rows.reshape(-1, head_dim))
        v_cache.view(-1, head_dim).index_copy_(0, layout.flat_write_index, v_rows.reshape(-1, head_dim))

    def read(self, layer: int, layout: AttentionLayout) -> tuple[Tensor, Tensor]:
        """Keys and values at positions 0..num_keys-1 of each row's slot, (B, nh, num_keys, hs):
        a view when the slots are consecutive, else a gathered copy."""
        k_cache, v_cache = self._layers[layer]  # (S, nh, L, hs)
        n = layout.num_keys
        if layout.slot_range is not None:
            first, end = layout.slot_range
            return k_cache[first:end, :, :n], v_cache[first:end, :, :n]
        return k_cache[:, :, :n].index_select(0, layout.slots), v_cache[:, :, :n].index_select(0, layout.slots)

    def read_slot(self, layer: int, slot: int, num_keys: int) -> tuple[Tensor, Tensor]:
        """One slot's keys and values at positions 0..num_keys-1, (1, nh, num_keys, hs), a view."""
        k_cache, v_cache = self._layers[layer]
        return k_cache[slot : slot + 1, :, :num_keys], v_cache[slot : slot + 1, :, :num_keys]

    def copy_slot(self, source: int, targets: list[int], num_positions: int) -> None:
        """Copy positions 0..num_positions-1 of slot ``source`` into each of ``targets`` (every
        layer): sequences that share a prompt start from its keys and values, bitwise."""
        for cache in (self.k, self.v):  # (n_layer, S, nh, L, hs)
            for target in targets:
                cache[:, target, :, :num_positions] = cache[:, source, :, :num_positions]
