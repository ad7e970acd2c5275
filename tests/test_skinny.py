"""skinny.c's loops for products of a few rows (gpt2_service/model/skinny.py): built on this
machine, used by ``PackedLinear`` in every weight format where they agree bitwise with the general
kernel (so batch invariance holds across the switch), declined where they do not, and absent
without harm where they cannot be built. And its decode attention (``skinny.attend``): SDPA's
numbers within rounding, bitwise the same for a row in any batch."""

from __future__ import annotations

import logging
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gpt2_service.model import skinny
from gpt2_service.model.kernels import KernelMode, PackedLinear, kernel_mode
from gpt2_service.model.kv_cache import KVCache
from torch import Tensor

# The CI machine (x86-64 Linux with gcc) builds them; a machine without a compiler falls back, and
# test_without_a_compiler_the_general_kernels_stay checks that path everywhere.
needs_skinny = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("cc") is None, reason="skinny.c needs x86-64 and a C compiler"
)

SHAPES = [
    (768, 2304),
    (3072, 768),
    (768, 50257),
    (32, 96),
    (100, 70),
    (48, 448),
]  # (in, out): GPT-2's, tiny, odd, 7 blocks


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """``skinny.library`` forgotten and its cache in ``tmp_path``; restored after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    skinny.library.cache_clear()
    yield tmp_path / "gpt2-service"
    skinny.library.cache_clear()


@pytest.fixture(params=["native", "avx2"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """The loops this CPU picks, and (on an AVX-512 CPU) the AVX2 ones that CPUs without
    AVX-512 run, forced."""
    lib = skinny.library()
    assert lib is not None
    lib.skinny_use_avx2_only(request.param == "avx2")
    yield request.param
    lib.skinny_use_avx2_only(0)


@needs_skinny
def test_the_loops_are_built_on_this_machine() -> None:
    assert skinny.library() is not None


@needs_skinny
@pytest.mark.parametrize("weights", ["float32", "float16", "int8"])
@pytest.mark.parametrize(("n_in", "n_out"), SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_loops_rows_are_bitwise_the_general_kernels_rows(
    weights: str, n_in: int, n_out: int, with_bias: bool, isa: str
) -> None:
    """With the loops and without (``KernelMode.skinny``), one to max_rows rows (tiles of six rows
    and their remainders, skinny.c) give bitwise the same numbers, and those are the rows of a
    larger batch, which the general kernel computes."""
    gen = torch.Generator().manual_seed(n_in * n_out)
    weight = torch.randn(n_out, n_in, generator=gen) * 0.02
    bias = torch.randn(n_out, generator=gen) * 0.01 if with_bias else None
    packed = PackedLinear(weight, bias, weights)
    assert packed._skinny is not None
    limit = packed._skinny.max_rows
    x = torch.randn(64, n_in, generator=gen) * torch.rand(64, 1, generator=gen) * 4
    x = torch.cat([x, x[: limit + 8 - 64].flip(1) * 0.5])  # (limit + 8, in)
    counts = sorted({1, 2, 3, 4, 5, 6, 7, 12, 13, 17, 31, 32, 33, 64, 65, limit} & set(range(1, limit + 1)))
    with kernel_mode(KernelMode(weights, batch_invariant=True)):
        full = packed(x)  # more rows than the loops take: the general kernel
        for rows in counts:
            assert torch.equal(packed(x[:rows]), full[:rows]), rows
    with kernel_mode(KernelMode(weights, batch_invariant=True, skinny=False)):
        for rows in counts:
            assert torch.equal(packed(x[:rows]), full[:rows]), rows
    assert packed._skinny.agrees_with(packed._general, bias) is not None
    if weights != "int8":  # (int8's distance from float32: test_batch_invariance.py)
        exact = F.linear(x[:64], weight.half().float() if weights == "float16" else weight, bias)
        assert torch.allclose(full[:64], exact, rtol=1e-4, atol=1e-5)


@needs_skinny
def test_the_loops_take_more_rows_only_with_avx512(isa: str) -> None:
    """Tiles of six rows are AVX-512 code; the AVX2 loops go one row at a time, and take products
    of up to NARROW_MAX_ROWS rows only (beyond, the general kernels, as before the tiles)."""
    lib = skinny.library()
    assert lib is not None
    wide = isa == "native" and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    for weights in ("float32", "float16", "int8"):
        expected = skinny.MAX_ROWS[weights] if wide else min(skinny.MAX_ROWS[weights], skinny.NARROW_MAX_ROWS)
        assert skinny.max_rows(lib, weights) == expected
    assert skinny.SkinnyWeight(torch.zeros(64, 32), "float32", lib).max_rows == (128 if wide else 16)


@needs_skinny
def test_int8_activations_round_as_fbgemm_rounds_them_at_the_ties(isa: str) -> None:
    """Through an identity weight each output is one quantized activation: at values one unit in
    the last place around the ties between two int8 steps, the loops give FBGEMM's numbers; the
    other rounding formulas they could use do not (this is what picks among them). The bias's
    rounding is picked likewise (test_one_to_four_rows_... with and without one)."""
    n = 512
    packed = PackedLinear(torch.eye(n), None, "int8")
    assert packed._skinny is not None
    rows = skinny.probe_rows(n, seed=0)
    expected = packed._general(rows)
    agreed = packed._skinny.agrees_with(packed._general, None)
    assert agreed is not None and torch.equal(packed._skinny.product(rows, None, agreed), expected)
    others = [v for v in packed._skinny._orders if v & 7 != agreed & 7]  # (bit 3 is about the bias: none here)
    assert len(others) == 10
    assert all(not torch.equal(packed._skinny.product(rows, None, v), expected) for v in others)


@needs_skinny
def test_the_loops_stream_the_weight_in_the_expected_blocks() -> None:
    packed = PackedLinear(torch.randn(100, 40), None, "float32")
    assert packed._skinny is not None
    assert packed._skinny.blocked.shape == (2, 40, 64)  # 100 outputs padded to 2 blocks of 64
    assert torch.equal(packed._skinny.blocked[1, :, 36:], torch.zeros(40, 28))
    assert packed.nbytes == 100 * 40 * 4 + 128 * 40 * 4  # the oneDNN copy and the blocked one


@needs_skinny
def test_a_disagreeing_general_kernel_keeps_the_loops_out(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no summation order of the loops matches the general kernel, they are not used, and
    the log says so, once per shape."""
    monkeypatch.setattr(skinny, "_DISAGREEING", set())
    gen = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(256, 128, generator=gen), torch.randn(256, generator=gen)
    packed = PackedLinear(weight, bias, "float32")
    assert packed._skinny is not None
    with caplog.at_level(logging.WARNING, logger="gpt2_service.model.skinny"):
        assert packed._skinny.agrees_with(lambda rows: packed._general(rows) * (1 + 2**-20), bias) is None
        assert "no order of theirs matches" in caplog.text
        caplog.clear()
        another = PackedLinear(weight * 2, bias, "float32")  # the same shape: said once, not per layer
        assert another._skinny is not None
        assert another._skinny.agrees_with(lambda rows: another._general(rows) + 1, bias) is None
        assert caplog.text == ""

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("the loops were used")

    packed._skinny.product = refuse  # type: ignore[method-assign]
    x = torch.randn(1, 128, generator=gen)
    with kernel_mode(KernelMode("float32", batch_invariant=True)):
        assert torch.equal(packed(x), packed._general(x))


