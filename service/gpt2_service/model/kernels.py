"""Which kernel computes the model's matrix products, in which weight format, and how
batch-invariant mode changes that.

What it is: ``KernelMode`` (the weight format and whether results must be batch-invariant), set
per thread with ``kernel_mode``; ``linear`` (x @ W.T + b in float32) sent to oneDNN's kernel where
it applies (``onednn_applies``) and to ``F.linear`` elsewhere, padding one row to two in
batch-invariant mode; ``PackedLinear``, a weight prepared once (``float32``: in oneDNN's blocked
layout; ``float16``: FBGEMM's fp16 weights with float32 arithmetic; ``int8``: FBGEMM's int8
weights with a scale per output channel and activations quantized with a scale per row), which
``project`` prefers to the plain weight for the thread's format; and ``attention``, scaled
dot-product attention with one mask convention.

What it is not: the model (gpt2.py says what is computed, in GPT-2's terms), nor where keys and
values live (kv_cache.py). Attention's batch invariance is not a kernel switch but a layout (the
runner's): a decode batch attends over keys padded to a multiple of ``KEY_BLOCK`` (checked once
per process by ``padded_decode_attention_is_invariant``), prefill chunks row by row at each row's
own length (``AttentionLayout.rows``, kv_cache.py).

A decode step's products (up to ``skinny.MAX_ROWS`` rows: float32 128, float16 512, int8 16; 16
on a CPU without AVX-512) go to skinny.c's loops instead (skinny.py), which stream the weight at
the machine's bandwidth at one to three rows (several blocks of it side by side), where the
general kernels are at 60-70%, and from four rows on work in tiles of six rows while the next
block of the weight is fetched. They are used
only where they are bitwise equal to the general kernel for that weight (float: the same
summation order; int8: FBGEMM's quantization, exact integer sums and its scaling), so no number
changes with the switch (tests/test_skinny.py). ``layer_norm`` and
``gelu`` go to skinny.c wherever it is built (CPU, float32, any batch size): row by row in a
fixed order, invariant by construction, and a C call instead of a torch dispatch.

Batch invariance of each format (tests/test_batch_invariance.py checks every one):
- float32: oneDNN computes each row bitwise the same for any number of rows >= 2 but takes
  another path for one row, so batch-invariant mode pads one row to two (where the skinny loops
  do not take it). The weights are prepacked into oneDNN's blocked layout (``PackedLinear``; the
  kernel otherwise reorders a plain weight on every call): the same numbers, 15-20% faster for
  GPT-2's shapes at 2-8 rows.
- float16: FBGEMM's fp16 kernel computes each row the same for any number of rows, one included.
  Its weight is padded to whole blocks of 64 outputs: FBGEMM sums a partial last block in another
  order, which the skinny loops would not match.
- int8: a dynamically quantized product is batch-invariant only if each row's quantization is its
  own. FBGEMM's dynamic kernel takes one activation scale for the whole input, so each row is
  first divided by its largest magnitude and two constant columns (+1, -1, against zero weights)
  fix the input's range to [-1, 1]: the kernel's scale is then the same for every batch, its
  integer sums are exact, and the row's own magnitude is multiplied back after. This is also
  about twice as accurate as one scale for the batch, so it is used in both modes.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2_service.model import skinny

# oneDNN's fp32 linear (what torch.compile's CPU backend calls) beat MKL's sgemm by 1.2-1.7x for
# 8 to 64 rows and GPT-2's shapes (1.8-2x for the LM head) on the 2-core AMD EPYC we measured, and
# streamed a one-row product's weights 1.1-1.6x faster than MKL's matrix-vector product. It costs
# about 50 us per call more than MKL, which only tiny models notice.
_ONEDNN_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise")  # registered only in builds with oneDNN
_ONEDNN_PACK = _ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

WEIGHT_FORMATS = ("float32", "float16", "int8")


@dataclass(frozen=True)
class KernelMode:
    """How this thread's forward passes compute: in which weight format (``WEIGHT_FORMATS``), and
    whether each row's numbers must be bitwise independent of the rest of its batch."""

    weights: str = "float32"
    batch_invariant: bool = False
    skinny: bool = True  # products of a few rows may use skinny.c's loops where they agree (skinny.py)


_MODE: ContextVar[KernelMode] = ContextVar("gpt2_kernel_mode", default=KernelMode())  # noqa: B039 (frozen)


def current_mode() -> KernelMode:
    return _MODE.get()


@contextmanager
def kernel_mode(mode: KernelMode) -> Iterator[None]:
    """Within the block (on this thread), forward passes compute as ``mode`` says."""
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def onednn_applies(x: Tensor) -> bool:
    """Whether ``linear`` sends x to oneDNN (CPU, float32, a torch built with oneDNN)."""
    return _ONEDNN_LINEAR and x.is_cpu and x.dtype is torch.float32


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for x (..., in) and a row-major weight (out, in), as F.linear;
    on CPU in float32 with oneDNN's kernel."""
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    out: Tensor
    if onednn_applies(rows) and weight.is_contiguous():
        out = _onednn_rows(rows, weight, bias)
    else:
        out = F.linear(rows, weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])  # (..., out)


