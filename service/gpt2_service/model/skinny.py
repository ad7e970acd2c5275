"""Products of a few rows with a weight streamed once: the loops of skinny.c, built on first
use and checked against the general kernel they stand in for.

What it is: ``library`` (skinny.c compiled with the machine's C compiler into a per-user cache,
once per source version, about 1 s; ``None`` where that cannot be done, and the general kernels
stay in place), and ``SkinnyWeight``, a weight in skinny.c's blocked layout (float32; float16
with float32 arithmetic; int8 as FBGEMM's dynamic kernel computes it) whose ``product`` is
bitwise equal to the general kernel's for any rows. The row-wise operations, invariant by
construction (skinny.c): ``attend``, a decode step's attention (each row's one query over its
slot's cached keys); ``layer_norm`` (with the residual add before it); ``gelu_tanh``. And
``FusedLayers``: every block of a decode step in one call (each described by a ``FusedBlock``),
bitwise the blocks computed op by op.

Why: a decode step of one sequence is a chain of matrix-vector products bound by memory
bandwidth. oneDNN and FBGEMM stream GPT-2's weights at 60-70% of this machine's bandwidth at one
row; skinny.c's loops read faster than torch sums 1 GiB (float32: 108% of that in make bench), by
reading several blocks of a weight side by side at one to three rows. Over a few dozen rows the
products are bound by how fast the next weights arrive while the arithmetic runs; the loops fetch
them ahead (skinny.c) and beat the general kernels up to 128 rows in float32 (26.9 vs 39.6 ms for
GPT-2 small's products at 32 rows).

Why it keeps batch invariance: the loops reduce each output in a fixed order (k ascending in
chunks; for int8, exact integer sums and FBGEMM's roundings, skinny.c).
``SkinnyWeight.agrees_with`` finds the order that makes them bitwise equal to the general kernel
for this weight and the current number of threads, on ``probe_rows``, or finds none and
declines; ``kernels.PackedLinear`` uses the loops only where it agreed. A row's numbers are then
the same whichever kernel its batch size selects.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_service.model import pages

log = logging.getLogger(__name__)

# Up to this many rows the loops take a product (and a decode step runs its blocks in one call,
# FusedLayers), on a CPU with AVX-512; with AVX2 only, up to NARROW_MAX_ROWS (its loops compute
# one row at a time, and were not timed against the general kernels beyond that). Products
# alone, GPT-2 small's 49 products (the LM head's included) streamed from memory, loops against
# the general kernel, ms: float32 15.2 vs 24.0 at one to three rows (blocks side by side;
# 17.2-19.5 before), 16.3 vs 22.9 at four, 17.5 vs 25.8 at eight, 19.7 vs 30.8 at sixteen, 26.9
# vs 39.6 at 32, 46.0 vs 57.1 at 64, 86.5 vs 91.5 at 128, 135 vs 135 at 192, 178 vs 176 at 256;
# float16 7.6 vs 14.3 at one (10.1 before), 9.0 vs 20.1 at eight, 26.3 vs 41.8 at 32, 55.6 vs
# 76.5 at 64, 103 vs 135 at 128, 209 vs 255 at 256, 428 vs 486 at 512. int8 5.2 vs 9.3 at one,
# 16.3 vs 19.5 at sixteen (skinny.c's int8 limit).
MAX_ROWS = {"float32": 128, "float16": 512, "int8": 16}
NARROW_MAX_ROWS = 16
PROBE_ROWS = 4  # rows of probe_rows
BLOCK = 64  # outputs per block of the weight layout (skinny.c)
STORAGE = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
_SOURCE = Path(__file__).with_name("skinny.c")
_CANDIDATE_CHUNKS = (512, 1024, 256, 128, 64, 2048, 384, 768, 1536, 4096)
_DISAGREEING: set[tuple[str, int, int, int]] = set()  # shapes already logged as declined


def padded(out_features: int) -> int:
    """``out_features`` rounded up to whole blocks of the weight layout."""
    return -(-out_features // BLOCK) * BLOCK


def _torch_openmp() -> Path | None:
    """torch's own OpenMP runtime (its wheels ship libgomp), which skinny.c must share."""
    found = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    return found if found.exists() else None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "gpt2-service"