@needs_skinny
def test_the_build_is_cached_per_user(fresh_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert skinny.library() is not None
    (built,) = fresh_library.glob("skinny-*.so")
    skinny.library.cache_clear()

    def no_compiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(skinny, "build", no_compiling)
    assert skinny.library() is not None
    assert list(fresh_library.glob("skinny-*.so")) == [built]


def test_without_a_compiler_the_general_kernels_stay(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(skinny, "_SOURCE", fresh_library.parent / "elsewhere" / "skinny.c")  # no prebuilt copy
    (fresh_library.parent / "elsewhere").mkdir()
    shutil.copy(Path(skinny.__file__).with_name("skinny.c"), fresh_library.parent / "elsewhere" / "skinny.c")
    with caplog.at_level(logging.INFO, logger="gpt2_service.model.skinny"):
        assert skinny.library() is None
    assert "skinny kernels off" in caplog.text
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(300, 64, generator=gen), torch.randn(300, generator=gen)
    x = torch.randn(9, 64, generator=gen)
    for weights in ("float32", "float16", "int8"):
        packed = PackedLinear(weight, bias, weights)
        assert packed._skinny is None
        with kernel_mode(KernelMode(weights, batch_invariant=True)):
            full = packed(x)
            assert all(torch.equal(packed(x[:rows]), full[:rows]) for rows in (1, 2, 4))
    assert not KVCache(1, 2, 2, 8, 4).attends_one_query  # decode attention falls back to SDPA too


# -- decode attention (skinny.attend) ----------------------------------------------------------


def _attend_case(
    gen: torch.Generator, rows: int, n_head: int, head_dim: int, max_len: int = 96
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """qkv (rows, 3C), caches of 2 * rows slots holding random keys and values, each row's slot
    (every other one, backwards) and position."""
    qkv = torch.randn(rows, 3 * n_head * head_dim, generator=gen)
    k_cache = torch.randn(2 * rows, n_head, max_len, head_dim, generator=gen)
    v_cache = torch.randn(2 * rows, n_head, max_len, head_dim, generator=gen)
    slots = torch.arange(2 * rows - 1, -1, -2)
    positions = torch.randint(0, max_len, (rows,), generator=gen)
    positions[0] = 0  # a first token, which sees only itself
    return qkv, k_cache, v_cache, slots, positions


@needs_skinny
@pytest.mark.parametrize(("n_head", "head_dim"), [(12, 64), (2, 8), (3, 24), (1, 5)])
def test_decode_attention_writes_the_new_keys_and_attends_as_sdpa(n_head: int, head_dim: int, isa: str) -> None:
    """Every row's key and value land at its (slot, position), nothing else in the cache changes,
    and its query's attention over keys 0..position is SDPA's within float32 rounding."""
    lib = skinny.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(n_head * head_dim)
    qkv, k_cache, v_cache, slots, positions = _attend_case(gen, 5, n_head, head_dim)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = skinny.attend(lib, qkv, k_cache, v_cache, slots, positions)
    C = n_head * head_dim
    for r, (slot, position) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
        q, k, v = qkv[r].view(3, n_head, head_dim)
        assert torch.equal(k_cache[slot, :, position], k) and torch.equal(v_cache[slot, :, position], v)
        k_before[slot, :, position], v_before[slot, :, position] = k, v
        keys, values = k_cache[slot, :, : position + 1], v_cache[slot, :, : position + 1]
        expected = F.scaled_dot_product_attention(q[:, None], keys, values)[:, 0].reshape(C)
        torch.testing.assert_close(out[r], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


@needs_skinny
def test_decode_attention_is_bitwise_the_same_alone_in_any_batch_and_at_any_thread_count() -> None:
    """A row's output depends on its own query and keys only: alone or among others, at one
    thread or several, with the AVX-512 or the AVX2 build, the same bits."""
    lib = skinny.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(7)
    qkv, k_cache, v_cache, slots, positions = _attend_case(gen, 7, 12, 64, max_len=1024)
    positions[1] = 1023
    threads = torch.get_num_threads()
    batch = skinny.attend(lib, qkv, k_cache.clone(), v_cache.clone(), slots, positions)
    try:
        for setting in ((1, 0), (threads, 1), (1, 1)):
            torch.set_num_threads(setting[0])
            lib.skinny_use_avx2_only(setting[1])
            for r in range(qkv.shape[0]):
                alone = skinny.attend(lib, qkv[r : r + 1], k_cache, v_cache, slots[r : r + 1], positions[r : r + 1])
                assert torch.equal(alone[0], batch[r]), (r, setting)
    finally:
        torch.set_num_threads(threads)
        lib.skinny_use_avx2_only(0)


@needs_skinny
def test_decode_attention_refuses_what_does_not_fit_the_cache() -> None:
    lib = skinny.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(3)
    qkv, k_cache, v_cache, slots, positions = _attend_case(gen, 2, 2, 8, max_len=16)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="outside the cache's 4 slots of 16 positions"):
        skinny.attend(lib, qkv, k_cache, v_cache, slots, torch.tensor([3, 16]))
    with pytest.raises(ValueError, match="outside"):
        skinny.attend(lib, qkv, k_cache, v_cache, torch.tensor([0, 4]), positions)
    assert torch.equal(k_cache, before)  # nothing written
    with pytest.raises(ValueError, match="do not fit"):
        skinny.attend(lib, qkv[:, :-1], k_cache, v_cache, slots, positions)
    with pytest.raises(ValueError, match="do not fit"):
        skinny.attend(lib, qkv, k_cache, v_cache, slots.int(), positions)


# -- layer norm, GELU and the one-call block ---------------------------------------------------


@needs_skinny
@pytest.mark.parametrize("n", [768, 64, 37])
def test_layer_norm_is_torch_s_within_rounding_and_bitwise_the_same_for_a_row_anywhere(n: int, isa: str) -> None:
    lib = skinny.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(40, n, generator=gen) * 3 + 1
    residual = torch.randn(40, n, generator=gen)
    weight, bias = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    same, y = skinny.layer_norm(lib, x, None, weight, bias, 1e-5)
    assert same is x
    torch.testing.assert_close(y, F.layer_norm(x, (n,), weight, bias, 1e-5), rtol=1e-5, atol=2e-6)
    total, y_sum = skinny.layer_norm(lib, x, residual, weight, bias, 1e-5)
    assert torch.equal(total, x + residual)  # the add is IEEE's, as torch's
    assert torch.equal(y_sum, skinny.layer_norm(lib, x + residual, None, weight, bias, 1e-5)[1])
    threads = torch.get_num_threads()
    try:
        for setting in (1, threads):
            torch.set_num_threads(setting)
            for r in (0, 17, 39):
                assert torch.equal(skinny.layer_norm(lib, x[r : r + 1], None, weight, bias, 1e-5)[1][0], y[r])
                alone = skinny.layer_norm(lib, x[r], residual[r], weight, bias, 1e-5)
                assert torch.equal(alone[1], y_sum[r]) and torch.equal(alone[0], total[r])
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="does not fit"):
        skinny.layer_norm(lib, x, None, weight[:-1], bias, 1e-5)


@needs_skinny
def test_gelu_is_torch_s_tanh_gelu_within_rounding_and_the_same_for_a_value_anywhere(isa: str) -> None:
    lib = skinny.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(20000, generator=gen) * 4, torch.linspace(-30, 30, 6001), torch.tensor([0.0, -0.0])])
    y = skinny.gelu_tanh(lib, x)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
    for start, count in ((0, 1), (3, 17), (4095, 3), (12345, 8000)):  # in vector lanes or the tail
        assert torch.equal(skinny.gelu_tanh(lib, x[start : start + count]), y[start : start + count])


