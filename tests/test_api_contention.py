"""Contention through gRPC: the priority field, tenants from the token file (else the peer), one
GenerateBatch call's share of the batch, deadline refusals with RetryInfo, and a stream whose
reader stops reading."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import generation_pb2_grpc
from gpt2_service.model.weights import LoadedModel
from grpc_status import rpc_status

from tests.api_helpers import (
    API_ENGINE_CONFIG,
    API_SERVER_CONFIG,
    Served,
    greedy,
    long_request,
    rich_error,
    serve,
    stub_for,
    wait_for_slots_free,
)
from tests.engine_helpers import WAIT_S

SMALL_BATCH = dataclasses.replace(API_ENGINE_CONFIG, max_batch_size=4, max_call_share=0.5)


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    for detail in status.details:
        if detail.Is(retry.DESCRIPTOR):
            detail.Unpack(retry)
            return retry.retry_delay.ToNanoseconds() / 1e9
    return None


async def test_an_unknown_priority_is_invalid_argument_naming_the_field(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Generate(greedy(priority=7))
        error = rich_error(failed.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT and error.fields == ["priority"]
        for priority in (pb.PRIORITY_UNSPECIFIED, pb.PRIORITY_INTERACTIVE, pb.PRIORITY_DEFAULT, pb.PRIORITY_BATCH):
            assert (await stub.Generate(greedy(priority=priority))).usage.completion_tokens == 8


async def test_an_interactive_request_preempts_a_batch_one_and_both_finish_whole(tiny: LoadedModel) -> None:
    config = dataclasses.replace(API_ENGINE_CONFIG, max_batch_size=1)
    async with serve(tiny, config) as served, stub_for(served) as stub:
        expected = await stub.Generate(greedy(max_new_tokens=60))
        background = stub.GenerateStream(greedy(max_new_tokens=60, priority=pb.PRIORITY_BATCH))
        first = await anext(aiter(background))
        urgent = await stub.Generate(greedy("Hello", max_new_tokens=4, priority=pb.PRIORITY_INTERACTIVE))
        rest = [response async for response in background]
        assert urgent.usage.completion_tokens == 4
        assert served.engine.stats.num_preempted.get("priority") == 1
        ids = [t.id for r in [first, *rest] for t in r.tokens]
        assert ids == [t.id for t in expected.tokens]  # nothing lost, nothing repeated


async def test_one_generate_batch_call_leaves_room_for_another_callers_request(tiny: LoadedModel) -> None:
    async with serve(tiny, SMALL_BATCH) as served, stub_for(served) as stub:
        batch = stub.GenerateBatch(pb.GenerateBatchRequest(requests=[long_request(300) for _ in range(8)]))
        await served.engine.wait_for(lambda: served.engine.stats.num_running == 4, WAIT_S)
        steps = served.engine.stats.num_steps
        small = await stub.Generate(greedy(max_new_tokens=2))
        assert small.usage.completion_tokens == 2
        assert served.engine.stats.num_steps - steps < 30  # not after the batch's 300-token items
        assert served.engine.stats.num_preempted.get("call_share") == 1
        batch.cancel()
        await wait_for_slots_free(served.engine)


async def test_a_deadline_that_cannot_be_met_is_refused_at_once_with_retry_info(tiny: LoadedModel) -> None:
    config = dataclasses.replace(API_ENGINE_CONFIG, max_batch_size=1, preemption=False)
    async with serve(tiny, config) as served, stub_for(served) as stub:
        running = stub.GenerateStream(long_request(500))
        await anext(aiter(running))
        await served.engine.wait_for(lambda: served.engine.stats.num_steps > 20, WAIT_S)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(greedy(max_new_tokens=2), timeout=0.2)
        error = rich_error(refused.value)
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "DEADLINE_UNMEETABLE"
        delay = retry_delay(refused.value)
        assert delay is not None and delay > 0
        running.cancel()


def _token_file(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text("secret-a team-a\nsecret-b team-b\nsecret-c\n")
    return str(path)


@pytest.fixture
async def authed(tiny: LoadedModel, tmp_path: Path) -> AsyncIterator[Served]:
    server_config = dataclasses.replace(API_SERVER_CONFIG, auth_token_file=_token_file(tmp_path))
    engine_config = dataclasses.replace(API_ENGINE_CONFIG, max_batch_size=1, max_queued_per_tenant=2)
    async with serve(tiny, engine_config, server_config) as served:
        yield served


async def test_tenants_come_from_the_token_file_and_each_has_its_own_queue_bound(authed: Served) -> None:
    def metadata(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async with authed.channel() as channel:
        stub = generation_pb2_grpc.TextGenerationStub(channel)
        running = stub.GenerateStream(long_request(500), metadata=metadata("secret-a"))
        await anext(aiter(running))  # team-a holds the one batch place
        queued = [stub.Generate(greedy(), metadata=metadata("secret-a")) for _ in range(2)]
        engine = authed.engine
        await engine.wait_for(lambda: engine.queued_by_tenant().get("team-a") == 2, WAIT_S)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(greedy(), metadata=metadata("secret-a"))
        assert rich_error(refused.value).reason == "TENANT_QUEUE_FULL"
        # the other tenants still get in line; a token without a name is its own tenant
        other = stub.Generate(greedy(), metadata=metadata("secret-b"))
        third = stub.Generate(greedy(), metadata=metadata("secret-c"))
        await engine.wait_for(lambda: engine.queued_by_tenant() == {"team-a": 2, "team-b": 1, "token-3": 1}, WAIT_S)
        running.cancel()
        results = await asyncio.gather(*queued, other, third)
        assert all(r.usage.completion_tokens == 8 for r in results)


async def test_a_stream_nobody_reads_is_paused_then_cancelled(tiny: LoadedModel) -> None:
    config = dataclasses.replace(
        API_ENGINE_CONFIG, stream_buffer_tokens=16, stream_idle_timeout=0.5, max_new_tokens_limit=4000
    )
    # no window growth on the client: the unread stream backs up into the server after ~64 KiB
    options = [("grpc.http2.bdp_probe", 0)]
    async with serve(tiny, config) as served, grpc.aio.insecure_channel(served.target, options=options) as channel:
        stub = generation_pb2_grpc.TextGenerationStub(channel)
        call = stub.GenerateStream(greedy(max_new_tokens=4000, top_logprobs=20))
        await served.engine.wait_for(lambda: served.engine.stats.num_stalled == 1, 30)
        await wait_for_slots_free(served.engine)  # the engine let go of it: slot and buffer
        assert served.engine.stats.num_paused == 0
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for response in call:  # what was already sent, then the status
                received += len(response.tokens)
        assert 0 < received < 4000
        error = rich_error(ended.value)
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "STREAM_STALLED"
        assert "not read for 0.5 s" in error.message
