"""GPT-2's building blocks in PyTorch, written once for generation and introspection.

Token + position embedding, n_layer blocks of (pre-LayerNorm masked multi-head attention,
pre-LayerNorm GELU MLP, each with a residual), a final LayerNorm and the LM head tied to the
token embedding. Parameter names and shapes match Hugging Face checkpoints (``Conv1D`` weights
read (in, out); in memory they are (out, in), see ``Conv1D``), so a state dict loads as it is.

The forward pass works on a padded batch of sequences of different lengths. Keys and values come
either from the KV-cache (generation: ``AttentionLayout`` says where each token is written and
which cached positions each query sees) or from the input alone (introspection and reference
checks: plain causal attention). An optional ``Capture`` records intermediate values and an
optional ``StageTimer`` accumulates time per stage; both are ``None`` on the hot path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2_service.kv_cache import KVCache


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation: str = "tanh"  # GELU approximation: "tanh" (GPT-2's gelu_new) or "none" (exact)

    @property
    def d_ff(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class AttentionLayout:
    """Where a batch's tokens live in the KV-cache. Built once per forward, shared by all layers.

    write_slots/write_positions list the (slot, position) of every real (non-padding) token in
    row-major order of the (B, T) input; ``write_span`` (first, end) says instead that every row
    writes positions first..end-1, with no padding (a slice copy rather than a scatter). Each query
    attends to cached positions 0..num_keys-1 of its row's slot, limited by ``mask``
    (B, 1, T, num_keys): True where the key is visible. ``mask`` is None when causality alone
    decides and T == 1 or T == num_keys: every row decodes at position num_keys-1, or every row
    prefills positions 0..T-1.

    ``rows`` (batch-invariant mode) lists each row's (slot, first position, real tokens): attention
    then runs row by row at the row's exact size, so padding and neighbours cannot change a bit of
    it (``mask`` is unused).
    """

    slots: Tensor  # (B,) slot of each row
    slot_range: tuple[int, int] | None  # (first, end) when slots are consecutive: read a view
    valid: Tensor | None  # (B, T) bool, True for real tokens; None when every token is real
    write_slots: Tensor  # (N,)
    write_positions: Tensor  # (N,)
    num_keys: int
    mask: Tensor | None  # (B, 1, T, num_keys) bool
    write_span: tuple[int, int] | None = None
    rows: tuple[tuple[int, int, int], ...] | None = None


@dataclass
class Capture:
    """Intermediate values to record during one forward pass (for introspection).

    layers: which blocks' attention to keep (None = all). Hidden states follow Hugging Face's
    ``output_hidden_states`` indexing: 0 = embeddings, i = after block i, last = after ln_f.
    """

    layers: frozenset[int] | None = None
    attention_weights: bool = False
    attention_scores: bool = False
    hidden_states: bool = False
    embeddings: bool = False
    stage_outputs: bool = False
    attn: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, nh, T, Tk)
    scores: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, nh, T, Tk), pre-softmax
    hidden: list[Tensor] = field(default_factory=list)  # (B, T, d) each
    token_embeddings: Tensor | None = None
    position_embeddings: Tensor | None = None
    stages: list[tuple[str, Tensor, Tensor]] = field(default_factory=list)  # (name, input, output)

    def wants_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


class StageTimer:
    """Accumulates wall time per named stage over one or more forward passes.

    Torch on CPU runs synchronously, so a perf_counter pair around a stage measures it; on an
    accelerator the engine leaves this off (timing would need a device sync per stage).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stage = ""
        self._start = 0.0

    def start(self, stage: str) -> None:
        self._stage = stage
        self._start = time.perf_counter()

    def stop(self) -> None:
        elapsed = time.perf_counter() - self._start
        self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + elapsed


# oneDNN's fp32 linear (what torch.compile's CPU backend calls) beat MKL's sgemm by 1.2-1.7x for
# 8 to 64 rows and GPT-2's shapes (1.8-2x for the LM head) on the 2-core AMD EPYC we measured, and
# streamed a one-row product's weights 1.1-1.6x faster than MKL's matrix-vector product. It costs
# about 50 us per call more than MKL, which only tiny models notice.
_ONEDNN_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise")  # registered only in builds with oneDNN


def onednn_applies(x: Tensor) -> bool:
    """Whether ``linear`` sends x to oneDNN (CPU, float32, a torch built with oneDNN)."""
    return _ONEDNN_LINEAR and x.is_cpu and x.dtype is torch.float32


_PAD_ONE_ROW: ContextVar[bool] = ContextVar("gpt2_linear_pad_one_row", default=False)


