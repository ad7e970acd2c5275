"""Work in pieces: a generator that does one piece of a long computation per ``next()`` and
returns its result, so that whoever runs it can do other work between two pieces.

The model's forward pass yields after its embedding and after each block (``GPT2.stages``);
introspection's passes are built on it, and the engine thread runs them one piece at a time
between generation steps (engine/loop.py), so that a 1024-token Trace never holds the thread
for a whole forward pass."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")

Pieces: TypeAlias = Generator[None, None, T]


@dataclass(frozen=True)
class Finished(Generic[T]):
    result: T


def advance(pieces: Pieces[T]) -> Finished[T] | None:
    """Run the next piece of ``pieces``; its result once that was the last one."""
    try:
        next(pieces)
    except StopIteration as end:
        return Finished(end.value)
    return None


def run_to_end(pieces: Pieces[T]) -> T:
    """Every piece of ``pieces``, one after another; its result."""
    while (finished := advance(pieces)) is None:
        pass
    return finished.result


def one_piece(fn: Callable[[], T]) -> Pieces[T]:
    """``fn()`` as work of a single piece."""
    return fn()
    yield  # unreachable: it makes this function a generator
