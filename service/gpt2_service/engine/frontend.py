"""The engine's asyncio front end: lifecycle, admission, and the requests in flight.

Threading: the event loop never runs torch. ``submit`` (on the loop) validates, checks the queue
bound, tokenizes, and posts the new sequence to the engine thread (engine_loop.py), which loops
``schedule -> execute -> update_from_output`` and hands each step's outputs back to the loop in
one ``call_soon_threadsafe``, where they are routed to their streams (engine_stream.py). Aborts
and introspection jobs (``run_pieces``, a model stage per piece; ``run_exclusive``) go through the
same inbox, so they are applied between steps and never race a forward pass. Observers get
immutable events (engine_events.py).

Contract of ``submit``: raises ``InvalidRequestError`` (nothing enqueued),
``EngineOverloadedError`` (queue full; raised before any tokenization or model work) or
``EngineUnavailableError`` (not started, or draining). Otherwise it returns a
``GenerationStream``: an async iterator of ``GenerationOutput`` whose last item carries
``finished`` (with ``request.n > 1``, the outputs of all choices interleaved, each tagged with its
``index``, each choice's last carrying its ``finished``). Closing the stream early, or cancelling the task that iterates it, aborts the
request; its KV-cache slot is freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch

from gpt2_service.config import EngineConfig
from gpt2_service.core.estimate import FirstTokenEstimator, shortfall
from gpt2_service.core.pieces import Pieces, one_piece
from gpt2_service.core.request import ConstraintSpec, GenerationRequest, RequestLimits, validate
from gpt2_service.core.scheduler import Scheduler, SchedulerConfig
from gpt2_service.core.sequence import GenerationOutput, Sequence
from gpt2_service.engine.constraints import Constraints
from gpt2_service.engine.events import EngineStats, FinishObserver, StepObserver
from gpt2_service.engine.intake import QueueBound, SequenceFactory
from gpt2_service.engine.loop import Abort, Add, EngineLoop, Job, Pause, Resume, Stop
from gpt2_service.engine.runner import ModelRunner
from gpt2_service.engine.stream import FlowControl, GenerationStream, StreamRouter
from gpt2_service.errors import EngineDeadError, EngineError, EngineOverloadedError, EngineUnavailableError
from gpt2_service.model.gpt2 import GPT2Config
from gpt2_service.model.kernels import KernelMode, onednn_applies, padded_keys
from gpt2_service.model.kv_cache import KVCache
from gpt2_service.model.weights import LoadedModel

__all__ = ["Engine", "GenerationStream"]

log = logging.getLogger(__name__)

T = TypeVar("T")

LONG_PROMPT = 8192  # prompts of more chars (or ids) than this are prepared off the event loop


class Engine:
    """Builds the engine's parts for a model, and is their asyncio face (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        model_config = loaded.model.config
        self.context_window = min(config.context_window or model_config.n_positions, model_config.n_positions)
        _check_contention_flags(config)
        num_slots = config.resolved_slots()
        if config.prefix_block_tokens < 1:
            raise ValueError(f"prefix_block_tokens must be >= 1, got {config.prefix_block_tokens}")
        if num_slots < config.max_batch_size:
            raise ValueError(f"kv_cache_slots ({num_slots}) must be >= max_batch_size ({config.max_batch_size})")
        parameter = next(loaded.model.parameters())
        if config.weights != "float32" and not onednn_applies(parameter):
            raise ValueError(
                f"--weights {config.weights} needs float32 arithmetic on the CPU (FBGEMM's kernels); "
                f"this engine has {parameter.dtype} on {parameter.device}: use --weights float32"
            )
        self.batch_invariant = config.batch_invariant and onednn_applies(parameter)
        if config.batch_invariant and not self.batch_invariant:
            log.warning(
                "batch-invariant results need float32 on the CPU (a torch with oneDNN); this engine has %s on %s, "
                "so a seeded request's tokens may depend on what shares its batch (ModelInfo.batch_invariant=false)",
                parameter.dtype,
                parameter.device,
            )
        self.cache = KVCache(
            n_layer=model_config.n_layer,
            num_slots=num_slots,
            n_head=model_config.n_head,
            max_len=padded_keys(self.context_window),  # whole key blocks: see kernels.padded_keys
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
                fixed_prefill_chunks=self.batch_invariant,
                call_cap=max(1, int(config.max_call_share * config.max_batch_size)),
                preemption=config.preemption,
                score_token_cost=score_token_cost(loaded.model.config),
                prefix_block_tokens=config.prefix_block_tokens if config.prefix_cache else 0,
                prefix_across_tenants=config.prefix_cache_across_tenants,
            ),
            token_text=self.tokenizer.id_to_text,
        )
        self.runner = ModelRunner(
            loaded.model,
            self.cache,
            self.tokenizer.eos_token_id,
            stage_timing=config.stage_timing and parameter.device.type == "cpu",
            num_threads=config.num_threads,
            mode=KernelMode(config.weights, self.batch_invariant),
        )
        self.limits = RequestLimits(
            vocab_size=self.tokenizer.vocab_size,
            max_new_tokens_limit=config.max_new_tokens_limit,
            context_window=self.context_window,
            max_choices=config.max_choices,
        )
        self.stats = EngineStats(
            kv_cache_slots=num_slots,
            kv_cache_bytes=self.cache.nbytes,
            kv_cache_bytes_per_slot=self.cache.bytes_per_slot,
        )
        self._queue = QueueBound(config.max_queue_size, config.max_queued_per_tenant)
        self.estimator = (
            FirstTokenEstimator(config.max_batch_size, config.max_prefill_tokens, config.preemption)
            if config.deadline_admission
            else None
        )
        self._sequences = SequenceFactory(self.tokenizer, self.context_window, config.default_max_new_tokens)
        self.constraints = Constraints(self.tokenizer)
        self._streams = StreamRouter()
        self._flow = FlowControl(
            max_unread=config.stream_buffer_tokens,
            idle_timeout=config.stream_idle_timeout,
            pause=lambda seq_id: self._thread.post(Pause(seq_id)),
            resume=lambda seq_id: self._thread.post(Resume(seq_id)),
            stalled=self._count_stalled,
        )
        self._thread = EngineLoop(
            self.scheduler,
            self.runner,
            self.stats,
            self._streams,
            lambda seqs: self._queue.release(s.tenant for s in seqs),
            config.introspection_share,
            self.estimator,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread and run a warm-up forward pass on it."""
        self._loop = asyncio.get_running_loop()
        self._streams.bind(self._loop)
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
        for seq_id in self._streams.ids():
            self.abort(seq_id)
        self._thread.post(Stop())
        await asyncio.to_thread(self._thread.join)
        self.runner.masks.close()
        self.cache.release()  # the engine thread is gone: nothing reads the cache again
        self._streams.end_all(EngineUnavailableError("engine shut down"))
        self._streams.cancel_waiters(EngineUnavailableError("engine shut down"))

    @property
    def accepting(self) -> bool:
        return self._accepting and self._thread.dead is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def add_step_observer(self, observer: StepObserver) -> None:
        """``observer(StepEvent)`` after every step, on the engine thread."""
        self._thread.add_step_observer(observer)

    def add_finish_observer(self, observer: FinishObserver) -> None:
        """``observer(FinishEvent)`` for every request that finished or failed, on the engine thread."""
        self._thread.add_finish_observer(observer)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Return once ``predicate()`` holds: it is checked now, after every engine step (once its
        outputs are delivered), and when a request is submitted or aborted. Raises TimeoutError
        after ``timeout`` seconds, EngineUnavailableError if the engine shuts down first."""
        await self._streams.wait_for(predicate, timeout)

    # -- requests ------------------------------------------------------------------------------

    def check_admission(self) -> None:
        """Raise what ``submit`` would raise before any work (dead, not accepting, queue full),
        so that a caller can refuse a request before converting it. Cheap; ``submit`` checks
        again."""
        if self._thread.dead is not None:
            raise EngineDeadError("the engine thread has failed")
        if not self._accepting:
            raise EngineUnavailableError("the engine is not accepting requests (starting or draining)")
        if self._queue.full:
            raise self._queue.overloaded()

    def queued_by_tenant(self) -> dict[str, int]:
        """Requests waiting (or being prepared) per tenant with any."""
        return self._queue.queued_by_tenant()

    async def submit(
        self, request: GenerationRequest, *, validated: bool = False, backpressure: bool = False
    ) -> GenerationStream:
        """Enqueue ``request``. ``validated``: the caller has run ``request.validate`` on it with
        ``self.limits`` (the API layer does, to name proto fields), so it is not checked twice.
        ``backpressure``: the stream pauses its sequence when its reader lags (stream.py); for a
        caller that reads as a client does, not one that reads several streams in turn."""
        self.check_admission()
        if not validated:
            validate(request, self.limits)
        self._queue.reserve(request.tenant, request.n)
        try:
            if len(request.prompt or request.prompt_token_ids or ()) > LONG_PROMPT:
                seq = await asyncio.to_thread(self._sequences.make, request)
            else:
                seq = self._sequences.make(request)
            if request.constraint is not None:
                await self._constrain(seq, request.constraint)
            self._check_deadline(seq)
        except BaseException:
            self._queue.release([request.tenant] * request.n)
            raise
        stream = GenerationStream(seq, self.abort, self._flow if backpressure else None)
        self._streams.add(stream)
        self._thread.post(Add(seq))
        return stream

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Convenience: submit and iterate; errors surface at the first iteration."""
        stream = await self.submit(request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def _constrain(self, seq: Sequence, spec: ConstraintSpec) -> None:
        """Give each choice of ``seq`` a matcher for ``spec``: from the cache at once, or compiled
        on a worker thread (InvalidRequestError when the library refuses it)."""
        if self.constraints.is_cached(spec):
            seq.matcher = self.constraints.matcher(spec)
        else:
            seq.matcher = await asyncio.to_thread(self.constraints.matcher, spec)
        for fork in seq.forks:
            fork.matcher = self.constraints.matcher(spec)

    def _check_deadline(self, seq: Sequence) -> None:
        """Refuse a request whose deadline the engine estimates it cannot meet (core/estimate.py)."""
        deadline = seq.request.deadline
        if self.estimator is None or deadline is None:
            return
        missed_by = shortfall(self.estimator, seq.request, len(seq.prompt_ids), deadline - time.monotonic())
        if missed_by is not None:
            raise EngineOverloadedError(
                f"the deadline cannot be met: the first token is estimated {missed_by:.3f} s after it; retry later",
                reason="DEADLINE_UNMEETABLE",
                retry_after=missed_by,
            )

    def abort(self, seq_id: int) -> None:
        """Abort a request (called on the event loop); its slot is freed at the next step."""
        if self._streams.remove(seq_id):
            self.stats.num_aborted += 1
        self._thread.post(Abort(seq_id))

    def abort_all(self, error: EngineError) -> None:
        """End every request in flight with ``error`` (called on the event loop, e.g. when a
        server's grace period runs out); their slots are freed at the next step."""
        for seq_id in self._streams.ids():
            self._streams.end(seq_id, error)
            self.stats.num_aborted += 1  # ended by the server, not finished: aborted
            self._thread.post(Abort(seq_id))

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between two steps (it never overlaps a forward pass)."""
        return await self.run_pieces(one_piece(fn))

    async def run_pieces(self, pieces: Pieces[T]) -> T:
        """Run ``pieces`` on the engine thread, a piece at a time between two steps (no piece
        overlaps a forward pass; generation steps may run between pieces); its result."""
        loop = self._loop
        if loop is None or not self._thread.started:
            raise EngineUnavailableError("engine not started")
        if self._thread.dead is not None:
            raise EngineDeadError("the engine thread has failed")
        future: asyncio.Future[T] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:  # on the engine thread
            loop.call_soon_threadsafe(_settle, future, result, error)

        self._thread.post(Job(pieces, done))
        return await future

    def _count_stalled(self) -> None:
        self.stats.num_stalled += 1

    def _warm_up(self) -> None:  # on the engine thread, whose cores pack the weights faster
        self.model.prepare_weights(self.config.weights)
        self.constraints.prepare()  # the vocabulary's index for constrained generation (0.25 s)
        ids = torch.tensor([[self.tokenizer.eos_token_id]], device=self.runner.device)
        self.model.logits(self.model(ids, torch.zeros_like(ids)))


MAX_SCORE_TOKEN_COST = 4.0


def score_token_cost(config: GPT2Config) -> float:
    """What a scored prompt token costs, in prompt tokens: its blocks' matrix products (12 d^2
    multiply-adds per layer) plus the LM head's on its row (vocab x d); 1.45 for GPT-2 small.
    At most MAX_SCORE_TOKEN_COST: in a toy model (random:tiny, 33.7 by this count) a step's
    fixed costs outweigh its matrix products."""
    return min(1.0 + config.vocab_size / (12 * config.n_layer * config.n_embd), MAX_SCORE_TOKEN_COST)


def _check_contention_flags(config: EngineConfig) -> None:
    problems = [
        f"--{name} {value}: {rule}"
        for name, value, ok, rule in (
            ("max-call-share", config.max_call_share, 0 < config.max_call_share <= 1, "must be in (0, 1]"),
            ("max-queued-per-tenant", config.max_queued_per_tenant, config.max_queued_per_tenant >= 1, "must be >= 1"),
            ("stream-buffer-tokens", config.stream_buffer_tokens, config.stream_buffer_tokens >= 1, "must be >= 1"),
            ("stream-idle-timeout", config.stream_idle_timeout, config.stream_idle_timeout >= 0, "must be >= 0"),
            (
                "introspection-share",
                config.introspection_share,
                0 < config.introspection_share <= 1,
                "must be in (0, 1]",
            ),
        )
        if not ok
    ]
    if problems:
        raise ValueError("; ".join(problems))


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
