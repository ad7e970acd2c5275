"""GPT-2's building blocks in PyTorch, written once for generation and introspection.

Token + position embedding, n_layer blocks of (pre-LayerNorm masked multi-head attention,
pre-LayerNorm GELU MLP, each with a residual), a final LayerNorm and the LM head tied to the
token embedding. Parameter names and shapes match Hugging Face checkpoints (``Conv1D`` weights
read (in, out); in memory they are (out, in), see ``Conv1D``), so a state dict loads as it is.

The forward pass works on a padded batch of sequences of different lengths. Keys and values come
either from the KV-cache (generation: attention hands each step's keys and values to
``KVCache.update``, which stores them where the ``AttentionLayout`` says and returns those to
attend over) or from the input alone (introspection and reference checks: plain causal
attention). Which kernels compute the products is kernels.py's business. An optional ``Capture``
records intermediate values and an optional ``StageTimer`` accumulates time per stage; both are
``None`` on the hot path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gpt2_service.core.pieces import Pieces, run_to_end
from gpt2_service.model import skinny
from gpt2_service.model.kernels import (
    WEIGHT_FORMATS,
    PackedLinear,
    attention,
    current_mode,
    gelu,
    layer_norm,
    prepacks_float32,
    project,
)
from gpt2_service.model.kv_cache import AttentionLayout as AttentionLayout  # re-exported for bench/, for now
from gpt2_service.model.kv_cache import KeyValues, KVCache
from gpt2_service.model.skinny import FusedBlock, FusedLayers


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

    def wants_attention(self, layer: int) -> bool:
        """Whether the attention of block ``layer`` must record its scores or weights."""
        return (self.attention_weights or self.attention_scores) and self.wants_layer(layer)


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
        self.add(self._stage, time.perf_counter() - self._start)

    def add(self, stage: str, seconds: float) -> None:
        """Time measured elsewhere (skinny.c's fused block times its own halves)."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class Conv1D(nn.Module):
    """A linear layer whose ``weight`` reads (in, out), the layout of GPT-2 checkpoints.

    In memory the weight is (out, in), row-major, as the matmul kernels want it: ``weight`` is a
    transposed view, so state dicts load (and read) in the checkpoint layout with no copy.
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in).t())
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.packed: dict[str, PackedLinear] = {}  # weight format -> prepared copy (GPT2.prepare_weights)

    def forward(self, x: Tensor) -> Tensor:
        return project(x, self.out_in, self.bias, self.packed)

    def out_in(self) -> Tensor:
        """The weight as the kernels read it, (out, in): a view, made only when no packed copy serves."""
        return self.weight.t()


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention: each token attends to itself and the tokens before it."""

    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)  # query, key, value projections
        self.c_proj = Conv1D(config.n_embd, config.n_embd)  # output projection

    def forward(
        self,
        x: Tensor,  # (B, T, C)
        layout: AttentionLayout | None,
        cache: KVCache | None,
        capture: Capture | None,
    ) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C): query, key and value side by side
        if layout is not None and layout.one_query and cache is not None:  # a decode step, in one call
            if capture is not None and capture.wants_attention(self.layer):
                raise ValueError("capturing attention weights needs a layout without one_query")
            y = cache.attend_one(self.layer, layout, qkv.view(B, 3 * C))  # (B, C), the heads side by side
            return self.c_proj(y.view(B, 1, C))  # type: ignore[no-any-return]
        # each split into heads: (B, T, 3, nh, hs) -> 3 x (B, nh, T, hs)
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # The KV-cache stores this step's keys and values and returns those to attend over;
        # without one (introspection, reference checks) the input attends to itself.
        attended = [KeyValues(k, v)] if cache is None or layout is None else cache.update(self.layer, layout, k, v)
        y = self._attend(q, attended, capture)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # the heads side by side again
        out: Tensor = self.c_proj(y)
        return out

    def _attend(self, q: Tensor, attended: list[KeyValues], capture: Capture | None) -> Tensor:
        """The queries q (B, nh, T, hs) over the keys and values: of the whole batch at once, or
        (batch-invariant mode) row by row, each at its own length, padding queries getting zeros."""
        whole = attended[0] if len(attended) == 1 and attended[0].row is None else None
        if capture is not None and capture.wants_attention(self.layer):  # SDPA does not return the weights
            if whole is None:
                raise ValueError("capturing attention weights needs the whole batch at once, not row by row")
            return self._attend_recording_weights(q, whole, capture)
        if whole is not None:  # the whole batch at once
            return attention(q, whole.keys, whole.values, whole.mask)
        y = q.new_zeros(q.shape)  # batch-invariant mode: one row at a time
        for kv in attended:
            assert kv.row is not None, "a batch attended row by row has a KeyValues per row"
            b, n = kv.row
            y[b : b + 1, :, :n] = attention(q[b : b + 1, :, :n], kv.keys, kv.values, kv.mask)
        return y

    def _attend_recording_weights(self, q: Tensor, kv: KeyValues, capture: Capture) -> Tensor:
        """``kernels.attention`` written out, to record the scores and weights it computes."""
        T, Tk = q.shape[2], kv.keys.shape[2]
        scores = (q @ kv.keys.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, Tk)
        mask = kv.mask
        if mask is None:  # causal, the queries at the last T positions
            mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, nh, T, Tk)
        if capture.attention_scores:
            capture.scores[self.layer] = scores
        if capture.attention_weights:
            capture.attn[self.layer] = weights
        return weights @ kv.values  # (B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.d_ff)
        self.c_proj = Conv1D(config.d_ff, config.n_embd)
        self.approximate = config.activation

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        h = gelu(self.c_fc(x), self.approximate)  # (B, T, d_ff)
        out: Tensor = self.c_proj(h)  # (B, T, C)
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
        x: Tensor,  # (B, T, C)
        layout: AttentionLayout | None,
        cache: KVCache | None,
        capture: Capture | None,
        timer: StageTimer | None,
    ) -> Tensor:
        # x + attention(ln_1(x)), then that + mlp(ln_2(that)); the residual add and ln_2 in one call
        if timer is None and capture is None:  # the hot path
            x, h = layer_norm(x, self.ln_2, self.attn(layer_norm(x, self.ln_1)[1], layout, cache, None))
            out: Tensor = x + self.mlp(h)
            return out
        layer = self.attn.layer
        if timer is not None:
            timer.start("attention")
        attn_in = x
        attended = self.attn(layer_norm(x, self.ln_1)[1], layout, cache, capture)
        if timer is not None:
            timer.stop()
            timer.start("mlp")
        x, h = layer_norm(x, self.ln_2, attended)
        mlp_in = x
        x = x + self.mlp(h)
        if timer is not None:
            timer.stop()
        if capture is not None and capture.stage_outputs:
            capture.stages.append((f"block.{layer}.attention", attn_in, mlp_in))
            capture.stages.append((f"block.{layer}.mlp", mlp_in, x))
        return x

    def fused(self, weights: str) -> FusedBlock | None:
        """This block described for skinny.c's one-call decode step, in weight format ``weights``
        at the current thread count, where every piece of it runs there (skinny.c built, GPT-2's
        tanh GELU, all four products taken by the loops)."""
        lib = skinny.library()
        convs = (self.attn.c_attn, self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj)
        packed = [c.packed.get(weights) for c in convs]
        if lib is None or self.mlp.approximate != "tanh" or any(p is None for p in packed):
            return None
        linears = []
        for p in packed:
            assert p is not None
            agreed = p.skinny_order()
            if agreed is None:
                return None
            linears.append((agreed[0], p.bias, agreed[1]))
        norms = ((self.ln_1.weight, self.ln_1.bias), (self.ln_2.weight, self.ln_2.bias))
        return FusedBlock(lib, self.attn.n_head, self.ln_1.eps, norms, tuple(linears))


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
        self.lm_head_packed: dict[str, PackedLinear] = {}  # weight format -> the tied head, prepared
        self._fused: dict[tuple[str, int], FusedLayers | None] = {}  # (format, threads) -> all blocks in one call

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
        return run_to_end(self.stages(input_ids, positions, layout, cache, capture, timer))

    def stages(
        self,
        input_ids: Tensor,  # (B, T)
        positions: Tensor,  # (B, T), each < n_positions
        layout: AttentionLayout | None = None,
        cache: KVCache | None = None,
        capture: Capture | None = None,
        timer: StageTimer | None = None,
    ) -> Pieces[Tensor]:
        """``forward`` in pieces: it yields after the embedding and after each block (so that a
        long pass can share its thread with other work; a decode step of a few rows runs every
        block in one call to skinny.c and yields once after them) and returns what ``forward``
        does. It does not enter inference mode itself: run it in a caller that has."""
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
        yield
        layers = self._fused_layers(x, layout, cache, capture)
        if layers is not None and cache is not None and layout is not None:  # every block in one call
            x, attention_s, mlp_s = layers(x.contiguous(), cache.k, cache.v, layout.write_slots, layout.write_positions)
            if timer is not None:
                timer.add("attention", attention_s)
                timer.add("mlp", mlp_s)
            yield
        else:
            for block in t.h:
                x = block(x, layout, cache, capture, timer)
                if capture is not None and capture.hidden_states:
                    capture.hidden.append(x)
                yield
        if timer is not None:
            timer.start("final_layer_norm")
        out = layer_norm(x, t.ln_f)[1]
        if timer is not None:
            timer.stop()
        if capture is not None:
            if capture.hidden_states:
                capture.hidden[-1] = out  # Hugging Face's last hidden state is after ln_f
            if capture.stage_outputs:
                capture.stages.append(("final_layer_norm", x, out))
        return out

    def _fused_layers(
        self, x: Tensor, layout: AttentionLayout | None, cache: KVCache | None, capture: Capture | None
    ) -> FusedLayers | None:
        """Every block of a decode step of a few rows as one call to skinny.c, where each block has
        its one-call form (``Block.fused``) for this thread's format and thread count: bitwise the
        blocks op by op (tests/test_skinny.py)."""
        if layout is None or not layout.one_query or cache is None or capture is not None:
            return None
        mode = current_mode()
        if not mode.skinny:
            return None
        key = (mode.weights, torch.get_num_threads())
        if key not in self._fused:
            blocks = [b.fused(mode.weights) for b in self.transformer.h if isinstance(b, Block)]
            whole = len(blocks) == len(self.transformer.h) and all(b is not None for b in blocks)
            self._fused[key] = FusedLayers([b for b in blocks if b is not None]) if whole else None
        layers = self._fused[key]
        return layers if layers is not None and x.shape[0] <= layers.max_rows else None

    def prepare_weights(self, weights: str) -> None:
        """Make the weight format ``weights`` (``kernels.WEIGHT_FORMATS``) available to forward
        passes run under ``kernels.kernel_mode``: every linear layer and the LM head get a packed
        copy, kept beside the float32 weights (which embeddings read, and which stay the model's
        parameters). float32 gets one where oneDNN can prepack it (CPU, float32 parameters): the
        same numbers, faster (kernels.py). Idempotent."""
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        plain = weights == "float32" and not prepacks_float32(self.transformer.wte.weight)
        if plain or weights in self.lm_head_packed:
            return
        for module in self.modules():
            if isinstance(module, Conv1D):
                module.packed[weights] = PackedLinear(module.out_in(), module.bias, weights)
        self.lm_head_packed[weights] = PackedLinear(self._lm_head_weight(), None, weights)

    def packed_bytes(self, weights: str) -> int:
        """Bytes of the packed copies of ``weights`` (0 for float32 where it is not copied)."""
        if weights not in self.lm_head_packed:
            return 0
        layers = [m.packed[weights] for m in self.modules() if isinstance(m, Conv1D)]
        return sum(p.nbytes for p in [*layers, self.lm_head_packed[weights]])

    @torch.inference_mode()
    def logits(self, hidden: Tensor, timer: StageTimer | None = None) -> Tensor:
        """The tied LM head: (..., d) -> (..., vocab_size), float32."""
        if timer is not None:
            timer.start("lm_head")
        out = project(hidden, self._lm_head_weight, None, self.lm_head_packed).float()
        if timer is not None:
            timer.stop()
        return out

    def _lm_head_weight(self) -> Tensor:
        return self.transformer.wte.weight  # tied: (vocab, d), as the kernels read it

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
