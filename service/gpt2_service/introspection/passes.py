"""Introspection's model half: one forward pass of the serving model per question, made into a result.

Every number comes from ``GPT2.stages`` (the forward pass) with a ``Capture``, never from a
second implementation, and every draw from the engine's sampler. Inputs arrive checked and
tokenized (introspection.py). Each pass is work in pieces (core/pieces.py), one per model stage;
the pieces are not thread-safe with generation: run them on the engine thread, between steps.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_service.core.pieces import Pieces, advance
from gpt2_service.engine.sampler import FilterParams, apply_filters, draw, next_uniforms
from gpt2_service.introspection.results import (
    AttentionResult,
    Candidate,
    EmbedResult,
    FloatArray,
    HiddenStatesResult,
    PredictNextResult,
    SamplingOptions,
    StageTrace,
    TensorStats,
    TokenInfo,
    TraceResult,
)
from gpt2_service.model.gpt2 import Capture, StageTimer
from gpt2_service.model.weights import LoadedModel

Tokens = tuple[TokenInfo, ...]
T = TypeVar("T")


class ForwardPasses:
    """The forward pass behind each introspection question, over the whole input (plain causal
    attention, no KV-cache)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.n_head = loaded.model.config.n_head
        self.d_model = loaded.model.config.n_embd
        self._device = next(loaded.model.parameters()).device

    @torch.inference_mode()
    def embed(self, tokens: Tokens) -> Pieces[EmbedResult]:
        capture = Capture(embeddings=True, hidden_states=True)
        yield from self._forward(tokens, capture)
        assert capture.token_embeddings is not None and capture.position_embeddings is not None
        summed = capture.hidden[0][0].float()  # (T, d): the tensor block 0 reads
        unit = F.normalize(summed, dim=-1)
        return EmbedResult(
            tokens=tokens,
            token_embeddings=_to_numpy(capture.token_embeddings[0]),
            position_embeddings=_to_numpy(capture.position_embeddings[0]),
            input_embeddings=_to_numpy(summed),
            cosine_similarity=_to_numpy(unit @ unit.T),
        )

    @torch.inference_mode()
    def attention(
        self, tokens: Tokens, layer_list: list[int], head_list: list[int], include_scores: bool
    ) -> Pieces[AttentionResult]:
        capture = Capture(layers=frozenset(layer_list), attention_weights=True, attention_scores=include_scores)
        yield from self._forward(tokens, capture)
        head_index = None if len(head_list) == self.n_head else torch.tensor(head_list, device=self._device)

        def gather(per_layer: dict[int, Tensor]) -> FloatArray:
            stacked = torch.stack([per_layer[layer][0] for layer in layer_list])  # (L, nh, T, T)
            return _to_numpy(stacked if head_index is None else stacked.index_select(1, head_index))

        return AttentionResult(
            tokens=tokens,
            layers=tuple(layer_list),
            heads=tuple(head_list),
            weights=gather(capture.attn),
            scores=gather(capture.scores) if include_scores else None,
        )

    @torch.inference_mode()
    def hidden_states(
        self, tokens: Tokens, layer_list: list[int], positions: tuple[int, ...], include_vectors: bool
    ) -> Pieces[HiddenStatesResult]:
        capture = Capture(hidden_states=True)
        yield from self._forward(tokens, capture)
        start = positions[0]
        states = torch.stack([capture.hidden[i][0, start:] for i in layer_list]).float()  # (L, P, d)
        return HiddenStatesResult(
            tokens=tokens,
            layers=tuple(layer_list),
            positions=positions,
            norms=_to_numpy(torch.linalg.vector_norm(states, dim=-1)),
            vectors=_to_numpy(states) if include_vectors else None,
        )

    @torch.inference_mode()
    def predict_next(self, tokens: Tokens, options: SamplingOptions) -> Pieces[PredictNextResult]:
        hidden = yield from self._forward(tokens, None)
        return self._predict(tokens, self.model.logits(hidden[0, -1:]), options)

    @torch.inference_mode()
    def next_logits(self, ids: Sequence[int]) -> Pieces[Tensor]:
        """The LM head on the last position of ``ids`` (1, V): PredictNext's forward pass, from ids."""
        ids_tensor = torch.tensor([list(ids)], dtype=torch.long, device=self._device)
        positions = torch.arange(len(ids), device=self._device)[None]
        hidden = yield from self.model.stages(ids_tensor, positions, capture=None, timer=None)
        return self.model.logits(hidden[0, -1:])

    @torch.inference_mode()
    def trace(
        self, tokens: Tokens, options: SamplingOptions, input_shape: tuple[int, ...], tokenizer_seconds: float
    ) -> Pieces[TraceResult]:
        """The trace's forward pass; its time counts the tokenizer's (done when it was planned),
        not the time its runner spent elsewhere between two pieces."""
        started = time.perf_counter() - tokenizer_seconds
        timer = _StageLog(self._sync)
        capture = Capture(stage_outputs=True)
        away = _Away()
        hidden = yield from away.timed(self._forward(tokens, capture, timer))
        logits = self.model.logits(hidden[0, -1:], timer)  # (1, V)
        sampling_started = time.perf_counter()
        prediction = self._predict(tokens, logits, options)
        sampling_seconds = time.perf_counter() - sampling_started

        stages = [StageTrace("tokenizer", None, input_shape, (len(tokens),), tokenizer_seconds, None)]
        times = timer.by_stage()
        for name, stage_in, stage_out in capture.stages:
            kind = name.rsplit(".", 1)[-1]
            layer = int(name.split(".")[1]) if name.startswith("block.") else None
            seconds = times[kind].popleft() if times[kind] else 0.0
            shapes = tuple(stage_in.shape[1:]), tuple(stage_out.shape[1:])
            stages.append(StageTrace(name, layer, *shapes, seconds, _stats(stage_out)))
        vocab = logits.shape[-1]
        lm_seconds = times["lm_head"].popleft() if times["lm_head"] else 0.0
        stages.append(StageTrace("lm_head", None, (self.d_model,), (vocab,), lm_seconds, _stats(logits)))
        stages.append(StageTrace("sampling", None, (vocab,), (max(options.num_samples, 1),), sampling_seconds, None))
        return TraceResult(tokens, tuple(stages), prediction, time.perf_counter() - started - away.seconds)

    # -- helpers ----------------------------------------------------------------------------------

    def _forward(
        self, tokens: Sequence[TokenInfo], capture: Capture | None, timer: StageTimer | None = None
    ) -> Pieces[Tensor]:
        """One forward pass over the whole input, a piece per stage. (1, T, d)."""
        ids = torch.tensor([[t.id for t in tokens]], dtype=torch.long, device=self._device)
        positions = torch.arange(len(tokens), device=self._device)[None]
        return self.model.stages(ids, positions, capture=capture, timer=timer)

    def _predict(self, tokens: Tokens, logits: Tensor, o: SamplingOptions) -> PredictNextResult:
        """Candidates, greedy token, draws and entropy from the last position's (1, V) logits."""
        assert o.seed is not None, "options.with_seed() picks the seed before the model runs"
        logits = logits.float()
        log_probs = logits.log_softmax(dim=-1)
        probs = log_probs.exp()
        greedy = int(logits.argmax(dim=-1))
        if o.temperature == 0:
            sampled = torch.zeros_like(probs)
            sampled[0, greedy] = 1.0
            drawn = [greedy] * o.num_samples
        else:
            sampled = apply_filters(logits, FilterParams.of_row(o.params, logits.device)).softmax(dim=-1)
            # the engine's draw: one uniform per draw, from a CPU generator seeded with the seed
            generator = torch.Generator().manual_seed(o.seed)
            drawn = draw(sampled, next_uniforms([generator] * o.num_samples)[None])[0].tolist()

        top_ids: list[int] = probs[0].topk(min(o.num_candidates, logits.shape[-1])).indices.tolist()
        wanted = sorted({*top_ids, greedy, *drawn})
        index = torch.tensor(wanted, device=logits.device)
        columns = torch.stack([logits[0], probs[0], sampled[0]]).index_select(1, index).T.tolist()
        values = dict(zip(wanted, columns, strict=True))  # id -> [logit, probability, sampled_probability]

        def candidate(token_id: int) -> Candidate:
            logit, probability, sampled_probability = values[token_id]
            return Candidate(token_id, self._piece_text(token_id), logit, probability, sampled_probability)

        return PredictNextResult(
            tokens=tokens,
            candidates=tuple(candidate(i) for i in top_ids),
            greedy_token=candidate(greedy),
            sampled_tokens=tuple(candidate(i) for i in drawn),
            seed=o.seed,
            entropy=float(torch.special.entr(probs[0]).sum()),
            sampled_entropy=float(torch.special.entr(sampled[0]).sum()),
        )

    def _piece_text(self, token_id: int) -> str:
        return self.tokenizer.id_to_text(token_id) if token_id < self.tokenizer.vocab_size else ""

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)


