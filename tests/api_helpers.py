"""Helpers for the gRPC tests: a real server on 127.0.0.1:0 in the test's event loop, raw stubs,
the rich error details of a failed call, and ways to await what the server does when a call ends
(its RPC counter, its access line) rather than poll for it."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import generation_pb2_grpc
from gpt2_service.api.server import GenerationServer
from gpt2_service.config import EngineConfig, ServerConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.metrics import Metrics
from gpt2_service.model.weights import LoadedModel
from grpc_status import rpc_status

from tests.engine_helpers import WAIT_S

# Small enough to be quick on two cores, large enough for 16 concurrent streams.
API_ENGINE_CONFIG = EngineConfig(
    model="random:tiny",
    max_batch_size=16,
    max_queue_size=64,
    context_window=128,
    max_prefill_tokens=128,
    max_new_tokens_limit=512,
    default_max_new_tokens=8,
    stage_timing=False,
)
API_SERVER_CONFIG = ServerConfig(host="127.0.0.1", port=0, grace_period=5.0, max_batch_requests=16)

VENV_BIN = Path(sys.executable).parent


@dataclass
class Served:
    server: GenerationServer
    engine: Engine
    target: str

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target)


@asynccontextmanager
async def serve(
    loaded: LoadedModel,
    engine_config: EngineConfig = API_ENGINE_CONFIG,
    server_config: ServerConfig = API_SERVER_CONFIG,
    attach: bool = True,
    metrics: Metrics | None = None,
    tracer_provider: object = None,
) -> AsyncIterator[Served]:
    """A started server with a started engine (attached unless ``attach=False``), counting into
    ``metrics`` and tracing with ``tracer_provider`` if given."""
    server = GenerationServer(server_config, metrics=metrics, tracer_provider=tracer_provider)
    port = await server.start()
    engine = Engine(loaded, engine_config)
    if metrics is not None:
        metrics.attach(engine)
    await engine.start()
    try:
        if attach:
            await server.attach(engine)
        yield Served(server, engine, f"127.0.0.1:{port}")
    finally:
        await server.stop()
        await engine.shutdown()


@asynccontextmanager
async def stub_for(served: Served) -> AsyncIterator[generation_pb2_grpc.TextGenerationAsyncStub]:
    async with served.channel() as channel:
        yield generation_pb2_grpc.TextGenerationStub(channel)


def greedy(prompt: str = "The cat sat on the", max_new_tokens: int = 8, **kwargs: object) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        prompt=prompt,
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
    )
    for key, value in kwargs.items():
        setattr(request, key, value)
    return request


def long_request(max_new_tokens: int = 500) -> pb.GenerateRequest:
    """A generation that runs for seconds on the tiny model (cancel it)."""
    return greedy("Once upon a time", max_new_tokens=max_new_tokens)


@dataclass(frozen=True)
class RichError:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    request_id: str
    fields: list[str]


def rich_error(error: grpc.aio.AioRpcError) -> RichError:
    """The code, ErrorInfo and BadRequest field paths of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status in the trailers of {error.code()}"
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
    return RichError(
        code=error.code(),
        message=error.details() or "",
        reason=info.reason,
        domain=info.domain,
        request_id=info.metadata.get("request_id", ""),
        fields=[v.field for v in bad.field_violations],
    )


async def wait_for_slots_free(engine: Engine, timeout: float = WAIT_S) -> None:
    """Await the engine's state in which no request holds a KV-cache slot or a stream."""
    await engine.wait_for(lambda: engine.stats.kv_cache_slots_used == 0 and engine.num_in_flight == 0, timeout)


class Awaited:
    """Something in this process that is not the engine (the server's accounting at the end of a
    call) and that tests await: ``changed()``, from any thread, wakes ``wait_for(condition)``, which
    re-checks the condition."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()

    def changed(self) -> None:
        if self._loop is not None:  # nobody waits yet: the first check will see the change
            self._loop.call_soon_threadsafe(self._changed.set)

    async def wait_for(self, condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
        self._loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while not condition():
                await self._changed.wait()
                self._changed.clear()


class CountedMetrics(Metrics):
    """Metrics whose RPC counting can be awaited (the server counts a call once it has ended)."""

    def __init__(self) -> None:
        super().__init__()
        self.rpcs = Awaited()

    def observe_rpc(self, rpc: str, code: str) -> None:
        super().observe_rpc(rpc, code)
        self.rpcs.changed()


class LogRecords(logging.Handler):
    """The records a logger emits, kept as they come; ``await wait_for_count(n)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._emitted = Awaited()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._emitted.changed()

    async def wait_for_count(self, count: int, timeout: float = WAIT_S) -> list[logging.LogRecord]:
        await self._emitted.wait_for(lambda: len(self.records) >= count, timeout)
        return list(self.records)


async def first_message(call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateStreamResponse]) -> None:
    """Wait until the stream has produced something: the request is running on the engine."""
    message = await call.read()
    assert message is not grpc.aio.EOF
