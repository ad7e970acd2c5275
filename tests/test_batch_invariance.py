"""Batch-invariant mode (``EngineConfig.batch_invariant``, the default): a request's numbers do not
depend, to the last bit, on what else shares its batch. Built from properties tested here: every
weight format's linear kernel computes each row the same for any row count (float32 padding one
row to two), the sampler treats rows independently, and attention runs row by row; then the
engine-level property over several scenarios (and over many in tests/test_determinism.py), with
decode attention by skinny.c (invariant by construction, tests/test_skinny.py) and by SDPA."""

from __future__ import annotations

import asyncio

import pytest
import torch
from gpt2_service.config import EngineConfig
from gpt2_service.core.request import SamplingParams
from gpt2_service.engine.frontend import Engine
from gpt2_service.engine.sampler import RowState, Sampler
from gpt2_service.model import skinny
from gpt2_service.model.gpt2 import Conv1D
from gpt2_service.model.kernels import (
    KernelMode,
    PackedLinear,
    current_mode,
    kernel_mode,
    linear,
    onednn_applies,
    padded_decode_attention_is_invariant,
    padded_keys,
)
from gpt2_service.model.kv_cache import KVCache
from gpt2_service.model.weights import LoadedModel, load_model

from tests.engine_helpers import request, run
from tests.test_engine_batching import MIXED

pytestmark = pytest.mark.skipif(
    not onednn_applies(torch.zeros(1)), reason="batch-invariant mode needs a torch built with oneDNN"
)


@pytest.mark.parametrize(("n_in", "n_out"), [(768, 2304), (3072, 768), (64, 50257)])
def test_linear_rows_are_bitwise_the_same_for_any_row_count(n_in: int, n_out: int) -> None:
    gen = torch.Generator().manual_seed(n_in)
    weight = torch.randn(n_out, n_in, generator=gen) * 0.02
    bias = torch.randn(n_out, generator=gen) * 0.01
    x = torch.randn(2048, n_in, generator=gen)
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        with kernel_mode(KernelMode(batch_invariant=True)):
            full = linear(x, weight, bias)
            for rows in (1, 2, 3, 7, 64, 257, 2048):
                assert torch.equal(linear(x[:rows], weight, bias), full[:rows]), f"{rows} rows, {threads} threads"
            assert torch.equal(linear(x[5][None, None], weight, bias)[0, 0], full[5])  # any leading shape


@pytest.mark.parametrize("weights", ["float32", "float16", "int8"])
@pytest.mark.parametrize(("n_in", "n_out"), [(768, 2304), (3072, 768), (64, 50257)])
def test_packed_linear_rows_are_bitwise_the_same_for_any_row_count(weights: str, n_in: int, n_out: int) -> None:
    """oneDNN's kernel on prepacked float32 weights (one row padded to two, as unpacked), FBGEMM's
    fp16 kernel, and the int8 kernel fed rows of their own scale compute a row alike whether it is
    alone or anywhere in a batch of any size, whatever the other rows hold."""
    gen = torch.Generator().manual_seed(n_out)
    weight = torch.randn(n_out, n_in, generator=gen) * 0.02
    packed = PackedLinear(weight, torch.randn(n_out, generator=gen) * 0.01, weights)
    x = torch.randn(300, n_in, generator=gen) * torch.rand(300, 1, generator=gen) * 4  # rows of unequal scale
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        with kernel_mode(KernelMode(weights, batch_invariant=True)):
            _check_rows(packed, x)


def test_prepacked_float32_weights_change_no_number() -> None:
    """The packed float32 copy is only a layout: every row bitwise what ``linear`` computes from
    the plain weight, in batch-invariant mode, so packing changes no result."""
    gen = torch.Generator().manual_seed(3)
    for n_in, n_out in [(768, 2304), (3072, 768), (768, 50257)]:
        weight, bias = torch.randn(n_out, n_in, generator=gen) * 0.02, torch.randn(n_out, generator=gen) * 0.01
        packed = PackedLinear(weight, bias, "float32")
        x = torch.randn(40, n_in, generator=gen)
        with kernel_mode(KernelMode(batch_invariant=True)):
            for rows in (1, 2, 5, 40):
                assert torch.equal(packed(x[:rows]), linear(x[:rows], weight, bias)), (n_in, n_out, rows)


