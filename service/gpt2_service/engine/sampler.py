"""Choose the next token for every row of a batch, each row with its own parameters.

Order of operations: the token constraints first (logit bias added; tokens outside
``allowed_token_ids``, in ``banned_token_ids``, completing a bad word, or outside a constraint's
mask at -inf), then Hugging Face's logits-processor order: repetition penalty, presence and
frequency penalties, min-new-tokens masking, then greedy argmax, or temperature -> top-k ->
top-p -> min-p -> typical-p and a draw. Each filter runs once over the whole batch, with neutral
values for rows that do not use it, and is skipped when no row does.

A draw uses one uniform number from the row's own ``torch.Generator`` and the inverse CDF of the
row's distribution, so a seeded request's draws do not depend on what else shares its batch, and
each row's arithmetic is its own (stable sorts; no one-row reductions that threads would split):
given the same logits, a row gets the same tokens alone or batched, bit for bit.
Log-probabilities are those of the model's distribution after the token constraints, before
penalties and filters: the raw one for a row without constraints, computed only where read
(``_LogSoftmax``: each row's maximum and log-sum-exp in one C pass on the CPU). A row whose
constraints leave no token is ``dead``: nothing is drawn for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2_service.core.request import SamplingParams
from gpt2_service.model import skinny

NEG_INF = float("-inf")


@dataclass
class RowState:
    """What the sampler needs about one row besides its parameters."""

    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    context_ids: Sequence[int] = ()  # prompt + output (repetition penalty)
    output_ids: Sequence[int] = ()  # output only (presence / frequency penalties)
    banned_ids: Sequence[int] = ()  # masked this step (EOS and stop ids before min_new_tokens)
    top_logprobs: int = 0
    excluded_ids: Sequence[int] = ()  # this step's tokens that would complete a bad word
    allowed: Tensor | None = None  # (V,) bool: the tokens a constraint allows this step

    @property
    def constrained(self) -> bool:
        p = self.params
        return bool(
            p.logit_bias or p.allowed_token_ids or p.banned_token_ids or self.excluded_ids or self.allowed is not None
        )


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]  # per row, best first
    dead: list[bool]  # per row: its constraints left no token (its token id is meaningless)


@dataclass(frozen=True)
class FilterParams:
    """Per-row filter parameters as (B,) tensors."""

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    min_p: Tensor
    typical_p: Tensor

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], device: torch.device) -> FilterParams:
        def col(values: list[float], dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=col([p.temperature if p.temperature > 0 else 1.0 for p in params]),
            top_k=col([p.top_k for p in params], torch.long),
            top_p=col([p.top_p for p in params]),
            min_p=col([p.min_p for p in params]),
            typical_p=col([p.typical_p for p in params]),
        )

    @classmethod
    def of_row(cls, params: SamplingParams, device: torch.device) -> FilterParams:
        """One row's filter parameters, as (1,) tensors."""
        return cls.from_params([params], device)


def apply_filters(logits: Tensor, f: FilterParams) -> Tensor:
    """Temperature, top-k, top-p, min-p and typical-p, each per row. (B, V) -> (B, V)."""
    if bool((f.temperature != 1.0).any()):
        logits = logits / f.temperature[:, None]
    vocab = logits.shape[-1]
    if bool((f.top_k > 0).any()):
        k = torch.where(f.top_k > 0, f.top_k.clamp(max=vocab), vocab)
        sorted_desc = logits.sort(dim=-1, descending=True, stable=True).values
        kth = sorted_desc.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if bool((f.top_p < 1.0).any()):
        sorted_asc, order = logits.sort(dim=-1, stable=True)
        cumulative = sorted_asc.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - f.top_p)[:, None]
        remove[:, -1] = False
        remove &= (f.top_p < 1.0)[:, None]
        logits = logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)
    if bool((f.min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = f.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, NEG_INF)
    if bool((f.typical_p < 1.0).any()):
        logits = _typical(logits, f.typical_p)
    return logits


def _typical(logits: Tensor, mass: Tensor) -> Tensor:
    """Locally typical sampling (Meister et al.), as Hugging Face's TypicalLogitsWarper."""
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    terms = torch.where(probs > 0, log_probs * probs, 0.0)  # 0 * -inf of filtered tokens counts 0
    # a running sum's last value, not .sum(): a sum over one row is split across threads (its
    # rounding then depends on the batch size), a cumulative sum is one sequential pass per row
    entropy = -terms.cumsum(dim=-1)[:, -1:]
    surprise_gap = (-log_probs - entropy).abs()
    sorted_gap, order = surprise_gap.sort(dim=-1, stable=True)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass[:, None]).sum(dim=1).clamp(max=logits.shape[-1] - 1)
    remove = sorted_gap > sorted_gap.gather(1, last[:, None])
    remove[:, 0] = False
    remove &= (mass < 1.0)[:, None]
    return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def apply_penalties(logits: Tensor, rows: Sequence[RowState]) -> Tensor:
    """Repetition (HF: divide positive, multiply negative logits of seen tokens) and presence /
    frequency (OpenAI: subtract per output-token presence and count) penalties, in place."""
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0 and row.context_ids:
            ids = torch.tensor(list(set(row.context_ids)), dtype=torch.long, device=logits.device)
            seen = logits[i, ids]
            logits[i, ids] = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and row.output_ids:
            counts = torch.bincount(
                torch.tensor(row.output_ids, dtype=torch.long, device=logits.device), minlength=vocab
            ).to(logits.dtype)
            logits[i] -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


