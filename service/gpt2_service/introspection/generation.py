"""The autoregressive loop made visible: TraceGeneration's steps, each PredictNext on the context so far.

Each step is one forward pass over the whole context (``ForwardPasses.next_logits``, the pass
PredictNext runs), the sampler's own filters (``apply_filters``, applied one stage at a time so
that every stage's distribution can be shown; the last stage is exactly PredictNext's
``sampled_probability``) and the engine's draw: one uniform number per step from one CPU
``torch.Generator`` seeded with the seed, the inverse CDF of the final distribution. So step i's
draw is draw number i of the seed's stream, as in TextGeneration, and PredictNext with
``num_samples=i+1`` on step i's context draws step i's token last. Stopping follows the engine's
scheduler: <|endoftext|> (unless ``ignore_eos``), a stop string in the generated text (the
engine's incremental detokenizer), ``max_new_tokens``; a context longer than the window is
shifted as the scheduler does (the newest ``shift_keep`` tokens kept, re-read from position 0).

A trace's state is its own; its steps are work in pieces (a model stage each, then the sampler):
run them on the engine thread, one step after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from gpt2_service.core.detokenizer import IncrementalDetokenizer
from gpt2_service.core.pieces import Pieces
from gpt2_service.core.request import SamplingParams
from gpt2_service.engine.sampler import FilterParams, apply_filters, draw, next_uniforms
from gpt2_service.introspection.passes import ForwardPasses
from gpt2_service.introspection.results import ChosenToken, GenerationStep, GenerationTraceOptions, StepCandidate
from gpt2_service.model.tokenizer import GPT2Tokenizer

EOS, STOP_SEQUENCE, LENGTH = "eos", "stop_sequence", "length"


def filter_stages(params: SamplingParams) -> list[SamplingParams]:
    """The sampler's filters switched on one at a time, in its order: temperature alone, then
    with top-k, with top-p, with min-p, with typical-p (all of them: the sampler's own)."""
    off = SamplingParams(params.temperature, 0, 1.0, 0.0, 1.0)
    return [
        off,
        replace(off, top_k=params.top_k),
        replace(off, top_k=params.top_k, top_p=params.top_p),
        replace(off, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p),
        replace(off, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, typical_p=params.typical_p),
    ]


class GenerationTrace:
    """One traced generation: call ``step()`` and run its pieces until ``finished``."""

    def __init__(
        self,
        passes: ForwardPasses,
        tokenizer: GPT2Tokenizer,
        prompt_ids: Sequence[int],
        options: GenerationTraceOptions,
        context_window: int,
        shift_keep: int,
    ) -> None:
        assert options.seed is not None, "options.with_seed() picks the seed before the model runs"
        self._passes = passes
        self._tokenizer = tokenizer
        self._options = options
        self._seed: int = options.seed
        self._stages = filter_stages(options.params)
        self._window = context_window
        self._keep = max(1, min(shift_keep, context_window))
        self._ids = list(prompt_ids)
        self._start = 0  # the context's first token (a context shift moves it)
        self._generated: list[int] = []
        greedy = options.temperature == 0
        self._generator = None if greedy else torch.Generator().manual_seed(options.seed)
        self._draws = 0
        self._detokenizer = IncrementalDetokenizer(tokenizer.token_bytes, skip_ids=tokenizer.special_ids,
                                                   stop=options.stop)  # fmt: skip
        self.finished = False

    @torch.inference_mode()
    def step(self) -> Pieces[GenerationStep]:
        """The next step: a piece per model stage, the sampler with the last one."""
        assert not self.finished, "the trace has finished"
        shifted = len(self._ids) - self._start > self._window
        if shifted:
            self._start = len(self._ids) - self._keep
        context = self._ids[self._start :]
        logits = (yield from self._passes.next_logits(context)).float()  # (1, V)
        o = self._options
        log_probs = logits.log_softmax(dim=-1)
        probs = log_probs.exp()
        greedy = int(logits.argmax(dim=-1))
        uniform: float | None = None
        draw_index: int | None = None
        if self._generator is None:  # temperature 0: the argmax, no draw
            one_hot = torch.zeros_like(probs)
            one_hot[0, greedy] = 1.0
            stages = [one_hot] * len(self._stages)
            chosen = greedy
        else:
            stages = [
                apply_filters(logits, FilterParams.of_row(p, logits.device)).softmax(dim=-1) for p in self._stages
            ]
            uniforms = next_uniforms([self._generator])  # (1,): this step's number of the seed's stream
            chosen = int(draw(stages[-1], uniforms[None])[0, 0])
            uniform, draw_index = float(uniforms[0]), self._draws
            self._draws += 1

        top_ids: list[int] = probs[0].topk(min(o.num_candidates, logits.shape[-1])).indices.tolist()
        wanted = sorted({*top_ids, chosen})
        index = torch.tensor(wanted, device=logits.device)
        columns = torch.stack([logits[0], probs[0], *(s[0] for s in stages)]).index_select(1, index).T.tolist()
        values = dict(zip(wanted, columns, strict=True))  # id -> [logit, probability, stage 1..5]
        candidates = tuple(self._candidate(i, values[i], rank) for rank, i in enumerate(top_ids, start=1))
        logit, probability, *_, final = values[chosen]
        chosen_token = ChosenToken(chosen, self._text(chosen), logit, probability, final, _rank(logits, chosen))

        stop = self._advance(chosen)
        text = self._detokenizer.text if stop == STOP_SEQUENCE else self._tokenizer.decode(self._generated)
        return GenerationStep(
            step=len(self._generated) - 1,
            context_length=len(context),
            candidates=candidates,
            chosen=chosen_token,
            uniform=uniform,
            draw_index=draw_index,
            seed=self._seed,
            text_so_far=text,
            stop=stop,
            shifted=shifted,
            entropy=float(torch.special.entr(probs[0]).sum()),
            sampled_entropy=float(torch.special.entr(stages[-1][0]).sum()),
        )

    def _advance(self, token_id: int) -> str | None:
        """Append the chosen token; the finish reason when it ends the generation (the scheduler's
        order: EOS, then a stop string, then the length)."""
        self._ids.append(token_id)
        self._generated.append(token_id)
        o = self._options
        stop: str | None = None
        if token_id == self._tokenizer.eos_token_id and not o.ignore_eos:
            stop = EOS
        elif self._detokenizer.add(token_id).stop is not None:
            stop = STOP_SEQUENCE
        if stop is None and len(self._generated) >= o.max_new_tokens:
            stop = LENGTH
        self.finished = stop is not None
        return stop

    def _candidate(self, token_id: int, values: list[float], rank: int) -> StepCandidate:
        logit, probability, temperature, top_k, top_p, min_p, typical_p = values
        text = self._text(token_id)
        return StepCandidate(token_id, text, logit, probability, temperature, top_k, top_p, min_p, typical_p, rank)

    def _text(self, token_id: int) -> str:
        return self._tokenizer.id_to_text(token_id) if token_id < self._tokenizer.vocab_size else ""


def _rank(logits: Tensor, token_id: int) -> int:
    """1 + how many tokens have a larger raw logit."""
    return int((logits[0] > logits[0, token_id]).sum()) + 1
