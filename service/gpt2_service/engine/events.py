"""What the engine tells the rest of the service: each step's outputs for the streams, an immutable
event per step and per finished request for observers (metrics), and the counters and gauges
anyone may read.

Events hold plain values only, so an observer never sees (or keeps alive) a mutable ``Sequence``.
Observers run on the engine thread; each one must be quick and must not block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gpt2_service.core.sequence import Finished, GenerationOutput

Delivery = list[tuple[int, GenerationOutput | BaseException]]  # one step's (seq id, output or error), in order


@dataclass(frozen=True, slots=True)
class PhaseTimes:
    """Wall time of one step's parts, in seconds."""

    prefill: float = 0.0  # forward pass of the prefill chunks
    decode: float = 0.0  # forward pass of the decode batch
    sampling: float = 0.0  # LM head and sampling
    stages: tuple[tuple[str, float], ...] = ()  # (stage, seconds summed over layers), when stage timing is on


@dataclass(frozen=True, slots=True)
class SampledSequence:
    """One sequence that got a token in a step."""

    seq_id: int
    first_token: bool  # its first generated token: its prompt was prefilled in this step
    prompt_tokens: int  # after truncation
    truncated_prompt_tokens: int
    shifted: bool  # this token filled the window: the sequence forgot its earliest tokens (a context shift)
    trace_id: str = ""  # its request's trace, for metric exemplars


@dataclass(frozen=True, slots=True)
class StepEvent:
    """What one engine step did."""

    num_decode: int  # sequences decoded (the decode batch size)
    num_prefill_seqs: int  # sequences with a prefill chunk
    times: PhaseTimes
    sampled: tuple[SampledSequence, ...] = ()  # completed prefills first, then decodes
    released: tuple[int, ...] = ()  # seq ids whose KV-cache slots this step freed (finished, aborted, failed)


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """A request the engine ended: how it finished, or the error that failed it."""

    seq_id: int
    request_id: str
    finished: Finished | None
    error: BaseException | None = None
    trace_id: str = ""  # its request's trace, for metric exemplars


StepObserver = Callable[[StepEvent], None]
FinishObserver = Callable[[FinishEvent], None]


@dataclass
class EngineStats:
    """Counters and gauges, updated by the engine thread (``num_aborted`` by the event loop),
    readable from anywhere."""

    num_running: int = 0
    num_waiting: int = 0
    num_steps: int = 0
    num_decode_steps: int = 0
    max_decode_batch_size: int = 0
    num_shared_decode_steps: int = 0  # decode steps with more than one sequence
    num_finished: int = 0
    num_aborted: int = 0
    kv_cache_slots: int = 0
    kv_cache_slots_used: int = 0
    kv_cache_bytes: int = 0
    kv_cache_bytes_per_slot: int = 0
    num_paused: int = 0  # sequences whose stream's reader lags
    num_preempted: dict[str, int] = field(default_factory=dict)  # by fairness.PREEMPTION_REASONS
    num_stalled: int = 0  # streams cancelled because their reader stayed idle past the limit
    prefix_lookups: int = 0  # admissions that looked for a reusable prompt prefix
    prefix_hits: int = 0  # ... that reused one
    prefix_reused_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed
    prefix_cached_tokens: int = 0  # prompt tokens (whole blocks) the KV-cache slots hold for reuse

    @property
    def kv_cache_slots_free(self) -> int:
        return self.kv_cache_slots - self.kv_cache_slots_used

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_slots_used / self.kv_cache_slots if self.kv_cache_slots else 0.0