def _onednn_rows(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """oneDNN's product of rows (N, in) with a plain or prepacked weight; in batch-invariant mode
    one row is padded to two (see the module docstring)."""
    if rows.shape[0] == 1 and _MODE.get().batch_invariant:
        return _onednn_linear(torch.cat([rows, torch.zeros_like(rows)]), weight, bias)[:1]
    return _onednn_linear(rows, weight, bias)


def _onednn_linear(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out: Tensor = torch.ops.mkldnn._linear_pointwise.default(rows, weight, bias, "none", [], "")
    return out


def project(x: Tensor, weight: Callable[[], Tensor], bias: Tensor | None, packed: dict[str, PackedLinear]) -> Tensor:
    """``x @ weight().T + bias`` in this thread's weight format: its copy in ``packed`` (keyed by
    format, made by ``GPT2.prepare_weights``; float32 has one where oneDNN can prepack it), or the
    float32 ``weight()`` (out, in) through ``linear``, asked for only then."""
    weights = _MODE.get().weights
    prepared = packed.get(weights)
    if prepared is not None and (weights != "float32" or onednn_applies(x)):
        return prepared(x)
    if weights != "float32":
        raise KeyError(f"no {weights} copy of this weight: GPT2.prepare_weights({weights!r}) first")
    return linear(x, weight(), bias)


def prepacks_float32(weight: Tensor) -> bool:
    """Whether float32 ``weight`` gets a copy in oneDNN's own blocked layout (``PackedLinear``)."""
    return _ONEDNN_PACK and weight.is_cpu and weight.dtype is torch.float32


class PackedLinear:
    """``x @ weight.T + bias`` with the weight prepared once: in a reduced format (float16 or
    int8, see the module docstring), or (float32) in oneDNN's blocked layout, which that kernel
    would otherwise reorder the weight into on every call. The arithmetic and the result are
    float32."""

    def __init__(self, weight: Tensor, bias: Tensor | None, weights: str) -> None:
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"no packed kernel for {weights!r} weights")
        if not weight.is_cpu:
            raise ValueError(f"{weights} weights need the CPU (FBGEMM kernels); this weight is on {weight.device}")
        self.weights = weights
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        w = weight.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        if weights == "float32":
            if not prepacks_float32(weight):
                raise ValueError("prepacked float32 weights need a CPU torch built with oneDNN")
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w)
        elif weights == "float16":
            # FBGEMM sums the last (out % 32) outputs in another order (chunks of 512): with whole
            # blocks of zero outputs added, every output is summed alike, as skinny.c sums it.
            extra = skinny.padded(self.out_features) - self.out_features
            bias16 = None if self.bias is None else F.pad(self.bias, (0, extra))
            self._packed = torch.ops.quantized.linear_prepack_fp16(F.pad(w, (0, 0, 0, extra)), bias16)
        else:
            scales = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).double()
            padded = torch.cat([w, w.new_zeros(w.shape[0], 2)], dim=1)  # the two range columns
            zero_points = torch.zeros(w.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # quantized tensors are deprecated, FBGEMM's kernels not (yet)
                warnings.simplefilter("ignore")
                q = torch.quantize_per_channel(padded, scales, zero_points, 0, torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(q, None)
            self._range = torch.tensor([1.0, -1.0])
        self.nbytes = w.numel() * {"float32": 4, "float16": 2, "int8": 1}[weights]
        lib = skinny.library()
        self._skinny: skinny.SkinnyWeight | None = None
        if lib is not None and weights == "int8":
            self._skinny = skinny.SkinnyWeight(q.int_repr()[:, : self.in_features], weights, lib, scales)
        elif lib is not None:
            self._skinny = skinny.SkinnyWeight(w, weights, lib)
        if self._skinny is not None:
            self.nbytes += self._skinny.nbytes

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        if not rows.is_contiguous() or rows.dtype is not torch.float32:
            rows = rows.float().contiguous()
        return self._product(rows, self.bias).view(*x.shape[:-1], self.out_features)

    def skinny_order(self) -> tuple[skinny.SkinnyWeight, int] | None:
        """skinny.c's copy of this weight and the order in which its loops agree with the general
        kernel at the current thread count, where they do (what ``_product`` uses for a few rows)."""
        if self._skinny is None:
            return None
        order = self._skinny.agrees_with(self._general, self.bias)
        return None if order is None else (self._skinny, order)

    def _product(self, rows: Tensor, bias: Tensor | None) -> Tensor:
        """rows (N, in) times the weight: by skinny.c's loops for a few rows where they
        agree with the general kernel, else by it."""
        if self._skinny is not None and rows.shape[0] <= self._skinny.max_rows and _MODE.get().skinny:
            order = self._skinny.agrees_with(self._general, bias)
            if order is not None:
                return self._skinny.product(rows, bias, order)
        return self._general(rows)

    def _general(self, rows: Tensor) -> Tensor:
        """The product by the general kernel: oneDNN (float32), FBGEMM's fp16 or its dynamic int8
        (each row scaled into [-1, 1] first and back after, see the module docstring); rows (N, in)."""
        out: Tensor
        if self.weights == "float32":
            return _onednn_rows(rows, self._packed, self.bias)
        if self.weights == "float16":
            out = torch.ops.quantized.linear_dynamic_fp16(rows, self._packed)
            return out if out.shape[1] == self.out_features else out[:, : self.out_features].contiguous()
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # (N, 1); 10x faster than an inf-norm
        unit = torch.cat([rows / scale, self._range.expand(rows.shape[0], 2)], dim=1)  # each row in [-1, 1]
        out = torch.ops.quantized.linear_dynamic(unit, self._packed, True)  # reduce_range: no int16 overflow on AVX2
        return out.mul_(scale) if self.bias is None else torch.addcmul(self.bias, out, scale)


KEY_BLOCK = 64  # batch-invariant decode attends over a multiple of this many keys


def padded_keys(num_keys: int) -> int:
    """Keys a decoding row with ``num_keys`` keys attends over in batch-invariant mode: rounded up
    to a multiple of KEY_BLOCK (the padding masked out), so that a batch padded to its longest row
    only adds whole blocks of masked keys to every row, which the kernel sums as exact zeros."""
    return max(KEY_BLOCK, -(-num_keys // KEY_BLOCK) * KEY_BLOCK)


@functools.cache
def padded_decode_attention_is_invariant(trials: int = 16) -> bool:
    """Whether SDPA gives one query row bitwise the same result alone (keys padded to
    ``padded_keys``) as in a batch padded to a longer row, on this machine's kernels. Checked once
    per process on random data (GPT-2's head size, up to 1024 keys, about 0.3 s); where it
    does not hold the runner attends row by row instead, which is invariant but slower."""
    gen = torch.Generator().manual_seed(0)
    n_head, head_dim, max_keys = 4, 64, 1024
    for trial in range(trials):
        rows = 2 + trial % 7
        lengths = torch.randint(1, max_keys + 1, (rows,), generator=gen)
        lengths[0] = 1 + trial * 37 % 200  # short rows beside long ones
        q = torch.randn(rows, n_head, 1, head_dim, generator=gen)
        k = torch.randn(rows, n_head, max_keys, head_dim, generator=gen)
        v = torch.randn(rows, n_head, max_keys, head_dim, generator=gen)
        batch = _padded_decode_attention(q, k, v, lengths)
        for r in range(rows):
            alone = _padded_decode_attention(q[r : r + 1], k[r : r + 1], v[r : r + 1], lengths[r : r + 1])
            if not torch.equal(alone[0], batch[r]):
                return False
    return True


def _padded_decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    """What the runner computes for a decode batch whose rows have ``lengths`` keys."""
    width = padded_keys(int(lengths.max()))
    return attention(q, k[:, :, :width], v[:, :, :width], decode_mask(lengths - 1, width))


def decode_mask(positions: Tensor, num_keys: int) -> Tensor:
    """(B, 1, 1, num_keys) bool: the query of each decoding row, at ``positions`` (B,), sees the
    keys at its position and before."""
    return (torch.arange(num_keys, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]


def _row_ops(x: Tensor) -> ctypes.CDLL | None:
    """skinny.c, where it computes this thread's layer norms and GELUs: float32 on the CPU, with
    ``KernelMode.skinny``. Elsewhere torch's kernels do, which are row-invariant too but slower
    per call (each a dispatch of 10-25 us in a decode step, against 2-4 us)."""
    if x.dtype is not torch.float32 or not x.is_cpu or not _MODE.get().skinny:
        return None
    return skinny.library()


def layer_norm(x: Tensor, norm: nn.LayerNorm, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``norm`` applied to x + residual (or to x): (x + residual or x, the normalized values)."""
    lib = _row_ops(x)
    if lib is not None and norm.weight.dtype is torch.float32:  # (GPT-2's layer norms have weight and bias)
        return skinny.layer_norm(lib, x, residual, norm.weight, norm.bias, norm.eps)
    total = x if residual is None else x + residual
    return total, norm(total)


def gelu(x: Tensor, approximate: str) -> Tensor:
    """``F.gelu(x, approximate=approximate)``; GPT-2's tanh form by skinny.c where it applies."""
    lib = _row_ops(x) if approximate == "tanh" else None
    return F.gelu(x, approximate=approximate) if lib is None else skinny.gelu_tanh(lib, x)


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