class _Away:
    """The seconds a piecewise pass spent suspended between its pieces (its runner at other work)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, pieces: Pieces[T]) -> Pieces[T]:
        while (finished := advance(pieces)) is None:
            suspended = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - suspended
        return finished.result


class _StageLog(StageTimer):
    """A StageTimer that also keeps every stage's time in call order: the model reports each
    block's attention as "attention" and its MLP as "mlp", so the order tells the blocks apart.
    ``sync`` waits for the device, so that times mean something on an accelerator."""

    def __init__(self, sync: Callable[[], None]) -> None:
        super().__init__()
        self.events: list[tuple[str, float]] = []
        self._sync = sync
        self._name = ""
        self._started = 0.0

    def start(self, stage: str) -> None:
        self._sync()
        self._name, self._started = stage, time.perf_counter()
        super().start(stage)

    def stop(self) -> None:
        self._sync()
        elapsed = time.perf_counter() - self._started
        super().stop()
        self.events.append((self._name, elapsed))

    def by_stage(self) -> defaultdict[str, deque[float]]:
        times: defaultdict[str, deque[float]] = defaultdict(deque)
        for name, seconds in self.events:
            times[name].append(seconds)
        return times


def _to_numpy(t: Tensor) -> FloatArray:
    """A read-only float32 array on the host."""
    array: FloatArray = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
    array.flags.writeable = False
    return array


def _stats(t: Tensor) -> TensorStats:
    x = t.detach().float()
    return TensorStats(
        mean=float(x.mean()),
        std=float(x.std(correction=0)),
        l2_norm=float(torch.linalg.vector_norm(x)),
        min=float(x.min()),
        max=float(x.max()),
    )