async def test_the_engine_prepacks_float32_weights_at_warm_up() -> None:
    loaded = load_model("random:tiny")  # a model of its own: a packed copy stays
    model = loaded.model
    assert model.packed_bytes("float32") == 0
    engine = Engine(loaded, EngineConfig(model="random:tiny"))
    await engine.start()
    await engine.shutdown()
    linears = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert all("float32" in m.packed for m in linears) and "float32" in model.lm_head_packed
    shapes = [m.out_in().shape for m in linears] + [model.transformer.wte.weight.shape]  # (out, in)
    onednn = sum(out * n_in for out, n_in in shapes)
    blocked = sum(skinny.padded(out) * n_in for out, n_in in shapes) if skinny.library() else 0  # test_skinny.py
    assert model.packed_bytes("float32") == 4 * (onednn + blocked)


def _check_rows(packed: PackedLinear, x: torch.Tensor) -> None:
    """Each row of ``packed(x)`` is bitwise the same in any batch it is computed in."""
    full = packed(x)
    for rows in (1, 2, 3, 7, 64, 257):
        assert torch.equal(packed(x[:rows]), full[:rows]), f"{rows} rows, {torch.get_num_threads()} threads"
    assert torch.equal(packed(x[[5]]), full[[5]])
    assert torch.equal(packed(torch.cat([x[[5]], x[200:] * 100]))[0], full[5])  # louder neighbours
    assert torch.equal(packed(x[5][None, None])[0, 0], full[5])  # any leading shape


def test_packed_linear_stays_close_to_float32() -> None:
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(512, 256, generator=gen) * 0.02, torch.randn(512, generator=gen) * 0.01
    x = torch.randn(64, 256, generator=gen)
    exact = torch.nn.functional.linear(x, weight, bias)
    for weights, tolerance in (("float16", 1e-3), ("int8", 0.03)):
        err = (PackedLinear(weight, bias, weights)(x) - exact).norm() / exact.norm()
        assert err < tolerance, (weights, float(err))


def test_the_sampler_treats_each_row_on_its_own() -> None:
    """Each row draws the token, log-probabilities and alternatives it draws alone (rows of eight
    kinds of parameters on near-uniform logits, as random weights give). Last-bit differences
    rarely change a draw here; the engine test below is the sensitive one."""
    gen = torch.Generator().manual_seed(0)
    rows = 64
    params = [SamplingParams(**MIXED[i % len(MIXED)]) for i in range(rows)]  # type: ignore[arg-type]
    logits = torch.randn(rows, 50257, generator=gen) * 0.05 - 10.8

    def state(i: int) -> RowState:
        p = params[i]
        return RowState(
            params=p,
            generator=None if p.greedy else torch.Generator().manual_seed(100 + i),
            context_ids=list(range(i, 5 * i + 1)),
            output_ids=list(range(i, 2 * i + 1)),
            top_logprobs=5,
        )

    for _ in range(3):
        together = Sampler().sample(logits, [state(i) for i in range(rows)])
        for i in range(rows):
            alone = Sampler().sample(logits[i : i + 1], [state(i)])
            assert alone.token_ids[0] == together.token_ids[i], f"row {i}: {MIXED[i % len(MIXED)]}"
            assert alone.logprobs[0] == together.logprobs[i]
            assert alone.top_logprobs[0] == together.top_logprobs[i]
        logits = logits + torch.randn(logits.shape, generator=gen) * 0.01


