"""The engine's asyncio API, and the one thread that owns the scheduler and the model.

Threading: the event loop never runs torch. ``submit`` (on the loop) validates, checks the queue
bound, tokenizes, and posts the new sequence to the engine thread's inbox; the engine thread
loops ``schedule -> execute -> update_from_output`` and hands each step's outputs back to the
loop in one ``call_soon_threadsafe``. Aborts and introspection jobs (``run_exclusive``) go
through the same inbox, so they are applied between steps and never race a forward pass.

Contract of ``submit``: raises ``InvalidRequestError`` (nothing enqueued),
``EngineOverloadedError`` (queue full; raised before any tokenization or model work) or
``EngineUnavailableError`` (not started, or draining). Otherwise it returns a
``GenerationStream``: an async iterator of ``GenerationOutput`` whose last item carries
``finished``. Closing the stream early, or cancelling the task that iterates it, aborts the
request; its KV-cache slot is freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from gpt2_service.config import EngineConfig
from gpt2_service.detokenizer import IncrementalDetokenizer
from gpt2_service.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    FieldViolation,
    InvalidRequestError,
)
from gpt2_service.kv_cache import KVCache
from gpt2_service.model import onednn_applies
from gpt2_service.request import GenerationRequest, RequestLimits, Truncation, validate
from gpt2_service.runner import ModelRunner, StepTimes
from gpt2_service.scheduler import Scheduler, SchedulerConfig, StepPlan, StepResult
from gpt2_service.sequence import Finished, GenerationOutput, Sequence
from gpt2_service.weights import LoadedModel

log = logging.getLogger(__name__)

T = TypeVar("T")

LONG_PROMPT = 8192  # prompts of more chars (or ids) than this are prepared off the event loop


@dataclass
class StepStats:
    """What one engine step did; given to step observers (metrics) on the engine thread."""

    num_decode: int  # sequences decoded (the decode batch size)
    num_prefill_seqs: int
    num_prefill_tokens: int
    num_running: int
    num_waiting: int
    times: StepTimes
    # every sequence that got a token this step (completed prefills, then decodes); metrics uses
    # it for per-token gaps and first-token accounting without a timestamp per sequence
    sampled: list[Sequence] = field(default_factory=list)


@dataclass
class EngineStats:
    """Counters and gauges, updated by the engine thread, readable from anywhere."""

    num_running: int = 0
    num_waiting: int = 0
    num_steps: int = 0
    num_decode_steps: int = 0
    max_decode_batch_size: int = 0
    num_shared_decode_steps: int = 0  # decode steps with more than one sequence
    num_finished: int = 0
    num_aborted: int = 0
    num_failed: int = 0
    num_context_shifts: int = 0
    kv_cache_slots: int = 0
    kv_cache_slots_used: int = 0
    kv_cache_bytes: int = 0
    kv_cache_bytes_per_slot: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def kv_cache_slots_free(self) -> int:
        return self.kv_cache_slots - self.kv_cache_slots_used

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_slots_used / self.kv_cache_slots if self.kv_cache_slots else 0.0


class GenerationStream:
    """Async iterator over one request's outputs. Close it (or cancel its task) to abort."""

    def __init__(self, engine: Engine, seq: Sequence) -> None:
        self._engine = engine
        self.seq_id = seq.seq_id
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
            raise item
        if item.finished is not None:
            self._done = True
        return item

    def close(self) -> None:
        """Abort the request if it has not finished; idempotent."""
        if not self._done:
            self._done = True
            self._engine.abort(self.seq_id)

    async def aclose(self) -> None:
        self.close()

    async def collect(self) -> tuple[list[GenerationOutput], Finished]:
        """Read the stream to its end: all outputs, and how it finished."""
        outputs: list[GenerationOutput] = []
        try:
            async for out in self:
                outputs.append(out)
        finally:
            self.close()
        finished = outputs[-1].finished
        assert finished is not None
        return outputs, finished

    def _put(self, item: GenerationOutput | BaseException) -> None:
        self._queue.put_nowait(item)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        model_config = loaded.model.config
        self.context_window = min(config.context_window or model_config.n_positions, model_config.n_positions)
        num_slots = config.resolved_slots()
        if num_slots < config.max_batch_size:
            raise ValueError(f"kv_cache_slots ({num_slots}) must be >= max_batch_size ({config.max_batch_size})")
        parameter = next(loaded.model.parameters())
        if config.batch_invariant and not onednn_applies(parameter):
            raise ValueError(
                "batch_invariant needs float32 weights on CPU and a torch built with oneDNN; "
                f"this engine has {parameter.dtype} on {parameter.device}"
            )
        self.cache = KVCache(
            n_layer=model_config.n_layer,
            num_slots=num_slots,
            n_head=model_config.n_head,
            max_len=self.context_window,
            head_dim=model_config.head_dim,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        shift_keep = config.context_shift_keep or (self.context_window * 3) // 4
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch_size=config.max_batch_size,
                num_slots=num_slots,
                context_window=self.context_window,
                max_prefill_tokens=config.max_prefill_tokens,
                context_shift_keep=min(shift_keep, self.context_window),
                eos_token_id=self.tokenizer.eos_token_id,
                fixed_prefill_chunks=config.batch_invariant,
            ),
            token_text=self.tokenizer.id_to_text,
        )
        self.runner = ModelRunner(
            loaded.model,
            self.cache,
            self.tokenizer.eos_token_id,
            stage_timing=config.stage_timing and parameter.device.type == "cpu",
            num_threads=config.num_threads,
            batch_invariant=config.batch_invariant,
        )
        self.limits = RequestLimits(
            vocab_size=self.tokenizer.vocab_size,
            max_new_tokens_limit=config.max_new_tokens_limit,
            context_window=self.context_window,
        )
        self.stats = EngineStats(
            kv_cache_slots=num_slots,
            kv_cache_bytes=self.cache.nbytes,
            kv_cache_bytes_per_slot=self.cache.bytes_per_slot,
        )
        self._step_observers: list[Callable[[StepStats], None]] = []
        self._finish_observers: list[Callable[[Sequence, Finished | None, BaseException | None], None]] = []
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[int, GenerationStream] = {}
        self._seq_ids = itertools.count(1)
        self._queue_lock = threading.Lock()
        self._num_queued = 0  # reserved or waiting, not yet admitted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._dead: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread and run a warm-up forward pass on it."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="gpt2-engine", daemon=True)
        self._thread.start()
        await self.run_exclusive(self._warm_up)
        self._accepting = True
        log.info(
            "engine ready: model=%s context_window=%d max_batch_size=%d kv_cache_slots=%d "
            "kv_cache_bytes=%d max_queue_size=%d max_prefill_tokens=%d",
            self.loaded.name,
            self.context_window,
            self.config.max_batch_size,
            self.stats.kv_cache_slots,
            self.stats.kv_cache_bytes,
            self.config.max_queue_size,
            self.config.max_prefill_tokens,
        )

    def stop_accepting(self) -> None:
        """Draining: new submits get EngineUnavailableError; running requests go on."""
        self._accepting = False

    async def shutdown(self) -> None:
        """Abort whatever is left, stop the engine thread and wait for it."""
        self._accepting = False
        for seq_id in list(self._streams):
            self.abort(seq_id)
        self._inbox.put(("stop", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        for stream in self._streams.values():
            stream._put(EngineUnavailableError("engine shut down"))
        self._streams.clear()

    @property
    def accepting(self) -> bool:
        return self._accepting and self._dead is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def add_step_observer(self, observer: Callable[[StepStats], None]) -> None:
        self._step_observers.append(observer)

    def add_finish_observer(self, observer: Callable[[Sequence, Finished | None, BaseException | None], None]) -> None:
        self._finish_observers.append(observer)

    # -- requests ------------------------------------------------------------------------------

    def check_admission(self) -> None:
        """Raise what ``submit`` would raise before any work (dead, not accepting, queue full),
        so that a caller can refuse a request before converting it. Cheap; ``submit`` checks
        again."""
        if self._dead is not None:
            raise EngineDeadError("the engine thread has failed")
        if not self._accepting:
            raise EngineUnavailableError("the engine is not accepting requests (starting or draining)")
        if self._num_queued >= self.config.max_queue_size:
            raise EngineOverloadedError(
                f"the waiting queue is full ({self.config.max_queue_size} requests); retry later"
            )

    async def submit(self, request: GenerationRequest, *, validated: bool = False) -> GenerationStream:
        """Enqueue ``request``. ``validated``: the caller has run ``request.validate`` on it with
        ``self.limits`` (the API layer does, to name proto fields), so it is not checked twice."""
        self.check_admission()
        if not validated:
            validate(request, self.limits)
        with self._queue_lock:
            if self._num_queued >= self.config.max_queue_size:
                raise EngineOverloadedError(
                    f"the waiting queue is full ({self.config.max_queue_size} requests); retry later"
                )
            self._num_queued += 1
        try:
            if len(request.prompt or request.prompt_token_ids or ()) > LONG_PROMPT:
                seq = await asyncio.to_thread(self._make_sequence, request)
            else:
                seq = self._make_sequence(request)
        except BaseException:
            with self._queue_lock:
                self._num_queued -= 1
            raise
        stream = GenerationStream(self, seq)
        self._streams[seq.seq_id] = stream
        self._inbox.put(("add", seq))
        return stream

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Convenience: submit and iterate; errors surface at the first iteration."""
        stream = await self.submit(request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, seq_id: int) -> None:
        """Abort a request (called on the event loop); its slot is freed at the next step."""
        if self._streams.pop(seq_id, None) is not None:
            self.stats.num_aborted += 1
        self._inbox.put(("abort", seq_id))

    def abort_all(self, error: EngineError) -> None:
        """End every request in flight with ``error`` (called on the event loop, e.g. when a
        server's grace period runs out); their slots are freed at the next step."""
        for seq_id, stream in list(self._streams.items()):
            stream._put(error)
            self.abort(seq_id)

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between two steps (it never overlaps a forward pass)."""
        if self._loop is None or self._thread is None:
            raise EngineUnavailableError("engine not started")
        if self._dead is not None:
            raise EngineDeadError("the engine thread has failed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._inbox.put(("job", (fn, future)))
        return await future

    def _prompt_too_long(self, field_name: str, num_tokens: str) -> InvalidRequestError:
        return InvalidRequestError(
            [
                FieldViolation(
                    field_name,
                    f"prompt is {num_tokens} tokens; the context window is {self.context_window} "
                    "and truncation is REJECT",
                )
            ],
            reason="PROMPT_TOO_LONG",
        )

    def _make_sequence(self, request: GenerationRequest) -> Sequence:
        reject = request.truncation is Truncation.REJECT
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            field_name = "prompt_token_ids"
        else:
            prompt = request.prompt or ""
            if reject and self.tokenizer.min_num_tokens(prompt) > self.context_window:
                # refused without tokenizing: it cannot fit whatever its tokens
                raise self._prompt_too_long("prompt", f"at least {self.tokenizer.min_num_tokens(prompt)}")
            ids = self.tokenizer.encode(prompt)
            field_name = "prompt"
        if not ids:
            ids = [self.tokenizer.eos_token_id]  # an empty prompt conditions on <|endoftext|>
        truncated = request.num_dropped_prompt_ids
        if truncated and reject:
            raise self._prompt_too_long(field_name, str(truncated + len(ids)))
        if len(ids) > self.context_window:
            if reject:
                raise self._prompt_too_long(field_name, str(len(ids)))
            truncated += len(ids) - self.context_window
            ids = ids[-self.context_window :]
        stopping = request.stopping
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        return Sequence(
            seq_id=next(self._seq_ids),
            request=request,
            prompt_ids=ids,
            seed=seed,
            max_new_tokens=stopping.max_new_tokens or self.config.default_max_new_tokens,
            truncated_prompt_tokens=truncated,
            arrival_time=time.monotonic(),
            detokenizer=IncrementalDetokenizer(
                self.tokenizer.token_bytes,
                skip_ids=self.tokenizer.special_ids,
                stop=stopping.stop,
                include_stop_in_output=stopping.include_stop_in_output,
            ),
        )

    # -- the engine thread ---------------------------------------------------------------------

    def _warm_up(self) -> None:
        ids = torch.tensor([[self.tokenizer.eos_token_id]], device=self.runner.device)
        self.model.logits(self.model(ids, torch.zeros_like(ids)))

    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox(block=not self.scheduler.has_work):
                    return
                if self.scheduler.has_work:
                    self._step()
        except BaseException as exc:  # a bug in the engine itself: fail everyone, loudly
            log.exception("engine thread failed")
            self._dead = exc
            self._deliver_threadsafe([(seq_id, EngineDeadError("engine failed")) for seq_id in list(self._streams)])

    def _drain_inbox(self, block: bool) -> bool:
        """Apply inbox messages; False when asked to stop."""
        while True:
            try:
                kind, payload = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return True
            block = False
            if kind == "add":
                self.scheduler.add(payload)
            elif kind == "abort":
                self.scheduler.abort(payload)
            elif kind == "job":
                self._run_job(*payload)
                if self.scheduler.has_work:
                    return True  # one job between two steps: running streams wait for one pass at most
            elif kind == "stop":
                return False

    def _run_job(self, fn: Callable[[], Any], future: asyncio.Future[Any]) -> None:
        assert self._loop is not None
        try:
            result = fn()
        except BaseException as exc:
            self._loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            self._loop.call_soon_threadsafe(_settle, future, result, None)

    def _step(self) -> None:
        waiting_before = {s.seq_id for s in self.scheduler.waiting}
        plan, early = self.scheduler.schedule()
        self._account_admitted(waiting_before)
        result: StepResult
        if plan.is_empty:
            result = StepResult()
        else:
            try:
                sampled = self.runner.execute(plan)
            except Exception:
                ids = [c.seq.request_id for c in plan.prefill] + [s.request_id for s in plan.decode]
                log.exception("forward pass failed; failing requests %s", ids)
                result = self.scheduler.fail(plan, EngineError("internal error in the forward pass"))
            else:
                result = self.scheduler.update_from_output(plan, sampled)
        self._record_step(plan, result)  # before publishing: whoever sees an output sees this step's stats
        self._publish(early)
        self._publish(result)

    def _account_admitted(self, waiting_before: set[int]) -> None:
        still_waiting = {s.seq_id for s in self.scheduler.waiting}
        left = len(waiting_before - still_waiting)
        if left:
            with self._queue_lock:
                self._num_queued -= left

    def _publish(self, result: StepResult) -> None:
        items: list[tuple[int, GenerationOutput | BaseException]] = []
        for seq, output in result.outputs:
            items.append((seq.seq_id, output))
            if output.finished is not None:
                self.stats.num_finished += 1
                self.stats.num_context_shifts += seq.context_shifts
                self._notify_finish(seq, output.finished, None)
        for seq, error in result.failed:
            items.append((seq.seq_id, error))
            self.stats.num_failed += 1
            self._notify_finish(seq, None, error)
        for seq in result.released:
            self.runner.release(seq.seq_id)
        if items:
            self._deliver_threadsafe(items)

    def _notify_finish(self, seq: Sequence, finished: Finished | None, error: BaseException | None) -> None:
        for observer in self._finish_observers:
            try:
                observer(seq, finished, error)
            except Exception:
                log.exception("finish observer failed")

    def _record_step(self, plan: StepPlan, result: StepResult) -> None:
        s = self.stats
        s.num_steps += 1
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_cache_slots_used = self.scheduler.slots.num_used
        if plan.decode:
            s.num_decode_steps += 1
            s.max_decode_batch_size = max(s.max_decode_batch_size, len(plan.decode))
            if len(plan.decode) > 1:
                s.num_shared_decode_steps += 1
        times = self.runner.last_times if not plan.is_empty else StepTimes()
        for stage, seconds in times.stages.items():
            s.stage_seconds[stage] = s.stage_seconds.get(stage, 0.0) + seconds
        if self._step_observers and not plan.is_empty:
            step = StepStats(
                num_decode=len(plan.decode),
                num_prefill_seqs=len(plan.prefill),
                num_prefill_tokens=plan.num_prefill_tokens,
                num_running=s.num_running,
                num_waiting=s.num_waiting,
                times=times,
                sampled=[seq for seq, _ in result.outputs],
            )
            for observer in self._step_observers:
                try:
                    observer(step)
                except Exception:
                    log.exception("step observer failed")

    def _deliver_threadsafe(self, items: list[tuple[int, GenerationOutput | BaseException]]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list[tuple[int, GenerationOutput | BaseException]]) -> None:
        """On the event loop: route each output to its stream."""
        for seq_id, item in items:
            stream = self._streams.get(seq_id)
            if stream is None:
                continue
            stream._put(item)
            if isinstance(item, BaseException) or item.finished is not None:
                del self._streams[seq_id]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
