"""Large CPU tensors on transparent huge pages, where Linux offers them on request.

What it is: ``zeros`` and ``empty``, like torch's, whose memory is a fresh anonymous mapping
advised ``MADV_HUGEPAGE`` before anything touches it, so that Linux backs it with 2 MiB pages
where transparent huge pages are in ``madvise`` mode (the common default) or ``always``.
Elsewhere (another OS, THP off, a device tensor, a tensor under two huge pages) they are
torch's. (Advising memory from torch's allocator would not do: below glibc's mmap threshold, up
to 32 MiB, it may hand back pages already touched, which stay small.)

Why: a decode step streams the weights (about 500 MB for GPT-2 small in float32) and each
sequence's cached keys and values, hundreds of short runs far apart. With 4 KiB pages each run
starts with page walks. Measured on GPT-2 small: the products at one row 16.9 -> 14.9 ms; at 32
requests skinny.c's attention over the cache 8.2 -> 5.9 ms per step (with its prefetch of the
next row's keys, skinny.c).
"""

from __future__ import annotations

import math
import mmap
import sys

import torch
from torch import Tensor

HUGE_PAGE = 1 << 21


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor | None:
    """Zeros of ``shape`` in a fresh mapping advised for huge pages, the tensor starting on a
    2 MiB boundary (the tensor keeps the mapping alive); None where that does not apply."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    if torch.device(device).type != "cpu" or nbytes < 2 * HUGE_PAGE:
        return None
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # (shared: no THP)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape)


def zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """``torch.zeros(shape)``, on huge pages where the machine offers them. Written now, though a
    fresh mapping reads as zeros: a page's first touch costs its fault (and the kernel may compact
    memory to find a huge page), which belongs at start-up, not in the first requests' steps
    (measured: a first run of 32 requests 3.4 s slower with a KV-cache left untouched)."""
    mapped = _mapped(shape, dtype, device)
    return torch.zeros(shape, dtype=dtype, device=device) if mapped is None else mapped.zero_()


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """``torch.empty(shape)``, on huge pages where the machine offers them."""
    mapped = _mapped(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device) if mapped is None else mapped
