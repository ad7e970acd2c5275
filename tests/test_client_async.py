"""AsyncClient against a live server: same results and errors as the sync client."""

from __future__ import annotations

import pytest
from gpt2_client import AsyncClient, DeadlineExceededError, FinishReason, HealthStatus, InvalidArgumentError
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import serve, wait_for_slots_free


async def test_generate_and_stream_agree(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, AsyncClient(served.target, timeout=30) as client:
        unary = await client.generate("Hello there", seed=3, max_new_tokens=9, ignore_eos=True, top_logprobs=2)
        chunks = [c async for c in client.stream("Hello there", seed=3, max_new_tokens=9, ignore_eos=True)]
        batch = await client.generate_batch(["Hello there"], seed=3, max_new_tokens=9, ignore_eos=True)
        assert await client.health() is HealthStatus.SERVING
        assert (await client.model_info()).n_layer == 2
    assert unary.finish_reason is FinishReason.LENGTH
    assert all(len(t.top_logprobs) == 2 for t in unary.tokens)
    assert "".join(c.text for c in chunks) == unary.text == batch[0].text
    assert [t.id for c in chunks for t in c.tokens] == list(unary.token_ids)


async def test_stop_sequence_is_reported(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, AsyncClient(served.target) as client:
        free = await client.generate("The cat", temperature=0.0, max_new_tokens=12, ignore_eos=True)
        stop = free.text[4:7]
        stopped = await client.generate("The cat", temperature=0.0, max_new_tokens=12, ignore_eos=True, stop=stop)
    assert stopped.finish_reason is FinishReason.STOP_SEQUENCE
    assert stopped.stop_sequence == stop and stopped.text == free.text[: free.text.index(stop)]


async def test_leaving_a_stream_early_cancels_the_generation(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, AsyncClient(served.target) as client:
        stream = client.stream("Once upon a time", max_new_tokens=500, ignore_eos=True)
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        await wait_for_slots_free(served.engine)
        assert served.engine.stats.num_finished == 0


async def test_errors_are_typed(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, AsyncClient(served.target) as client:
        with pytest.raises(InvalidArgumentError) as invalid:
            _ = [c async for c in client.stream([464, 50300], max_new_tokens=3)]
        with pytest.raises(DeadlineExceededError):
            await client.generate("Once", max_new_tokens=500, ignore_eos=True, timeout=0.2)
        await wait_for_slots_free(served.engine)
    assert [v.field for v in invalid.value.violations] == ["prompt_token_ids.ids[1]"]
