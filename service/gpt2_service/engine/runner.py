"""Executes a step plan on the model: the only place where generation touches tensors.

``execute(plan)`` runs the prefill chunks as one padded batch and the decodes as another
(one token per row), samples every sequence that completed its window, and returns plain
``SampledToken``s keyed by sequence id. It keeps one ``torch.Generator`` per sampled sequence.

Threads: ``execute`` sets the calling (engine) thread's torch intra-op pool to ``num_threads``
(default: torch's default, the cores; threads.py says why no other thread should have one).
Fewer leaves the event loop a core of its own, which can help a server that streams to many
clients from a small machine; see EngineConfig.num_threads.

Kernel mode (``mode``, a ``kernels.KernelMode``): the weight format of the matrix products, and
batch invariance, in which every row's numbers are bitwise independent of the rest of its batch:
the linear kernels compute each row alike whatever the row count (see kernels.py), a decode batch
attends by skinny.c's decode attention (``AttentionLayout.one_query``, in both modes: invariant by
construction) or, where skinny.c is not built, over keys padded to whole ``KEY_BLOCK``s
(``kernels.padded_keys``; row by row where this machine's kernel is not invariant under that
padding), prefill chunks attend row by row at each
row's exact size (``AttentionLayout.rows``), and the scheduler keeps prefill chunk boundaries
independent of the batch. Forward passes of other work on the engine thread
(introspection, warm-up) run in the same mode through ``run``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from gpt2_service.core.scheduler import PrefillChunk, SampledToken, ScoredPosition, StepPlan
from gpt2_service.core.sequence import Sequence
from gpt2_service.engine.constraints import Masks, advance, is_dead
from gpt2_service.engine.sampler import RowState, Sampler
from gpt2_service.engine.threads import ENGINE_THREADS
from gpt2_service.model.gpt2 import GPT2, StageTimer
from gpt2_service.model.kernels import (
    KernelMode,
    decode_mask,
    kernel_mode,
    padded_decode_attention_is_invariant,
    padded_keys,
)
from gpt2_service.model.kv_cache import AttentionLayout, KVCache

T = TypeVar("T")


@dataclass
class StepTimes:
    """Wall time of one step's parts, in seconds, for statistics and metrics."""

    prefill: float = 0.0  # forward pass of the prefill chunks
    decode: float = 0.0  # forward pass of the decode batch
    sampling: float = 0.0  # LM head and sampling
    stages: dict[str, float] = field(default_factory=dict)