class Sampler:
    """Turns a (B, V) block of logits into one token per row."""

    def sample(self, logits: Tensor, rows: Sequence[RowState]) -> SampleResult:
        logits = logits.float()
        dead = [False] * len(rows)
        if any(r.constrained for r in rows):
            logits = apply_token_constraints(logits.clone(), rows)
            alive = logits.amax(dim=-1) > NEG_INF  # a row with a token left (10x cheaper than isfinite().any())
            if not bool(alive.all()):
                dead = (~alive).tolist()
                logits[~alive] = 0.0  # something to sample from; the caller drops the token
        raw = _LogSoftmax(logits)
        processed = logits
        if any(r.params.needs_penalties for r in rows):
            processed = apply_penalties(processed.clone(), rows)
        if any(r.banned_ids for r in rows):
            processed = processed.clone() if processed is logits else processed
            for i, row in enumerate(rows):
                if row.banned_ids:
                    banned = list(row.banned_ids)
                    kept = processed[i, banned].clone()
                    processed[i, banned] = NEG_INF
                    if row.constrained and not bool(torch.isfinite(processed[i]).any()):
                        processed[i, banned] = kept  # min_new_tokens gives way to the constraint

        # argmax's first maximum: from the log-softmax's pass where it has one, else torch's max
        # (in a third of argmax's time)
        reused = raw.first_max if processed is logits else None
        chosen = reused if reused is not None else processed.max(dim=-1).indices
        sampled_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled_rows:
            index = torch.tensor(sampled_rows, dtype=torch.long, device=logits.device)
            filters = FilterParams.from_params([rows[i].params for i in sampled_rows], logits.device)
            probs = apply_filters(processed[index], filters).softmax(dim=-1)
            chosen[index] = draw(probs, next_uniforms([rows[i].generator for i in sampled_rows])[:, None])[:, 0]

        token_ids = chosen.tolist()
        logprobs = raw.gather(chosen[:, None])[:, 0].tolist()
        top: list[list[tuple[int, float]]] = [[] for _ in rows]
        max_top = max((r.top_logprobs for r in rows), default=0)
        if max_top > 0:
            values, ids = raw.topk(max_top)
            values_l, ids_l = values.tolist(), ids.tolist()
            for i, row in enumerate(rows):
                n = row.top_logprobs
                top[i] = list(zip(ids_l[i][:n], values_l[i][:n], strict=True))
        return SampleResult(token_ids, logprobs, top, dead)


class _LogSoftmax:
    """The log-softmax of a (B, V) block of logits, computed only where it is read. On the CPU in
    float32 with skinny.c built, each row's first maximum, its value m and log(sum(exp(x - m)))
    come from one C pass (skinny.pick; a row by one thread, in a fixed order): an entry is then
    (x - m) - that, the formula of torch's log_softmax, without writing B x V values (at 32 rows,
    0.56 ms against 1.05 for log_softmax and max). Elsewhere torch's log_softmax."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits
        lib = skinny.library() if logits.is_cpu and logits.dtype is torch.float32 else None
        self.first_max: Tensor | None = None  # (B,) each row's first index of its largest logit
        if lib is None:
            self.full: Tensor | None = logits.log_softmax(dim=-1)
        else:
            self.full = None
            self.first_max, top, log_sum = skinny.pick(lib, logits.contiguous())
            self._top, self._log_sum = top[:, None], log_sum[:, None]

    def gather(self, ids: Tensor) -> Tensor:
        """(B, k) log-probabilities of ``ids`` (B, k)."""
        if self.full is not None:
            return self.full.gather(1, ids)
        return (self.logits.gather(1, ids) - self._top) - self._log_sum

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """The k largest log-probabilities of each row and their ids, best first."""
        if self.full is not None:
            values, ids = self.full.topk(k, dim=-1)
            return values, ids
        values, ids = self.logits.topk(k, dim=-1)  # the same order: x -> (x - m) - c is monotonic
        return (values - self._top) - self._log_sum, ids


def apply_token_constraints(logits: Tensor, rows: Sequence[RowState]) -> Tensor:
    """Logit bias, then allowed / banned / bad-word / constraint masks, in place: one masked fill
    for the batch's allowed sets, a scatter per row for the rest."""
    allowed: Tensor | None = None
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=logits.device)
            logits[i].index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=logits.device))
        if p.allowed_token_ids or row.allowed is not None:
            if allowed is None:
                allowed = torch.ones_like(logits, dtype=torch.bool)
            if row.allowed is not None:
                allowed[i] = row.allowed
            if p.allowed_token_ids:
                only = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                only[list(p.allowed_token_ids)] = True
                allowed[i] &= only
        banned = [*p.banned_token_ids, *row.excluded_ids]
        if banned:
            logits[i, banned] = NEG_INF
    if allowed is not None:
        logits.masked_fill_(~allowed, NEG_INF)
    return logits


def next_uniforms(generators: Sequence[torch.Generator | None]) -> Tensor:
    """One uniform number from each generator, in order, on the CPU. (n,). A generator that
    appears more than once gives its next number each time."""
    if not generators:
        return torch.empty(0)
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def draw(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draws: row b of ``probs`` (B, V) once for each of row b's ``uniforms`` (B, K).
    -> (B, K). The same probabilities and uniforms give the same tokens, whatever B and K are."""
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(probs.device) * cdf[:, -1:]
    # right=True: first index whose cdf exceeds the target, so never a zero-probability token
    drawn = torch.searchsorted(cdf, target, right=True)
    # rounding can put the target at the very top of the CDF: take the last possible token
    vocab = probs.shape[-1]
    last_possible = vocab - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.where(drawn >= vocab, last_possible, drawn)