_FLAGS = ("-O3", "-fPIC", "-fopenmp", "-ffp-contract=off")  # a * b + c rounds twice, as written


def _library_name() -> str:
    """The compiled file's name: one per source, flags and torch version."""
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + torch.__version__.encode())
    return f"skinny-{key.hexdigest()[:16]}.so"


@functools.cache
def library() -> ctypes.CDLL | None:
    """skinny.c, compiled and loaded: prebuilt beside the source (the container image does that,
    having no compiler at run time), else from the per-user cache, else built into it. None, with
    one log line saying why, where it cannot be: no C compiler, no torch libgomp to share, or a
    CPU with neither AVX-512 nor AVX2 with FMA and F16C."""
    openmp = _torch_openmp()
    if openmp is None:
        log.info("skinny kernels off: this torch has no libgomp.so.1 to share threads with")
        return None
    name = _library_name()
    for where in (_SOURCE.parent, _cache_dir()):
        if (where / name).exists():
            return _load(where / name)
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("skinny kernels off: no C compiler (cc) to build skinny.c with")
        return None
    try:
        built = build(_cache_dir(), compiler, openmp)
    except (OSError, subprocess.CalledProcessError) as err:
        log.warning("skinny kernels off: building skinny.c failed: %s", err)
        return None
    return _load(built)


def build(directory: Path, compiler: str, openmp: Path) -> Path:
    """Compile skinny.c into ``directory``, atomically (concurrent builders each write their own
    temporary file and the last rename wins); the path written."""
    name = _library_name()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        obj, lib = Path(tmp) / "skinny.o", Path(tmp) / name
        subprocess.run([compiler, *_FLAGS, "-c", str(_SOURCE), "-o", str(obj)], check=True, capture_output=True)
        # Linked to torch's libgomp by its soname, which resolves to the copy torch has loaded.
        subprocess.run(
            [compiler, "-shared", str(obj), "-o", str(lib), f"-L{openmp.parent}", "-l:libgomp.so.1", "-lm"],
            check=True,
            capture_output=True,
        )
        os.replace(lib, directory / name)
    log.info("built skinny kernels: %s", directory / name)
    return directory / name


def _load(path: Path) -> ctypes.CDLL | None:
    lib = ctypes.CDLL(str(path))
    if not lib.skinny_supported():
        log.info("skinny kernels off: this CPU has neither AVX-512 nor AVX2 with FMA and F16C")
        return None
    pointer, long = ctypes.c_void_p, ctypes.c_long
    for fn in (lib.skinny_f32, lib.skinny_f16):  # (x, rows, k, w, n, bias, out, kchunk, threads)
        fn.argtypes = [pointer, long, long, pointer, long, pointer, pointer, long, ctypes.c_int]
        fn.restype = None
    # (x, rows, k, w, n, colsum, scales, bias, out, variant, threads)
    lib.skinny_i8.argtypes = [
        pointer,
        long,
        long,
        pointer,
        long,
        pointer,
        pointer,
        pointer,
        pointer,
        long,
        ctypes.c_int,
    ]
    lib.skinny_i8.restype = ctypes.c_int  # 0, or -1 where it could not allocate
    # (qkv, rows, n_head, head_dim, k_cache, v_cache, max_len, num_slots, slots, positions, scale, out, threads)
    lib.skinny_attend.argtypes = [pointer, long, long, long, pointer, pointer, long, long, pointer, pointer]
    lib.skinny_attend.argtypes += [ctypes.c_float, pointer, ctypes.c_int]
    lib.skinny_attend.restype = ctypes.c_int  # 0; -1 where it could not allocate; -2 for a bad slot or position
    # (x, residual, sum, rows, n, weight, bias, eps, y, threads)
    lib.skinny_layer_norm.argtypes = [pointer, pointer, pointer, long, long, pointer, pointer, ctypes.c_float]
    lib.skinny_layer_norm.argtypes += [pointer, ctypes.c_int]
    lib.skinny_layer_norm.restype = None
    lib.skinny_gelu_tanh.argtypes = [pointer, pointer, long, ctypes.c_int]  # (x, y, count, threads)
    lib.skinny_gelu_tanh.restype = None
    lib.skinny_pick.argtypes = [pointer, long, long, pointer, pointer, pointer, ctypes.c_int]
    lib.skinny_pick.restype = None  # (logits, rows, n, index, max, log_sum, threads)
    # (blocks, n_layers, x, rows, k_cache, v_cache, max_len, num_slots, slots, positions, scratch, seconds, threads)
    lib.skinny_decode_layers.argtypes = [pointer, long, pointer, long, pointer, pointer, long, long, pointer, pointer]
    lib.skinny_decode_layers.argtypes += [pointer, pointer, ctypes.c_int]
    lib.skinny_decode_layers.restype = ctypes.c_int  # 0; -1 out of memory; -2 a bad slot or position
    lib.skinny_wide.restype = ctypes.c_int  # 1 where the AVX-512 loops run
    lib.skinny_use_avx2_only.argtypes = [ctypes.c_int]  # for tests: the AVX2 loops on an AVX-512 CPU
    lib.skinny_use_avx2_only.restype = None
    return lib