@pytest.fixture(params=["skinny.c attention", "padded SDPA"])
async def invariant_engine(
    tiny: LoadedModel, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Engine:
    """The batch-invariant engine, decoding with skinny.c's attention (where it is built) or, as
    without it, with SDPA over keys padded to whole blocks."""
    if request.param == "padded SDPA":
        monkeypatch.setattr(KVCache, "attends_one_query", False)  # as without skinny.c
    elif skinny.library() is None:
        pytest.skip("skinny.c is not built on this machine (no C compiler or CPU support)")
    eng = Engine(tiny, EngineConfig(model="random:tiny", max_batch_size=8, max_prefill_tokens=64, batch_invariant=True))
    assert eng.runner.one_query == (request.param == "skinny.c attention")
    # the padded-key check runs only where skinny.c's attention does not (0.3 s at start-up)
    assert eng.runner.padded_decode == (request.param == "padded SDPA" and padded_decode_attention_is_invariant())
    await eng.start()
    yield eng  # type: ignore[misc]
    await eng.shutdown()


@pytest.mark.parametrize("variation", range(6))
async def test_a_request_gives_bitwise_the_same_result_alone_and_in_a_batch_of_eight(
    invariant_engine: Engine, variation: int
) -> None:
    """Eight requests of different lengths (3..80 tokens: chunked prefills with a budget of 64) and
    parameters (greedy, temperature, top-k, top-p, min-p, typical-p, penalties), alone and together:
    the same tokens, log-probabilities and top alternatives, bit for bit."""
    offset = 7 * variation
    prompts = [list(range(100 * i + 1 + offset, 100 * i + 4 + offset + 11 * i)) for i in range(8)]
    params = [{**kw, "seed": kw["seed"] + 100 * variation} if "seed" in kw else kw for kw in MIXED]
    reqs = [
        request(p, max_new_tokens=20, request_id=str(i), top_logprobs=3, **params[i]) for i, p in enumerate(prompts)
    ]
    alone = [await run(invariant_engine, r) for r in reqs]
    together = await asyncio.gather(*(run(invariant_engine, r) for r in reqs))
    assert invariant_engine.stats.max_decode_batch_size == 8
    for i, ((a_out, a_fin), (t_out, t_fin)) in enumerate(zip(alone, together, strict=True)):
        assert t_fin.token_ids == a_fin.token_ids, f"request {i} ({params[i]})"
        assert [t for o in t_out for t in o.tokens] == [t for o in a_out for t in o.tokens], f"request {i}"


async def test_decode_attends_row_by_row_where_padded_attention_is_not_invariant(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback for a machine whose attention kernel rounds differently under padding: the
    runner attends row by row, and results stay bitwise the same alone and batched."""
    import gpt2_service.engine.runner as runner_module

    monkeypatch.setattr(runner_module, "padded_decode_attention_is_invariant", lambda: False)
    monkeypatch.setattr(KVCache, "attends_one_query", False)  # as without skinny.c
    eng = Engine(tiny, EngineConfig(model="random:tiny", max_batch_size=8, max_prefill_tokens=64))
    assert eng.runner.batch_invariant and not eng.runner.one_query and not eng.runner.padded_decode
    await eng.start()
    try:
        await test_a_request_gives_bitwise_the_same_result_alone_and_in_a_batch_of_eight(eng, 0)
    finally:
        await eng.shutdown()


def test_decode_rows_attend_over_whole_key_blocks() -> None:
    assert padded_keys(1) == padded_keys(64) == 64 and padded_keys(65) == 128 and padded_keys(1024) == 1024


def test_batch_invariance_is_the_default_and_off_where_it_cannot_hold(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    assert EngineConfig().batch_invariant
    assert Engine(tiny, EngineConfig(model="random:tiny")).batch_invariant
    assert not Engine(tiny, EngineConfig(model="random:tiny", batch_invariant=False)).batch_invariant
    half = load_model("random:tiny", dtype="bfloat16")
    assert not Engine(half, EngineConfig(model="random:tiny")).batch_invariant  # and ModelInfo says so
    assert "may depend on what shares its batch" in caplog.text


def test_reduced_weight_formats_need_float32_on_the_cpu() -> None:
    half = load_model("random:tiny", dtype="bfloat16")
    with pytest.raises(ValueError, match="--weights int8 needs float32 arithmetic on the CPU"):
        Engine(half, EngineConfig(model="random:tiny", weights="int8"))


def test_the_weight_format_is_the_threads_own() -> None:
    with kernel_mode(KernelMode("int8", batch_invariant=True)):
        assert current_mode() == KernelMode("int8", batch_invariant=True)
        with kernel_mode(KernelMode()):
            assert current_mode() == KernelMode()
        assert current_mode().weights == "int8"
    assert current_mode() == KernelMode()
