"""Which kernel computes the model's matrix products, and how batch-invariant mode changes that.

What it is: ``linear`` (x @ W.T + b) sent to oneDNN's float32 kernel where it applies
(``onednn_applies``) and to ``F.linear`` elsewhere; ``batch_invariant_kernels``, the per-thread
switch under which ``linear`` pads a one-row input to two so that every row is computed bitwise
the same whatever the number of rows; and ``attention``, scaled dot-product attention with one
mask convention, choosing between SDPA's built-in causal mask and an explicit one.

What it is not: the model (model.py says what is computed, in GPT-2's terms), nor where keys and
values live (kv_cache.py). Attention's batch invariance is not a kernel switch: it comes from
attending row by row at each row's own length (``AttentionLayout.rows``, kv_cache.py). Nothing
here changes what is computed, only how: different kernels for one function can round
differently in the last bits, which is why each choice is fixed by device, dtype and mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

# oneDNN's fp32 linear (what torch.compile's CPU backend calls) beat MKL's sgemm by 1.2-1.7x for
# 8 to 64 rows and GPT-2's shapes (1.8-2x for the LM head) on the 2-core AMD EPYC we measured, and
# streamed a one-row product's weights 1.1-1.6x faster than MKL's matrix-vector product. It costs
# about 50 us per call more than MKL, which only tiny models notice.
_ONEDNN_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise")  # registered only in builds with oneDNN

_PAD_ONE_ROW: ContextVar[bool] = ContextVar("gpt2_linear_pad_one_row", default=False)


def onednn_applies(x: Tensor) -> bool:
    """Whether ``linear`` sends x to oneDNN (CPU, float32, a torch built with oneDNN)."""
    return _ONEDNN_LINEAR and x.is_cpu and x.dtype is torch.float32


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
    return out.view(*x.shape[:-1], out.shape[-1])  # (..., out)


def _onednn_linear(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out: Tensor = torch.ops.mkldnn._linear_pointwise.default(rows, weight, bias, "none", [], "")
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(hs), masked) v for q (B, nh, T, hs) and k, v (B, nh, Tk, hs).

    ``mask`` (B, 1, T, Tk) bool is True where a key is visible. None means causal with the T
    queries at the last T of the Tk positions: query i sees keys 0..Tk-T+i. SDPA's own causal
    mask is that only when T == Tk (its diagonal starts top left), so other shapes get it explicitly.
    """
    T, Tk = q.shape[2], k.shape[2]
    if mask is None and T in (1, Tk):  # one query sees every key; or a square causal mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
    if mask is None:
        mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
