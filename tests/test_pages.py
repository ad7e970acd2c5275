"""Huge pages for the tensors a decode step streams (model/pages.py): asked for before the
memory is touched, and given by Linux where transparent huge pages are on request or always."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from gpt2_service.model import pages
from gpt2_service.model.kv_cache import KVCache

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str:
    """The selected mode ([always], [madvise] or [never]); "" where the file is absent."""
    text = THP.read_text() if sys.platform.startswith("linux") and THP.exists() else ""
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else ""


def _huge_kib(t: torch.Tensor) -> int:
    """KiB of t's memory that Linux backs with huge pages (from /proc/self/smaps)."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            low, high = int(head.group(1), 16), int(head.group(2), 16)
            inside = low < end and start < high
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def test_a_large_tensor_lies_on_huge_pages_where_the_kernel_offers_them() -> None:
    t = pages.empty((8 << 20,))  # 32 MiB
    assert t.shape == (8 << 20,) and t.dtype is torch.float32 and t.is_contiguous()
    assert t.data_ptr() % pages.HUGE_PAGE == 0
    t.fill_(1.0)
    assert _huge_kib(t) > 0 if _thp_mode() in ("always", "madvise") else _huge_kib(t) == 0


def test_zeros_read_as_zeros_and_keep_shape_and_dtype() -> None:
    for shape, dtype in (((3, 4), torch.int8), ((4, 1024, 1024), torch.float16), ((2, 3, 1 << 20), torch.float32)):
        z = pages.zeros(shape, dtype)
        assert z.shape == shape and z.dtype is dtype and z.is_contiguous()
        assert torch.count_nonzero(z) == 0
        z.fill_(3)  # writable, and its own memory
        assert torch.count_nonzero(pages.zeros(shape, dtype)) == 0


def test_the_kv_cache_starts_zeroed_on_huge_pages() -> None:
    cache = KVCache(2, 4, 2, 1024, 64)  # 2 x 4 MiB
    assert torch.count_nonzero(cache.k) == 0 and torch.count_nonzero(cache.v) == 0
    cache.k.fill_(1.0)
    if _thp_mode() in ("always", "madvise"):
        assert _huge_kib(cache.k) > 0