def _slot_range(slots: list[int]) -> tuple[int, int] | None:
    first = slots[0]
    return (first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None


class ModelRunner:
    def __init__(
        self,
        model: GPT2,
        cache: KVCache,
        eos_token_id: int,
        stage_timing: bool = True,
        num_threads: int = 0,
        mode: KernelMode | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.eos_token_id = eos_token_id
        self.device = next(model.parameters()).device
        self.stage_timing = stage_timing
        self.num_threads = num_threads or ENGINE_THREADS
        self.mode = mode or KernelMode()
        # decode attention by skinny.c, one call per layer, invariant by construction (both modes);
        # else, batch-invariant decode over padded keys where this machine's SDPA allows it
        self.one_query = self.mode.skinny and cache.attends_one_query
        self.padded_decode = self.batch_invariant and not self.one_query and padded_decode_attention_is_invariant()
        self.sampler = Sampler()
        self.masks = Masks(model.config.vocab_size)  # constrained rows' next-token masks
        self._generators: dict[int, torch.Generator] = {}
        self.last_times = StepTimes()
        self.last_scored: dict[int, list[ScoredPosition]] = {}  # the last step's scored prompt tokens

    @property
    def batch_invariant(self) -> bool:
        return self.mode.batch_invariant

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def execute(self, plan: StepPlan) -> dict[int, SampledToken]:
        return self.run(lambda: self._execute(plan))

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` with this runner's threads and kernel mode (on the calling thread)."""
        if torch.get_num_threads() != self.num_threads:  # per thread: applies to the caller only
            torch.set_num_threads(self.num_threads)
        with kernel_mode(self.mode):
            return fn()

    def _execute(self, plan: StepPlan) -> dict[int, SampledToken]:
        timer = StageTimer() if self.stage_timing else None
        times = StepTimes()
        hidden_rows: list[Tensor] = []
        sampled_seqs: list[Sequence] = []

        self.last_scored = {}
        masks = self._start_masks(plan)  # a constrained row's mask is computed beside the forward pass
        for source, target, num_positions in plan.copies:  # reused prefixes, before anything reads them
            self.cache.copy_slot(source, [target], num_positions)
        if plan.prefill:
            start = time.perf_counter()
            hidden = self._prefill(plan.prefill, timer)
            for i, chunk in enumerate(plan.prefill):
                if chunk.forks:  # choices that wait for this prompt get its keys and values
                    self.cache.copy_slot(
                        self._slots([chunk.seq])[0], self._slots(list(chunk.forks)), chunk.seq.window_len
                    )
                if chunk.samples:
                    for seq in (chunk.seq, *chunk.forks):  # the forks sample from the same position
                        hidden_rows.append(hidden[i, chunk.num_tokens - 1])
                        sampled_seqs.append(seq)
            times.prefill = time.perf_counter() - start
            if any(c.seq.scores_prompt for c in plan.prefill):
                start = time.perf_counter()
                self.last_scored = self._score(plan.prefill, hidden, timer)
                times.sampling += time.perf_counter() - start
        if plan.decode:
            start = time.perf_counter()
            hidden = self._decode(plan.decode, timer)
            for row, seq in zip(hidden[:, 0].unbind(0), plan.decode, strict=True):
                if seq.seq_id not in plan.replay:
                    hidden_rows.append(row)
                    sampled_seqs.append(seq)
            times.decode = time.perf_counter() - start

        result: dict[int, SampledToken] = {}
        if sampled_seqs:
            start = time.perf_counter()
            logits = self.model.logits(torch.stack(hidden_rows), timer)  # (B, V)
            sample_start = time.perf_counter()
            rows = [self._row_state(s) for s in sampled_seqs]
            if masks is not None:
                self._apply_masks(masks, rows, sampled_seqs)
            out = self.sampler.sample(logits, rows)
            for i, seq in enumerate(sampled_seqs):
                dead = out.dead[i]
                complete = not dead and seq.matcher is not None and advance(seq.matcher, out.token_ids[i])
                result[seq.seq_id] = SampledToken(
                    out.token_ids[i], out.logprobs[i], tuple(out.top_logprobs[i]), complete=complete, dead=dead
                )
            end = time.perf_counter()
            times.sampling += end - start  # LM head + sampling
            if timer is not None:
                timer.seconds["sampling"] = end - sample_start
        if timer is not None:
            times.stages = timer.seconds
        self.last_times = times
        return result

    # -- forward passes ------------------------------------------------------------------------

    def _prefill(self, chunks: list[PrefillChunk], timer: StageTimer | None) -> Tensor:
        B = len(chunks)
        T = max(c.num_tokens for c in chunks)
        ids = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for b, c in enumerate(chunks):
            n = c.num_tokens
            ids[b, :n] = torch.tensor(c.token_ids)
            positions[b, :n] = torch.arange(c.start, c.start + n)
            positions[b, n:] = c.start + n - 1  # padding queries look at real keys; output unused
            valid[b, :n] = True
        slot_list = self._slots([c.seq for c in chunks])
        num_keys = int(positions.max()) + 1
        start = chunks[0].start
        unpadded = all(c.num_tokens == T for c in chunks)
        aligned = unpadded and all(c.start == start for c in chunks)  # every row at the same positions
        mask = None  # batch-invariant rows attend at their exact sizes and need none
        if not ((aligned and start == 0) or self.batch_invariant):
            mask = (torch.arange(num_keys)[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, Tk)
        slot_tensor = torch.tensor(slot_list, dtype=torch.long)
        layout = AttentionLayout(
            slots=slot_tensor.to(self.device),
            slot_range=_slot_range(slot_list),
            valid=None if unpadded else valid.to(self.device),
            write_slots=slot_tensor[:, None].expand(B, T)[valid].to(self.device),
            write_positions=positions[valid].to(self.device),
            num_keys=num_keys,
            mask=None if mask is None else mask.to(self.device),
            write_span=(start, start + T) if aligned else None,
            rows=tuple((s, c.start, c.num_tokens) for s, c in zip(slot_list, chunks, strict=True))
            if self.batch_invariant
            else None,
        )
        hidden: Tensor = self.model(ids.to(self.device), positions.to(self.device), layout, self.cache, timer=timer)
        return hidden

    def _decode(self, seqs: list[Sequence], timer: StageTimer | None) -> Tensor:
        slot_list = self._slots(seqs)
        positions_l = [s.num_computed for s in seqs]
        ids = torch.tensor([[s.tokens[s.window_start + s.num_computed]] for s in seqs], dtype=torch.long)
        positions = torch.tensor(positions_l, dtype=torch.long)
        position = max(positions_l)
        aligned = min(positions_l) == position  # every row writes the same position: a slice copy
        num_keys = position + 1
        needs_mask = not aligned  # every row sees every key otherwise
        rows = None
        if self.one_query:  # each row attends over its own keys in skinny.c: no mask, no padding
            needs_mask = False
        elif self.padded_decode:
            # every row attends over its keys padded to whole KEY_BLOCKs, the batch over its
            # widest row's: extra blocks are masked keys, which the kernel adds as exact zeros
            num_keys, needs_mask = padded_keys(num_keys), True
        elif self.batch_invariant:  # this machine's kernel is not invariant under padding
            rows = tuple((s, p, 1) for s, p in zip(slot_list, positions_l, strict=True))
            needs_mask = False
        mask = None
        if needs_mask:
            mask = decode_mask(positions, num_keys)
        slot_tensor = torch.tensor(slot_list, dtype=torch.long).to(self.device)
        layout = AttentionLayout(
            slots=slot_tensor,
            slot_range=_slot_range(slot_list),
            valid=None,
            write_slots=slot_tensor,
            write_positions=positions.to(self.device),
            num_keys=num_keys,
            mask=None if mask is None else mask.to(self.device),
            write_span=(position, position + 1) if aligned else None,
            rows=rows,
            one_query=self.one_query,
        )
        hidden: Tensor = self.model(
            ids.to(self.device), positions[:, None].to(self.device), layout, self.cache, timer=timer
        )
        return hidden

    @staticmethod
    def _slots(seqs: list[Sequence]) -> list[int]:
        slots = [s.slot for s in seqs]
        assert all(s is not None for s in slots), "a scheduled sequence has no KV-cache slot"
        return [s for s in slots if s is not None]

    # -- scoring -------------------------------------------------------------------------------

    def _score(
        self, chunks: list[PrefillChunk], hidden: Tensor, timer: StageTimer | None
    ) -> dict[int, list[ScoredPosition]]:
        """The scored tokens of the Score requests' (and echoed prompts') chunks: the LM head on the rows that predict
        one (and on no other), the log-probability of the token that follows, its rank, and the
        most likely tokens. Rows are independent, so a token's numbers do not depend on its batch
        in batch-invariant mode."""
        rows: list[Tensor] = []
        spans: list[tuple[Sequence, list[int], int]] = []  # (seq, its scored token ids, top_logprobs)
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            if not seq.scores_prompt:
                continue
            # row j predicts the token at window position chunk.start + j + 1
            lo = max(0, seq.first_scored - 1 - chunk.start)
            hi = min(chunk.num_tokens, len(seq.prompt_ids) - 1 - chunk.start)
            if lo >= hi:
                spans.append((seq, [], 0))
                continue
            rows.append(hidden[i, lo:hi])
            spans.append((seq, seq.prompt_ids[chunk.start + lo + 1 : chunk.start + hi + 1], seq.request.top_logprobs))
        scored: dict[int, list[ScoredPosition]] = {seq.seq_id: [] for seq, _, _ in spans}
        if not rows:
            return scored
        log_probs = self.model.logits(torch.cat(rows), timer).float().log_softmax(dim=-1)  # (N, V)
        targets = torch.tensor([t for _, ids, _ in spans for t in ids], dtype=torch.long, device=log_probs.device)
        chosen = log_probs.gather(1, targets[:, None])  # (N, 1)
        ranks = ((log_probs > chosen).sum(dim=-1) + 1).tolist()
        chosen_l = chosen[:, 0].tolist()
        max_top = max(top for _, _, top in spans)
        top_values: list[list[float]] = []
        top_ids: list[list[int]] = []
        if max_top:
            best = log_probs.topk(max_top, dim=-1)
            top_values, top_ids = best.values.tolist(), best.indices.tolist()
        row = 0
        for seq, ids, top in spans:
            for token_id in ids:
                alternatives = tuple(zip(top_ids[row][:top], top_values[row][:top], strict=True)) if top else ()
                scored[seq.seq_id].append(ScoredPosition(token_id, chosen_l[row], ranks[row], alternatives))
                row += 1
        return scored

    # -- constraints ---------------------------------------------------------------------------

    def _start_masks(self, plan: StepPlan) -> tuple[list[Sequence], Future[np.ndarray]] | None:
        """The sequences this step samples that have a constraint, and their masks being computed
        on the masks' worker thread (None when there are none)."""
        constrained = [s for s in plan.sampled if s.matcher is not None]
        if not constrained:
            return None
        return constrained, self.masks.start([s.matcher for s in constrained])

    def _apply_masks(
        self, masks: tuple[list[Sequence], Future[np.ndarray]], rows: list[RowState], seqs: list[Sequence]
    ) -> None:
        constrained, future = masks
        allowed = self.masks.result(future)
        index = {seq.seq_id: i for i, seq in enumerate(constrained)}
        for row, seq in zip(rows, seqs, strict=True):
            i = index.get(seq.seq_id)
            if i is not None:
                # a matcher in error admits nothing (its mask would be end-of-text alone): the row is dead
                row.allowed = allowed[i] if not is_dead(seq.matcher) else torch.zeros_like(allowed[i])

    # -- sampling ------------------------------------------------------------------------------

    def _row_state(self, seq: Sequence) -> RowState:
        params = seq.request.sampling
        stopping = seq.request.stopping
        generator = None
        if not params.greedy:
            generator = self._generators.get(seq.seq_id)
            if generator is None:
                generator = torch.Generator().manual_seed(seq.seed)
                self._generators[seq.seq_id] = generator
        banned: tuple[int, ...] = ()
        if seq.num_output < stopping.min_new_tokens:
            banned = stopping.stop_token_ids if stopping.ignore_eos else (self.eos_token_id, *stopping.stop_token_ids)
        return RowState(
            params=params,
            generator=generator,
            context_ids=seq.tokens if params.repetition_penalty != 1.0 else (),
            output_ids=seq.output_ids if params.presence_penalty or params.frequency_penalty else (),
            banned_ids=banned,
            top_logprobs=seq.request.top_logprobs,
            excluded_ids=seq.excluded_ids() if seq.bad_word_ids else (),
        )