@contextmanager
def batch_invariant_kernels() -> Iterator[None]:
    """Within the block (on this thread), ``linear`` computes each row bitwise the same whatever
    the number of rows: oneDNN does so for 2 rows and more (checked for 2..2048 in
    tests/test_batch_invariance.py) but takes another path for one row, so one row is padded to
    two. Attention is made invariant separately (``AttentionLayout.rows``)."""
    token = _PAD_ONE_ROW.set(True)
    try:
        yield
    finally:
        _PAD_ONE_ROW.reset(token)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for x (..., in) and a row-major weight (out, in), as F.linear;
    on CPU in float32 with oneDNN's kernel."""
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    out: Tensor
    if onednn_applies(rows) and weight.is_contiguous():
        if rows.shape[0] == 1 and _PAD_ONE_ROW.get():  # batch-invariant mode: see batch_invariant_kernels
            out = _onednn_linear(torch.cat([rows, torch.zeros_like(rows)]), weight, bias)[:1]
        else:
            out = _onednn_linear(rows, weight, bias)
    else:
        out = F.linear(rows, weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def _onednn_linear(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out: Tensor = torch.ops.mkldnn._linear_pointwise.default(rows, weight, bias, "none", [], "")
    return out


class Conv1D(nn.Module):
    """A linear layer whose ``weight`` reads (in, out), the layout of GPT-2 checkpoints.

    In memory the weight is (out, in), row-major, as the matmul kernels want it: ``weight`` is a
    transposed view, so state dicts load (and read) in the checkpoint layout with no copy.
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in).t())
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight.t(), self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(
        self,
        x: Tensor,  # (B, T, d)
        layout: AttentionLayout | None,
        cache: KVCache | None,
        capture: Capture | None,
    ) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

        mask: Tensor | None
        if cache is None or layout is None:
            keys, values, mask = k, v, None  # attend within the input only, causally
        else:
            self._write(cache, layout, k, v)
            if layout.rows is not None and capture is None:
                y = self._attention_by_row(q, cache, layout.rows)
                return self._project(y)
            keys, values = self._read(cache, layout)
            mask = layout.mask

        if (
            capture is not None
            and capture.wants_layer(self.layer)
            and (capture.attention_weights or capture.attention_scores)
        ):
            y = self._explicit_attention(q, keys, values, mask, capture)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self._project(y)

    def _project(self, y: Tensor) -> Tensor:
        B, _, T, _ = y.shape
        out: Tensor = self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        return out

    def _attention_by_row(self, q: Tensor, cache: KVCache, rows: tuple[tuple[int, int, int], ...]) -> Tensor:
        """Each row against its own cached keys 0..start+n-1, one SDPA call per row (shapes that
        depend on the row alone). Padding queries get zeros."""
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
        y = q.new_zeros(q.shape)
        for b, (slot, start, n) in enumerate(rows):
            end = start + n
            qb, kb, vb = q[b : b + 1, :, :n], k_cache[slot : slot + 1, :, :end], v_cache[slot : slot + 1, :, :end]
            if n == 1 or start == 0:
                y[b : b + 1, :, :n] = F.scaled_dot_product_attention(qb, kb, vb, is_causal=n > 1)
            else:  # a later prefill chunk: query i sees keys 0..start+i
                mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(start)
                y[b : b + 1, :, :n] = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        return y

    def _write(self, cache: KVCache, layout: AttentionLayout, k: Tensor, v: Tensor) -> None:
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]  # (S, nh, L, hs)
        if layout.write_span is not None:  # every row writes the same positions: copy slices
            start, end = layout.write_span
            if layout.slot_range is not None:
                first, last = layout.slot_range
                k_cache[first:last, :, start:end] = k
                v_cache[first:last, :, start:end] = v
            else:
                k_cache[:, :, start:end].index_copy_(0, layout.slots, k)
                v_cache[:, :, start:end].index_copy_(0, layout.slots, v)
        else:
            k_rows = k.transpose(1, 2)  # (B, T, nh, hs)
            v_rows = v.transpose(1, 2)
            if layout.valid is not None:
                k_rows, v_rows = k_rows[layout.valid], v_rows[layout.valid]  # (N, nh, hs)
            else:
                k_rows, v_rows = k_rows.reshape(-1, *k_rows.shape[2:]), v_rows.reshape(-1, *v_rows.shape[2:])
            k_cache[layout.write_slots, :, layout.write_positions] = k_rows
            v_cache[layout.write_slots, :, layout.write_positions] = v_rows

    def _read(self, cache: KVCache, layout: AttentionLayout) -> tuple[Tensor, Tensor]:
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]  # (S, nh, L, hs)
        n = layout.num_keys
        if layout.slot_range is not None:
            first, end = layout.slot_range
            return k_cache[first:end, :, :n], v_cache[first:end, :, :n]
        return k_cache[:, :, :n].index_select(0, layout.slots), v_cache[:, :, :n].index_select(0, layout.slots)

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, capture: Capture) -> Tensor:
        T, Tk = q.shape[2], k.shape[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, Tk)
        if mask is None:
            mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if capture.attention_scores:
            capture.scores[self.layer] = scores
        if capture.attention_weights:
            capture.attn[self.layer] = weights
        return weights @ v


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.d_ff)
        self.c_proj = Conv1D(config.d_ff, config.n_embd)
        self.approximate = config.activation

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))
        return out


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        layout: AttentionLayout | None,
        cache: KVCache | None,
        capture: Capture | None,
        timer: StageTimer | None,
    ) -> Tensor:
        if timer is None and capture is None:  # the hot path
            x = x + self.attn(self.ln_1(x), layout, cache, None)
            out: Tensor = x + self.mlp(self.ln_2(x))
            return out
        layer = self.attn.layer
        if timer is not None:
            timer.start("attention")
        attn_in = x
        x = x + self.attn(self.ln_1(x), layout, cache, capture)
        if timer is not None:
            timer.stop()
            timer.start("mlp")
        mlp_in = x
        x = x + self.mlp(self.ln_2(x))
        if timer is not None:
            timer.stop()
        if capture is not None and capture.stage_outputs:
            capture.stages.append((f"block.{layer}.attention", attn_in, mlp_in))
            capture.stages.append((f"block.{layer}.mlp", mlp_in, x))
        return x


class Transformer(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2(nn.Module):
    """GPT-2 with a tied LM head. ``forward`` gives final hidden states; ``logits`` the LM head."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        positions: Tensor,  # (B, T), each < n_positions
        layout: AttentionLayout | None = None,
        cache: KVCache | None = None,
        capture: Capture | None = None,
        timer: StageTimer | None = None,
    ) -> Tensor:
        """Hidden states after the final LayerNorm, (B, T, d)."""
        t = self.transformer
        if timer is not None:
            timer.start("embedding")
        tok = t.wte(input_ids)
        pos = t.wpe(positions)
        x = tok + pos  # (B, T, d)
        if timer is not None:
            timer.stop()
        if capture is not None:
            if capture.embeddings:
                capture.token_embeddings, capture.position_embeddings = tok, pos
            if capture.hidden_states:
                capture.hidden.append(x)
            if capture.stage_outputs:
                capture.stages.append(("embedding", input_ids, x))
        for block in t.h:
            x = block(x, layout, cache, capture, timer)
            if capture is not None and capture.hidden_states:
                capture.hidden.append(x)
        if timer is not None:
            timer.start("final_layer_norm")
        out: Tensor = t.ln_f(x)
        if timer is not None:
            timer.stop()
        if capture is not None:
            if capture.hidden_states:
                capture.hidden[-1] = out  # Hugging Face's last hidden state is after ln_f
            if capture.stage_outputs:
                capture.stages.append(("final_layer_norm", x, out))
        return out

    @torch.inference_mode()
    def logits(self, hidden: Tensor, timer: StageTimer | None = None) -> Tensor:
        """The tied LM head: (..., d) -> (..., vocab_size), float32."""
        if timer is not None:
            timer.start("lm_head")
        out = linear(hidden, self.transformer.wte.weight).float()
        if timer is not None:
            timer.stop()
        return out

    def init_random(self, seed: int) -> None:
        """GPT-2's initialisation (normal(0, 0.02), scaled residual projections), seeded."""
        gen = torch.Generator().manual_seed(seed)
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                elif name.endswith("c_proj.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * residual_std)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by component; the LM head shares the token embedding (tied)."""
        counts = {"token_embedding": 0, "position_embedding": 0, "attention": 0, "feed_forward": 0, "layer_norm": 0}
        for name, p in self.named_parameters():
            if ".wte." in name:
                counts["token_embedding"] += p.numel()
            elif ".wpe." in name:
                counts["position_embedding"] += p.numel()
            elif ".attn." in name:
                counts["attention"] += p.numel()
            elif ".mlp." in name:
                counts["feed_forward"] += p.numel()
            else:
                counts["layer_norm"] += p.numel()
        counts["lm_head"] = counts["token_embedding"]  # tied: shared, not counted again in total
        counts["total"] = sum(v for k, v in counts.items() if k != "lm_head")
        return counts