class _Linear(ctypes.Structure):  # skinny.c's struct skinny_linear
    _fields_ = [
        ("w", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("colsum", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("n", ctypes.c_long),
        ("k", ctypes.c_long),
        ("order", ctypes.c_long),
        ("storage", ctypes.c_long),
    ]


class _Block(ctypes.Structure):  # skinny.c's struct skinny_block
    _fields_ = [
        *((name, ctypes.c_long) for name in ("n_embd", "n_head", "head_dim")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b")),
        *((name, _Linear) for name in ("attn", "attn_proj", "fc", "proj")),
    ]


def _huge_copy(t: Tensor) -> Tensor:
    """A contiguous copy of t, on huge pages where the machine offers them (pages.py): the loops
    stream it from memory at every step."""
    return pages.empty(tuple(t.shape), t.dtype).copy_(t)


def max_rows(lib: ctypes.CDLL, storage: str) -> int:
    """Most rows whose products in ``storage`` go to the loops on this CPU (``MAX_ROWS``)."""
    return MAX_ROWS[storage] if lib.skinny_wide() else min(MAX_ROWS[storage], NARROW_MAX_ROWS)


def probe_rows(in_features: int, seed: int) -> Tensor:
    """``PROBE_ROWS`` rows: two random, of unequal scale, and two made of the values that int8
    quantization rounds hardest (ties between two steps of 2/127 of the row's largest magnitude,
    one unit in the last place either side, scaled by powers of two so that they stay ties),
    where one rounding formula differs from another."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(PROBE_ROWS, in_features, generator=gen)
    step = torch.tensor(2.0 / 127.0)
    ties = (torch.arange(-64, 64, dtype=torch.float32) + 0.5) * step
    near = torch.cat([torch.nextafter(ties, ties - 1), ties, torch.nextafter(ties, ties + 1)])
    rows /= rows.abs().amax(dim=1, keepdim=True)
    for r in range(2, PROBE_ROWS):
        rows[r] = near[torch.randint(len(near), (in_features,), generator=gen)].clamp(-1, 1)
    rows[:, 0] = 1.0
    return rows * torch.tensor([3.7, 0.013, 8.0, 0.25])[:PROBE_ROWS, None]


class SkinnyWeight:
    """A weight (out, in) in skinny.c's blocked layout, stored as ``storage``: float32 or float16
    (float32 arithmetic), or int8 (FBGEMM's dynamic int8 product, given the weight's integers and
    its scale per output). ``product`` computes a few rows against it, in a summation or rounding
    ``order`` that ``agrees_with`` finds."""

    def __init__(self, weight: Tensor, storage: str, lib: ctypes.CDLL, scales: Tensor | None = None) -> None:
        out_features, in_features = weight.shape
        self.in_features, self.out_features, self.storage = in_features, out_features, storage
        blocks = padded(out_features) // BLOCK
        if storage == "int8":
            if scales is None:
                raise ValueError("int8 weights need their scale per output")
            groups = -(-in_features // 4)  # of 4 inputs, what one VNNI step reads per output
            blocked = weight.new_zeros(blocks * BLOCK, groups * 4, dtype=STORAGE[storage])
            blocked[:out_features, :in_features] = weight
            # (out/64, 64, in/4, 4) -> (out/64, in/4, 64, 4)
            self.blocked = _huge_copy(blocked.view(blocks, BLOCK, groups, 4).transpose(1, 2))
            self.colsum = F.pad(weight.sum(dim=1, dtype=torch.int32), (0, blocks * BLOCK - out_features))
            self.scales = F.pad(scales.float(), (0, blocks * BLOCK - out_features))
            self._fn = lib.skinny_i8
            self._orders = tuple(v for v in range(16) if (v >> 1) & 3 != 3)  # skinny.c's int8 variants
        else:
            blocked = weight.new_zeros(blocks * BLOCK, in_features, dtype=STORAGE[storage])
            blocked[:out_features] = weight
            # (out/64, 64, in) -> (out/64, in, 64): each block's 64 outputs are one stream over in.
            self.blocked = _huge_copy(blocked.view(blocks, BLOCK, in_features).transpose(1, 2))
            self._fn = lib.skinny_f32 if storage == "float32" else lib.skinny_f16
            self._orders = _CANDIDATE_CHUNKS
        self.nbytes = self.blocked.numel() * self.blocked.element_size()
        self.max_rows = max_rows(lib, storage)  # products of up to this many rows go to the loops
        self._agreed: dict[int, int | None] = {}  # threads -> order agreeing with the general kernel

    def product(self, rows: Tensor, bias: Tensor | None, order: int) -> Tensor:
        """rows (M, in) contiguous float32 @ weight.T + bias, each output summed in chunks of
        ``order`` (float) or rounded the ``order``-th way (int8: each row quantized on its own
        scale, as kernels.py does; skinny.c); (M, out) float32."""
        out = torch.empty(rows.shape[0], self.out_features)
        m, k, w, n = rows.shape[0], self.in_features, self.blocked.data_ptr(), self.out_features
        extra: tuple[int | None, ...] = (None if bias is None else bias.data_ptr(),)
        if self.storage == "int8":
            extra = (self.colsum.data_ptr(), self.scales.data_ptr(), *extra)
        if self._fn(rows.data_ptr(), m, k, w, n, *extra, out.data_ptr(), order, torch.get_num_threads()):
            raise MemoryError(f"skinny.c could not quantize {m} rows of {k}")
        return out

    def agrees_with(self, general: Callable[[Tensor], Tensor], bias: Tensor | None) -> int | None:
        """The order with which ``product`` is bitwise equal to ``general`` (the kernel it stands
        in for, same weight and bias) for this weight at the current number of threads, or None if
        no candidate is. Found once per thread count, on ``probe_rows`` (any other summation
        order differs in most outputs; any other rounding, at the ties), and remembered."""
        threads = torch.get_num_threads()
        if threads not in self._agreed:
            rows = probe_rows(self.in_features, seed=threads)
            expected = general(rows)
            agreeing = (c for c in self._orders if torch.equal(self.product(rows, bias, c), expected))
            self._agreed[threads] = next(agreeing, None)
            shape = (self.storage, self.out_features, self.in_features, threads)
            if self._agreed[threads] is None and shape not in _DISAGREEING:  # one line per shape, not per layer
                _DISAGREEING.add(shape)
                log.warning(
                    "skinny kernels not used for %s weights of %dx%d at %d threads: no order of theirs matches "
                    "the general kernel, which keeps these products (same numbers, slower at one sequence)",
                    *shape,
                )
        return self._agreed[threads]


def attend(lib: ctypes.CDLL, qkv: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor) -> Tensor:
    """Decode attention by skinny.c: each row's one query, key and value in ``qkv`` (B, 3 * C),
    heads side by side; the new key and value written into ``k_cache`` / ``v_cache`` (one layer's,
    (S, nh, L, hs), contiguous float32) at the row's slot and position; the query attends over
    that slot's positions 0..position. (B, C), the heads side by side. Each (row, head) is
    computed alone in a fixed order: bitwise the same in any batch, at any number of threads."""
    num_slots, n_head, max_len, head_dim = k_cache.shape
    rows = qkv.shape[0]
    fits = qkv.shape[1] == 3 * n_head * head_dim and slots.shape == positions.shape == (rows,)
    fits = fits and qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    fits = (
        fits and slots.dtype == positions.dtype == torch.int64 and slots.is_contiguous() and positions.is_contiguous()
    )
    if not fits or qkv.dtype != k_cache.dtype or k_cache.dtype != torch.float32 or v_cache.shape != k_cache.shape:
        raise ValueError(f"qkv {tuple(qkv.shape)}, slots and positions do not fit a cache of {tuple(k_cache.shape)}")
    out = torch.empty(rows, n_head * head_dim)
    args = (qkv.data_ptr(), rows, n_head, head_dim, k_cache.data_ptr(), v_cache.data_ptr(), max_len, num_slots)
    status = lib.skinny_attend(
        *args, slots.data_ptr(), positions.data_ptr(), head_dim**-0.5, out.data_ptr(), torch.get_num_threads()
    )
    _check(status, num_slots, max_len, f"attention scratch for {max_len} keys")
    return out


def _check(status: int, num_slots: int, max_len: int, scratch: str) -> None:
    """Raise for a nonzero status of skinny.c's attention or decode-layers call: -2, a slot or
    position outside the cache (nothing written); -1, ``scratch`` could not be allocated."""
    if status == -2:
        raise ValueError(f"a slot or position is outside the cache's {num_slots} slots of {max_len} positions")
    if status:
        raise MemoryError(f"skinny.c could not allocate {scratch}")


def layer_norm(
    lib: ctypes.CDLL, x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Layer norm over the last dimension of x (..., n), float32, of ``x + residual`` where one is
    given (same shape): (that sum or x itself, the normalized rows). weight and bias (n,) float32.
    Each row is computed by one thread in a fixed order (skinny.c): bitwise the same in any batch,
    at any thread count. (Checks kept to a minimum: this runs 25 times per decode step.)"""
    n = x.shape[-1]
    if weight.numel() != n or bias.numel() != n or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"layer_norm: weight, bias or residual does not fit x {tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty_like(x)
    if residual is None:
        lib.skinny_layer_norm(x.data_ptr(), None, None, x.numel() // n, n, weight.data_ptr(), bias.data_ptr(), eps,
                              y.data_ptr(), torch.get_num_threads())  # fmt: skip
        return x, y
    total = torch.empty_like(x)
    lib.skinny_layer_norm(x.data_ptr(), residual.contiguous().data_ptr(), total.data_ptr(), x.numel() // n, n,
                          weight.data_ptr(), bias.data_ptr(), eps, y.data_ptr(), torch.get_num_threads())  # fmt: skip
    return total, y


def gelu_tanh(lib: ctypes.CDLL, x: Tensor) -> Tensor:
    """GPT-2's GELU, ``F.gelu(x, approximate="tanh")`` within float32 rounding, float32; each value
    computed alike wherever it sits (skinny.c)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.skinny_gelu_tanh(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
    return y


def pick(lib: ctypes.CDLL, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For each row of logits (rows, n), contiguous float32: the first index of its largest value
    (int64), that value m, and log(sum(exp(x - m))), so that the row's log-softmax is
    (x - m) - that (float32, each (rows,)). Each row is computed by one thread in a fixed order
    (skinny.c): bitwise the same in any batch, at any thread count."""
    rows, n = logits.shape
    index = torch.empty(rows, dtype=torch.int64)
    top, log_sum = torch.empty(rows), torch.empty(rows)
    lib.skinny_pick(logits.data_ptr(), rows, n, index.data_ptr(), top.data_ptr(), log_sum.data_ptr(),
                    torch.get_num_threads())  # fmt: skip
    return index, top, log_sum


class FusedBlock:
    """A GPT-2 block described for skinny.c's one-call decode step (``FusedLayers``), which
    computes it with the same functions, in the same order, as the block op by op with skinny.c's
    row operations and these products: bitwise the same numbers. ``linears`` are the block's
    q/k/v, attention output, MLP in and MLP out products, each (its SkinnyWeight, its bias, the
    order that agreed with the general kernel); ``norms`` ln_1's and ln_2's (weight, bias)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        n_head: int,
        eps: float,
        norms: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
        linears: tuple[tuple[SkinnyWeight, Tensor | None, int], ...],
    ) -> None:
        self.lib = lib
        self._keep = (norms, linears)  # what the structure points into stays alive with it
        n_embd = norms[0][0].numel()
        (w1, b1), (w2, b2) = norms
        if any(t.dtype is not torch.float32 or not t.is_contiguous() or t.numel() != n_embd for t in (w1, b1, w2, b2)):
            raise ValueError("FusedBlock: the layer norms' weights and biases must be contiguous float32")
        self.n_embd, self.d_ff = n_embd, linears[2][0].out_features
        self.max_rows = min(weight.max_rows for weight, _, _ in linears)
        described = []
        for weight, bias, order in linears:
            int8 = weight.storage == "int8"
            described.append(
                _Linear(
                    weight.blocked.data_ptr(),
                    None if bias is None else bias.data_ptr(),
                    weight.colsum.data_ptr() if int8 else None,
                    weight.scales.data_ptr() if int8 else None,
                    weight.out_features,
                    weight.in_features,
                    order,
                    ("float32", "float16", "int8").index(weight.storage),
                )
            )
        head_dim = n_embd // n_head
        self._block = _Block(n_embd, n_head, head_dim, eps, head_dim**-0.5)
        self._block.ln1_w, self._block.ln1_b, self._block.ln2_w, self._block.ln2_b = (
            t.data_ptr() for t in (w1, b1, w2, b2)
        )
        self._block.attn, self._block.attn_proj, self._block.fc, self._block.proj = described
        self.pointer = ctypes.pointer(self._block)


class FusedLayers:
    """Every block of a decode step of one to ``max_rows`` rows in one call to skinny.c
    (``skinny_decode_layers``): each ``FusedBlock`` in turn, without returning to Python between
    blocks (each return after a block's products costs 10-20 us of cold interpreter, skinny.c)."""

    def __init__(self, blocks: list[FusedBlock]) -> None:
        self._blocks = blocks
        self._lib = blocks[0].lib
        self.max_rows = min(b.max_rows for b in blocks)
        self._pointers = (ctypes.POINTER(_Block) * len(blocks))(*(b.pointer for b in blocks))
        self._scratch_per_row = 6 * blocks[0].n_embd + blocks[0].d_ff
        self._seconds = (ctypes.c_double * 2)()

    def __call__(
        self, x: Tensor, k: Tensor, v: Tensor, slots: Tensor, positions: Tensor
    ) -> tuple[Tensor, float, float]:
        """x (rows, 1, C) contiguous float32 through every block, in place; k, v the whole cache
        (layers, S, nh, L, hs), contiguous. (x, seconds of the attention halves, of the MLP halves)."""
        layers, num_slots, _, max_len, _ = k.shape
        if layers != len(self._blocks):
            raise ValueError(f"a cache of {layers} layers for {len(self._blocks)} blocks")
        rows = x.shape[0]
        scratch = torch.empty(rows * self._scratch_per_row)
        status = self._lib.skinny_decode_layers(
            self._pointers, layers, x.data_ptr(), rows, k.data_ptr(), v.data_ptr(), max_len, num_slots,
            slots.data_ptr(), positions.data_ptr(), scratch.data_ptr(), self._seconds, torch.get_num_threads(),
        )  # fmt: skip
        _check(status, num_slots, max_len, "a decode step's scratch")
        return x, self._seconds[0], self._seconds[1]


def main() -> None:
    """``python -m gpt2_service.model.skinny``: build the loops beside their source, for an image
    that has no compiler at run time (deploy/Dockerfile); fails loudly where they cannot be."""
    openmp, compiler = _torch_openmp(), shutil.which(os.environ.get("CC", "cc"))
    if openmp is None or compiler is None:
        raise SystemExit("skinny.c needs a C compiler (cc) and torch's libgomp.so.1")
    built = build(_SOURCE.parent, compiler, openmp)
    if _load(built) is None:
        raise SystemExit(f"built {built}, but this CPU cannot run it")
    print(built)


if __name__ == "__main__":
    main()