@needs_skinny
def test_pick_gives_the_first_maximum_and_torch_s_log_softmax_and_a_row_alike_anywhere(isa: str) -> None:
    """skinny.pick, which the sampler reads a row's greedy token and log-probabilities from: the
    first index of the row's largest logit (as torch's max), (x - m) - log_sum within float32
    rounding of log_softmax (-inf where a logit is -inf), and a row's numbers bitwise the same
    alone, in any batch and at any thread count."""
    lib = skinny.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(11)
    for n in (50257, 17, 1):  # GPT-2's vocabulary, a row with a tail after its lanes, one entry
        logits = torch.randn(9, n, generator=gen) * 4
        logits[1, n // 2 :] = logits[1].max() + 1.0  # a tie for the maximum: the first one wins
        logits[2, ::3] = float("-inf")  # what the token constraints mask
        logits[2, 0] = 0.0
        index, top, log_sum = skinny.pick(lib, logits)
        assert torch.equal(index, logits.max(dim=-1).indices)
        assert torch.equal(top, logits.max(dim=-1).values)
        log_probs = (logits - top[:, None]) - log_sum[:, None]
        torch.testing.assert_close(log_probs, logits.log_softmax(dim=-1), rtol=0, atol=2e-6)
        threads = torch.get_num_threads()
        try:
            for t in (1, 2):
                torch.set_num_threads(t)
                for r in range(9):
                    alone = skinny.pick(lib, logits[r : r + 1].contiguous())
                    assert all(torch.equal(a, b[r : r + 1]) for a, b in zip(alone, (index, top, log_sum), strict=True))
        finally:
            torch.set_num_threads(threads)


@needs_skinny
@pytest.mark.parametrize("weights", ["float32", "float16", "int8"])
def test_the_one_call_step_is_bitwise_the_blocks_op_by_op(weights: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps of one to max_rows rows through skinny.c's one call for every block
    (FusedLayers) and through the blocks op by op (the same products, attention, layer norms and
    GELU called one at a time): the same logits to the bit, the same keys and values in the cache,
    and the stage timer still gets the attention and MLP halves."""
    from gpt2_service.model.gpt2 import GPT2, StageTimer
    from gpt2_service.model.kv_cache import AttentionLayout
    from gpt2_service.model.weights import load_model

    model = load_model("random:tiny").model
    model.prepare_weights(weights)
    c = model.config

    def decode(rows: int) -> tuple[Tensor, KVCache, StageTimer]:
        cache, timer = KVCache(c.n_layer, limit + 8, c.n_head, 64, c.head_dim), StageTimer()
        gen = torch.Generator().manual_seed(rows)
        slots = torch.randperm(limit + 8, generator=gen)[:rows]
        logits = []
        with kernel_mode(KernelMode(weights, batch_invariant=True)), torch.inference_mode():
            for step in range(12):
                positions = step + torch.arange(rows) * 3 % 40
                layout = AttentionLayout(slots, None, None, slots, positions, int(positions.max()) + 1, None)
                layout.one_query = True
                ids = torch.randint(0, c.vocab_size, (rows, 1), generator=gen)
                hidden = model(ids, positions[:, None], layout, cache, timer=timer if step else None)
                logits.append(model.logits(hidden[:, 0]))
        return torch.stack(logits), cache, timer

    calls = 0
    one_call = skinny.FusedLayers.__call__

    def counted(*args: object) -> tuple[Tensor, float, float]:
        nonlocal calls
        calls += 1
        return one_call(*args)

    monkeypatch.setattr(skinny.FusedLayers, "__call__", counted)
    limit = skinny.max_rows(skinny.library(), weights)
    for rows in sorted({*range(1, 18), 24, 31, 32, 33, limit} & set(range(1, limit + 1))):
        with monkeypatch.context() as patch:
            fused, fused_cache, timer = decode(rows)
            assert calls == 12
            patch.setattr(GPT2, "_fused_layers", lambda *args: None)
            op_by_op, op_cache, _ = decode(rows)
            assert calls == 12
        calls = 0
        assert torch.equal(fused, op_by_op), rows
        assert torch.equal(fused_cache.k, op_cache.k) and torch.equal(fused_cache.v, op_cache.v)
        assert timer.seconds["attention"] > 0 and timer.seconds["mlp"] > 0


@needs_skinny
def test_the_one_call_step_refuses_a_position_outside_the_cache() -> None:
    """A bad position reaches skinny.c's checks through the one-call step: a ValueError naming the
    cache's size, and the cache left as it was."""
    from gpt2_service.model.weights import load_model

    model = load_model("random:tiny").model
    model.prepare_weights("float32")
    c = model.config
    cache = KVCache(c.n_layer, 2, c.n_head, 8, c.head_dim)
    before = cache.k.clone()
    with kernel_mode(KernelMode("float32", batch_invariant=True)), torch.inference_mode():
        blocks = [b.fused("float32") for b in model.transformer.h]
        layers = skinny.FusedLayers([b for b in blocks if b is not None])
        x = torch.randn(1, 1, c.n_embd)
        with pytest.raises(ValueError, match="outside the cache's 2 slots of 8 positions"):
            layers(x, cache.k, cache.v, torch.tensor([1]), torch.tensor([8]))
    assert torch.equal(cache.k, before)


@needs_skinny
def test_a_block_that_cannot_run_in_one_call_runs_op_by_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block with another GELU, or whose weight the loops declined, has no one-call form; the
    step then runs its blocks op by op instead of in one call."""
    from gpt2_service.model.kernels import PackedLinear
    from gpt2_service.model.kv_cache import AttentionLayout
    from gpt2_service.model.weights import load_model

    model = load_model("random:tiny").model
    model.prepare_weights("float32")
    c = model.config
    cache = KVCache(c.n_layer, 2, c.n_head, 8, c.head_dim)
    slots, positions = torch.tensor([0]), torch.tensor([0])
    layout = AttentionLayout(slots, None, None, slots, positions, 1, None)
    layout.one_query = True
    first, second = model.transformer.h[0], model.transformer.h[1]
    with kernel_mode(KernelMode("float32", batch_invariant=True)), torch.inference_mode():
        assert model._fused_layers(torch.zeros(1, 1, c.n_embd), layout, cache, None) is not None
        first.mlp.approximate = "none"
        original, declined = PackedLinear.skinny_order, second.mlp.c_fc.packed["float32"]
        monkeypatch.setattr(PackedLinear, "skinny_order", lambda self: None if self is declined else original(self))
        model._fused.clear()
        assert first.fused("float32") is None and second.fused("float32") is None
        assert model._fused_layers(torch.zeros(1, 1, c.n_embd), layout, cache, None) is None
        hidden = model(torch.tensor([[5]]), positions[:, None], layout, cache)
        assert hidden.shape == (1, 1, c.n_embd) and torch.isfinite(hidden).all()
