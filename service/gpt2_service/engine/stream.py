"""The event loop's side of delivery: one ``GenerationStream`` per request in flight, the router
that hands each engine step's outputs to them, and coroutines awaiting a condition on the
engine's state, re-checked after every delivery. Everything here runs on the event loop but
``StreamRouter.deliver`` and ``StreamRouter.fail_all``, the engine thread's way in.

Backpressure: a stream with ``FlowControl`` counts the tokens it holds unread. Past
``max_unread`` it asks the engine to pause its sequence; once its reader has read it down to
half of that, to resume it. A stream paused and unread for ``idle_timeout`` seconds is ended:
its buffer is dropped, its request aborted (the slot is freed at the next step), and its reader,
if it ever reads again, gets ``StreamStalledError``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpt2_service.core.sequence import Finished, GenerationOutput, Sequence
from gpt2_service.engine.events import Delivery
from gpt2_service.errors import EngineError, StreamStalledError


@dataclass(frozen=True)
class FlowControl:
    """How a stream holds back a sequence whose reader lags (see the module docstring)."""

    max_unread: int  # tokens
    idle_timeout: float  # seconds; 0 = never
    pause: Callable[[int], None]  # seq id -> the engine stops scheduling it
    resume: Callable[[int], None]
    stalled: Callable[[], None]  # counted: a stream ended for an idle reader


class GenerationStream:
    """Async iterator over one request's outputs (of all its choices, interleaved, when it asks
    for n > 1: ``seq_ids`` lists their sequences). Close it (or cancel its task) to abort."""

    def __init__(self, seq: Sequence, abort: Callable[[int], None], flow: FlowControl | None = None) -> None:
        self._abort = abort
        self._flow = flow
        self._unread = 0  # tokens in the queue
        self._paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self.seq_id = seq.seq_id
        self.sequence = seq  # (read on the event loop only for a trace's timestamps: api/tracing.py)
        self.seq_ids = (seq.seq_id, *(fork.seq_id for fork in seq.forks))
        self._unfinished = len(self.seq_ids)
        self.request_id = seq.request_id
        self.seed = seq.seed
        self.prompt_tokens = len(seq.prompt_ids)
        self.truncated_prompt_tokens = seq.truncated_prompt_tokens
        self._queue: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:
            self.close()
            raise
        if isinstance(item, BaseException):
            self._done = True
            if len(self.seq_ids) > 1:
                self._abort_all()  # one choice failed: the request fails, and its other choices stop
            raise item
        if item.finished is not None:
            self._unfinished -= 1
            self._done = not self._unfinished
        self._read(len(item.tokens))
        return item

    def close(self) -> None:
        """Abort the request if it has not finished; idempotent."""
        self._stop_idle_timer()
        if not self._done:
            self._done = True
            self._abort_all()

    def _abort_all(self) -> None:
        for seq_id in self.seq_ids:  # finished ones are ignored
            self._abort(seq_id)

    async def aclose(self) -> None:
        self.close()

    async def collect(self) -> tuple[list[GenerationOutput], Finished]:
        """Read the stream to its end: all outputs, and how choice 0 finished."""
        outputs: list[GenerationOutput] = []
        try:
            async for out in self:
                outputs.append(out)
        finally:
            self.close()
        finished = next(out.finished for out in outputs if out.finished is not None and out.index == 0)
        return outputs, finished

    def _put(self, item: GenerationOutput | BaseException) -> None:
        self._queue.put_nowait(item)
        flow = self._flow
        if flow is None or isinstance(item, BaseException):
            return
        self._unread += len(item.tokens)
        if not self._paused and item.finished is None and self._unread > flow.max_unread:
            self._paused = True
            for seq_id in self.seq_ids:
                flow.pause(seq_id)
            self._restart_idle_timer()

    # -- flow control ------------------------------------------------------------------------------

    def _read(self, num_tokens: int) -> None:
        flow = self._flow
        if flow is None:
            return
        self._unread -= num_tokens
        if not self._paused:
            return
        if self._unread <= flow.max_unread // 2:
            self._paused = False
            self._stop_idle_timer()
            for seq_id in self.seq_ids:
                flow.resume(seq_id)
        else:
            self._restart_idle_timer()  # the reader moves: idle counts from its last read

    def _restart_idle_timer(self) -> None:
        assert self._flow is not None
        self._stop_idle_timer()
        if self._flow.idle_timeout > 0:
            self._idle_timer = asyncio.get_running_loop().call_later(self._flow.idle_timeout, self._stall)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _stall(self) -> None:
        """The reader stayed idle past the limit: drop what it did not read, end the stream."""
        assert self._flow is not None
        self._idle_timer = None
        if self._done:
            return
        while not self._queue.empty():
            self._queue.get_nowait()
        self._unread = 0
        self._queue.put_nowait(
            StreamStalledError(f"the stream was not read for {self._flow.idle_timeout:g} s (--stream-idle-timeout)")
        )
        self._abort_all()  # the reader still gets the error if it comes back
        self._flow.stalled()


class StreamRouter:
    """The streams in flight by seq id; a stream leaves when its last output or an error is put.
    The engine loop's ``Outbox``, once ``bind`` has named the event loop."""

    def __init__(self) -> None:
        self._streams: dict[int, GenerationStream] = {}
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- from the engine thread --------------------------------------------------------------------

    def deliver(self, items: Delivery) -> None:
        """One step's outputs (maybe none), routed on the event loop."""
        self._call_soon(self.route, items)

    def fail_all(self, error: EngineError) -> None:
        """The engine thread died: end every stream with ``error``, on the event loop."""
        self._call_soon(self.end_all, error)

    def _call_soon(self, fn: Callable[[Any], None], arg: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(fn, arg)

    # -- on the event loop -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._streams)

    def ids(self) -> list[int]:
        return list(self._streams)

    def add(self, stream: GenerationStream) -> None:
        for seq_id in stream.seq_ids:
            self._streams[seq_id] = stream
        self.wake()

    def remove(self, seq_id: int) -> bool:
        """Forget a stream without ending it (its request was aborted); False if unknown."""
        found = self._streams.pop(seq_id, None) is not None
        self.wake()
        return found

    def route(self, items: Delivery) -> None:
        """One engine step's outputs, in order; then wake whoever waits on the engine's state."""
        for seq_id, item in items:
            stream = self._streams.get(seq_id)
            if stream is None:
                continue
            stream._put(item)
            if isinstance(item, BaseException) or item.finished is not None:
                del self._streams[seq_id]
        self.wake()

    def end(self, seq_id: int, error: EngineError) -> None:
        """End one stream with ``error``."""
        self.route([(seq_id, error)])

    def end_all(self, error: EngineError) -> None:
        """End every stream with ``error``."""
        self.route([(seq_id, error) for seq_id in self._streams])

    # -- waiting on the engine's state -------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Return once ``predicate()`` holds; it is checked now and after every wake."""
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.remove(waiter)

    def wake(self) -> None:
        """Re-check every waiter's predicate; release those that hold (or raised)."""
        for predicate, future in self._waiters:
            if future.done():
                continue
            try:
                holds = predicate()
            except Exception as exc:
                future.set_exception(exc)
            else:
                if holds:
                    future.set_result(None)

    def cancel_waiters(self, error: BaseException) -> None:
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(error)
