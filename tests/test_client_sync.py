"""The synchronous Client against a live server (its blocking calls run in a worker thread so the
in-process server keeps serving)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from gpt2_client import (
    BatchItem,
    Client,
    FinishReason,
    Generation,
    HealthStatus,
    InvalidArgumentError,
    OverloadedError,
    UnavailableError,
)
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_ENGINE_CONFIG, serve, wait_for_slots_free
from tests.engine_helpers import WAIT_S


async def test_generate_stream_and_batch_agree(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            params = {"temperature": 0.7, "top_k": 40, "seed": 11, "max_new_tokens": 10, "ignore_eos": True}
            unary = await asyncio.to_thread(lambda: client.generate("The cat sat on the", **params))  # type: ignore[arg-type]
            chunks = await asyncio.to_thread(lambda: list(client.stream("The cat sat on the", **params)))  # type: ignore[arg-type]
            batch = await asyncio.to_thread(
                client.generate_batch,
                ["The cat sat on the", "Hello"],
                **params,  # type: ignore[arg-type]
            )
    assert isinstance(unary, Generation) and unary.seed == 11
    assert unary.finish_reason is FinishReason.LENGTH and len(unary.token_ids) == 10
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finished and chunks[-1].usage == unary.usage and chunks[-1].seed == 11
    assert not any(c.finished for c in chunks[:-1])
    assert batch[0].token_ids == unary.token_ids and len(batch) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        unary.text = "changed"  # type: ignore[misc]


async def test_batch_items_carry_their_own_parameters(tiny: LoadedModel) -> None:
    items: list[BatchItem | str] = [
        {"prompt": "Hello", "max_new_tokens": 3, "temperature": 0.0},
        {"prompt": [464, 3797], "max_new_tokens": 5, "seed": 4},
        "Numbers",
    ]
    async with serve(tiny) as served:
        with Client(served.target) as client:
            results = await asyncio.to_thread(client.generate_batch, items, max_new_tokens=2, ignore_eos=True)
    assert [len(r.token_ids) for r in results] == [3, 5, 2]
    assert results[1].seed == 4 and results[1].usage.prompt_tokens == 2


async def test_invalid_arguments_raise_with_violations(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target) as client, pytest.raises(InvalidArgumentError) as caught:
            await asyncio.to_thread(lambda: client.generate("x", top_p=1.5, stop=["ok", ""], request_id="r1"))
    error = caught.value
    assert [v.field for v in error.violations] == ["sampling.top_p", "stopping.stop[1]"]
    assert (error.reason, error.request_id) == ("INVALID_ARGUMENT", "r1")
    assert str(error).startswith("INVALID_ARGUMENT: ")


def test_unknown_keyword_is_a_type_error_before_sending() -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(TypeError, match="tempreature"):
        client.generate("x", tempreature=0.5)  # type: ignore[call-arg]


async def test_full_queue_raises_overloaded(tiny: LoadedModel) -> None:
    config = dataclasses.replace(API_ENGINE_CONFIG, max_batch_size=1, max_queue_size=1)
    async with serve(tiny, engine_config=config) as served:
        with Client(served.target, timeout=30) as client:
            running = client.stream("Once", max_new_tokens=500, ignore_eos=True)
            await asyncio.to_thread(next, running)  # admitted
            waiting = client.stream("Twice", max_new_tokens=500, ignore_eos=True)
            waiting_task = asyncio.create_task(asyncio.to_thread(next, waiting))
            await served.engine.wait_for(lambda: served.engine.num_in_flight == 2, WAIT_S)
            with pytest.raises(OverloadedError) as caught:
                await asyncio.to_thread(lambda: client.generate("Thrice"))
            assert caught.value.reason == "QUEUE_FULL"
            running.close()  # leaving a stream early cancels its generation
            await waiting_task
            waiting.close()
            await wait_for_slots_free(served.engine)


async def test_health_and_model_info(tiny: LoadedModel) -> None:
    async with serve(tiny, attach=False) as served:
        with Client(served.target, timeout=10) as client:
            assert await asyncio.to_thread(client.health) is HealthStatus.NOT_SERVING
            await served.server.attach(served.engine)
            assert await asyncio.to_thread(client.health) is HealthStatus.SERVING
            assert await asyncio.to_thread(client.health, "gpt2.v1.TextGeneration") is HealthStatus.SERVING
            assert await asyncio.to_thread(client.health, "no.such.Service") is HealthStatus.SERVICE_UNKNOWN
            info = await asyncio.to_thread(client.model_info)
    assert info.name == "random:tiny" and info.random_weights
    assert info.weights == "float32" and info.batch_invariant  # the defaults
    assert info.limits.max_new_tokens_limit == API_ENGINE_CONFIG.max_new_tokens_limit


def test_unreachable_server_raises_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(UnavailableError):
        client.health()
