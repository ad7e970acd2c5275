"""The error model over the wire: status codes, google.rpc details, and freed slots."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import grpc
import pytest
from gpt2_client.proto import common_pb2
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.api import convert
from gpt2_service.api.logs import RequestIdFilter
from gpt2_service.api.status import STATUS_CODE_BY_ERROR, DrainingError, NotReadyError, status_code_for
from gpt2_service.errors import (
    DeadlineExceededError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
)
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import (
    API_ENGINE_CONFIG,
    first_message,
    greedy,
    long_request,
    rich_error,
    serve,
    stub_for,
    wait_for_slots_free,
)
from tests.engine_helpers import WAIT_S


def _set(path: str, value: object) -> Callable[[pb.GenerateRequest], None]:
    """A mutation that sets ``path`` (dotted) on a request."""

    def apply(request: pb.GenerateRequest) -> None:
        *parents, leaf = path.split(".")
        target = request
        for name in parents:
            target = getattr(target, name)
        if isinstance(value, list):
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)

    return apply


def _token_ids(ids: list[int]) -> Callable[[pb.GenerateRequest], None]:
    def apply(request: pb.GenerateRequest) -> None:
        request.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=ids))

    return apply


LIMIT = API_ENGINE_CONFIG.max_new_tokens_limit

# (id, mutation, the field path the BadRequest must name, ErrorInfo reason)
INVALID_FIELDS = [
    ("temperature", _set("sampling.temperature", -0.5), "sampling.temperature", "INVALID_ARGUMENT"),
    ("top_k", _set("sampling.top_k", -1), "sampling.top_k", "INVALID_ARGUMENT"),
    ("top_p_zero", _set("sampling.top_p", 0.0), "sampling.top_p", "INVALID_ARGUMENT"),
    ("top_p_above_one", _set("sampling.top_p", 1.5), "sampling.top_p", "INVALID_ARGUMENT"),
    ("min_p", _set("sampling.min_p", 1.5), "sampling.min_p", "INVALID_ARGUMENT"),
    ("typical_p", _set("sampling.typical_p", 0.0), "sampling.typical_p", "INVALID_ARGUMENT"),
    ("repetition_penalty", _set("sampling.repetition_penalty", 0.0), "sampling.repetition_penalty", "INVALID_ARGUMENT"),
    ("presence_penalty", _set("sampling.presence_penalty", 2.5), "sampling.presence_penalty", "INVALID_ARGUMENT"),
    ("frequency_penalty", _set("sampling.frequency_penalty", -3.0), "sampling.frequency_penalty", "INVALID_ARGUMENT"),
    ("max_new_tokens_above_limit", _set("stopping.max_new_tokens", LIMIT + 1), "stopping.max_new_tokens", "INVALID_ARGUMENT"),
    ("max_new_tokens_zero", _set("stopping.max_new_tokens", 0), "stopping.max_new_tokens", "INVALID_ARGUMENT"),
    ("min_new_tokens", _set("stopping.min_new_tokens", 9), "stopping.min_new_tokens", "INVALID_ARGUMENT"),
    ("too_many_stop_strings", _set("stopping.stop", [f"s{i}" for i in range(17)]), "stopping.stop", "INVALID_ARGUMENT"),
    ("too_long_stop_string", _set("stopping.stop", ["x" * 257]), "stopping.stop[0]", "INVALID_ARGUMENT"),
    ("empty_stop_string", _set("stopping.stop", ["ok", ""]), "stopping.stop[1]", "INVALID_ARGUMENT"),
    ("too_many_stop_token_ids", _set("stopping.stop_token_ids", list(range(65))), "stopping.stop_token_ids", "INVALID_ARGUMENT"),
    ("stop_token_id_outside_vocab", _set("stopping.stop_token_ids", [50257]), "stopping.stop_token_ids[0]", "INVALID_ARGUMENT"),
    ("prompt_token_id_outside_vocab", _token_ids([464, 3797, 99999]), "prompt_token_ids.ids[2]", "INVALID_ARGUMENT"),
    ("top_logprobs", _set("top_logprobs", 21), "top_logprobs", "INVALID_ARGUMENT"),
    ("truncation_enum_out_of_range", _set("truncation", 7), "truncation", "INVALID_ARGUMENT"),
    ("overflow_enum_out_of_range", _set("overflow", 9), "overflow", "INVALID_ARGUMENT"),
    ("request_id_too_long", _set("request_id", "r" * 129), "request_id", "INVALID_ARGUMENT"),
    ("prompt_too_long_under_reject", lambda r: (_set("prompt", "word " * 300)(r), _set("truncation", pb.REJECT)(r)), "prompt", "PROMPT_TOO_LONG"),
    ("token_prompt_too_long_under_reject", lambda r: (_token_ids([464] * 200)(r), _set("truncation", pb.REJECT)(r)), "prompt_token_ids", "PROMPT_TOO_LONG"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "field", "reason"), [p[1:] for p in INVALID_FIELDS], ids=[p[0] for p in INVALID_FIELDS]
)
async def test_invalid_field_gives_invalid_argument_naming_it(
    tiny: LoadedModel, mutate: Callable[[pb.GenerateRequest], None], field: str, reason: str
) -> None:
    request = greedy(request_id="bad-request")
    mutate(request)
    async with serve(tiny) as served, stub_for(served) as stub:
        for rpc in (stub.Generate, lambda r: _drain(stub.GenerateStream(r))):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await rpc(request)
            error = rich_error(caught.value)
            assert error.code is grpc.StatusCode.INVALID_ARGUMENT
            assert field in error.fields, error.fields
            assert (error.reason, error.domain) == (reason, "gpt2.v1")
            # An unusable request_id is replaced by a generated one, not echoed.
            assert error.request_id == ("bad-request" if field != "request_id" else error.request_id[:32])
        assert served.engine.num_in_flight == 0


async def _drain(call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateStreamResponse]) -> None:
    async for _ in call:
        pass


async def test_every_bad_field_is_named_in_one_answer(tiny: LoadedModel) -> None:
    request = greedy()
    request.sampling.top_p = 2.0
    request.sampling.top_k = -3
    request.overflow = 5
    async with serve(tiny) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(request)
    assert sorted(rich_error(caught.value).fields) == ["overflow", "sampling.top_k", "sampling.top_p"]


async def test_batch_violations_are_named_by_item(tiny: LoadedModel) -> None:
    items = [greedy() for _ in range(5)]
    items[3].sampling.top_p = 1.5
    items[1].stopping.stop_token_ids.append(60000)
    async with serve(tiny) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateBatch(pb.GenerateBatchRequest(requests=items))
        assert served.engine.num_in_flight == 0
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == ["requests[1].stopping.stop_token_ids[0]", "requests[3].sampling.top_p"]


async def test_batch_prompt_too_long_is_named_by_item_and_nothing_keeps_running(tiny: LoadedModel) -> None:
    items = [greedy(max_new_tokens=200) for _ in range(3)]
    items[2].prompt = "word " * 300
    items[2].truncation = pb.REJECT
    async with serve(tiny) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateBatch(pb.GenerateBatchRequest(requests=items))
        await wait_for_slots_free(served.engine)
    error = rich_error(caught.value)
    assert (error.reason, error.fields) == ("PROMPT_TOO_LONG", ["requests[2].prompt"])


@pytest.mark.parametrize("size", [0, 17], ids=["empty", "oversized"])
async def test_batch_size_outside_limits_is_invalid(tiny: LoadedModel, size: int) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateBatch(pb.GenerateBatchRequest(requests=[greedy() for _ in range(size)]))
    error = rich_error(caught.value)
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["requests"])


async def test_full_queue_gives_resource_exhausted_at_once(tiny: LoadedModel) -> None:
    config = dataclasses.replace(API_ENGINE_CONFIG, max_batch_size=1, max_queue_size=1)
    async with serve(tiny, engine_config=config) as served, stub_for(served) as stub:
        running = stub.GenerateStream(long_request())
        await first_message(running)  # admitted: it holds the only batch place
        waiting = stub.GenerateStream(long_request())  # fills the queue
        await served.engine.wait_for(lambda: served.engine.num_in_flight == 2, WAIT_S)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(greedy(), timeout=5)
        running.cancel()
        waiting.cancel()
        await wait_for_slots_free(served.engine)
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")


async def test_cancelled_stream_frees_its_slot(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        call = stub.GenerateStream(long_request())
        await first_message(call)
        assert served.engine.num_in_flight == 1
        call.cancel()
        await wait_for_slots_free(served.engine)
        assert served.engine.stats.num_aborted == 1
        # The freed slot serves the next request.
        assert (await stub.Generate(greedy())).usage.completion_tokens == 8


async def test_short_deadline_gives_deadline_exceeded_and_frees_the_slot(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(long_request(), timeout=0.3)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for_slots_free(served.engine)
        assert served.engine.stats.num_finished == 0


def test_deadline_too_short_to_meet_is_refused_before_admission() -> None:
    with pytest.raises(DeadlineExceededError):
        convert.deadline_from_time_remaining(0.001, now=100.0)
    with pytest.raises(DeadlineExceededError):
        convert.deadline_from_time_remaining(-1.0, now=100.0)
    assert convert.deadline_from_time_remaining(2.5, now=100.0) == 102.5
    assert convert.deadline_from_time_remaining(None) is None


async def test_internal_fault_is_logged_with_the_request_id_and_hidden_from_the_caller(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:

        async def broken_submit(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internal detail")

        served.engine.submit = broken_submit  # type: ignore[method-assign,assignment]
        caplog.handler.addFilter(RequestIdFilter())  # as configure_logging does for the server's handler
        with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(greedy(request_id="fault-42"))
    error = rich_error(caught.value)
    assert (error.code, error.reason, error.request_id) == (grpc.StatusCode.INTERNAL, "INTERNAL", "fault-42")
    assert "fault-42" in error.message
    assert "secret" not in error.message and "Traceback" not in error.message
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged and all(getattr(r, "request_id", None) == "fault-42" for r in logged)
    assert any("secret internal detail" in (r.exc_text or "") for r in logged)


async def test_draining_server_refuses_new_rpcs_with_unavailable(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        served.server.gate.close()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(greedy())
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DRAINING")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError([]), grpc.StatusCode.INVALID_ARGUMENT),
        (EngineOverloadedError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineUnavailableError("draining"), grpc.StatusCode.UNAVAILABLE),
        (NotReadyError("loading"), grpc.StatusCode.UNAVAILABLE),
        (DrainingError("draining"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (EngineDeadError("dead"), grpc.StatusCode.INTERNAL),
        (EngineError("forward pass failed"), grpc.StatusCode.INTERNAL),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, Exception) else x.name,
)
def test_error_table_maps_each_engine_error(error: EngineError, code: grpc.StatusCode) -> None:
    assert status_code_for(error) is code


def test_error_table_covers_every_engine_error_type() -> None:
    assert set(STATUS_CODE_BY_ERROR) == {cls for cls in _subclasses(EngineError)} | {EngineError}


def _subclasses(cls: type[EngineError]) -> set[type[EngineError]]:
    found = {sub for sub in cls.__subclasses__() if sub.__module__ == "gpt2_service.errors"}
    return found | {s for sub in found for s in _subclasses(sub)}
