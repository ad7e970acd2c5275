"""The preallocated KV-cache: one key and one value tensor per layer, indexed by slot.

Shape per layer: (num_slots, n_head, max_len, head_dim). The whole budget is allocated (and
zero-filled, so the memory is really committed) at start-up; nothing grows at run time.
"""

from __future__ import annotations

import torch


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
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_slot(self) -> int:
        return self.nbytes // self.num_slots
