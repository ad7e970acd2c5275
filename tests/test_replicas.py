"""Per-request load balancing over real replicas: several ``gpt2-serve`` processes on loopback
behind one client with a multi-address ``round_robin`` target. Calls spread over every replica
(counted by each replica's own ``gpt2_requests_total``); a replica that gets SIGTERM under load
finishes its streams and exits 0 while no unary call fails. Also: the server's max connection
age makes a client reconnect (so it would re-resolve) without failing a running stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from gpt2_client import AsyncClient, Generation, GPT2Error
from gpt2_service.api.server import GenerationServer
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_SERVER_CONFIG, serve
from tests.process_helpers import ServeProcess

T = TypeVar("T")

NUM_REPLICAS = 3
DRAINING = re.compile(r"draining: (\d+) RPCs in flight")
SERVER_FLAGS = ("--max-batch-size", "8", "--grace-period", "30", "--no-stage-timing")


def address(server: ServeProcess) -> str:
    return f"127.0.0.1:{server.port}"


def requests_ok(server: ServeProcess, rpc: str) -> int:
    """``gpt2_requests_total{rpc=..., code="OK"}`` from the server's own /metrics."""
    return int(server.samples().get(("gpt2_requests_total", frozenset({("rpc", rpc), ("code", "OK")})), 0))


def close(server: ServeProcess) -> None:
    """SIGTERM if still running, wait for the exit, close the log pipe."""
    server.stop()
    if server.process.stderr is not None:
        server.process.stderr.close()


def start_replicas(count: int) -> list[ServeProcess]:
    """Start ``count`` servers at once (they load in parallel), then wait for each to serve."""
    servers = [ServeProcess(SERVER_FLAGS) for _ in range(count)]
    try:
        for server in servers:
            server.start()
    except BaseException:
        for server in servers:
            close(server)
        raise
    return servers


class ReplicaPool:
    """Replicas shared by the module's tests. A test that stops one leaves it dead; the next
    test that asks for more running replicas than there are gets fresh ones started."""

    def __init__(self) -> None:
        self.replicas: list[ServeProcess] = []

    def serving(self, count: int) -> list[ServeProcess]:
        for dead in [r for r in self.replicas if r.process.poll() is not None]:
            close(dead)
            self.replicas.remove(dead)
        if len(self.replicas) < count:
            self.replicas += start_replicas(count - len(self.replicas))
        return self.replicas[:count]

    def stop_all(self) -> None:
        for replica in self.replicas:  # all drain at once
            if replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            close(replica)


@pytest.fixture(scope="module")
def pool() -> Iterator[ReplicaPool]:
    replicas = ReplicaPool()
    try:
        yield replicas
    finally:
        replicas.stop_all()


@pytest.mark.slow
async def test_round_robin_spreads_unary_calls_over_every_replica(pool: ReplicaPool) -> None:
    replicas = await asyncio.to_thread(pool.serving, NUM_REPLICAS)
    num_calls = 10 * NUM_REPLICAS
    before = [requests_ok(r, "Generate") for r in replicas]
    async with AsyncClient([address(r) for r in replicas], timeout=30) as client:
        for i in range(num_calls):
            await client.generate(f"call {i}", max_new_tokens=1)

    def counts() -> list[int]:
        return [requests_ok(r, "Generate") - b for r, b in zip(replicas, before, strict=True)]

    served = await _counts_once(counts, lambda served: sum(served) >= num_calls)
    assert sum(served) == num_calls
    assert min(served) >= num_calls // (2 * NUM_REPLICAS), f"calls per replica: {served}"


class UnaryLoad:
    """Back-to-back unary calls from a few concurrent workers until stopped; every outcome is kept."""

    def __init__(self, client: AsyncClient, num_workers: int = 3) -> None:
        self.client = client
        self.results: list[Generation | GPT2Error] = []
        self._changed = asyncio.Condition()
        self._stopping = asyncio.Event()
        self.workers = [asyncio.create_task(self._work()) for _ in range(num_workers)]

    async def _work(self) -> None:
        while not self._stopping.is_set():
            result: Generation | GPT2Error
            try:
                result = await self.client.generate("load", max_new_tokens=2, ignore_eos=True)
            except GPT2Error as exc:
                result = exc
            async with self._changed:
                self.results.append(result)
                self._changed.notify_all()

    async def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` calls have ended (bounded)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.results) >= count), timeout)

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self.workers)


@pytest.mark.slow
async def test_sigterm_under_load_finishes_streams_and_no_unary_call_fails(pool: ReplicaPool) -> None:
    *others, victim = await asyncio.to_thread(pool.serving, NUM_REPLICAS)
    try:
        async with (
            AsyncClient(address(victim), timeout=60) as direct,  # pins the streams on the victim
            AsyncClient([address(victim), *map(address, others)], timeout=60) as balanced,
        ):
            stream_tokens = 120
            streams = [direct.stream(f"stream {i}", max_new_tokens=stream_tokens, ignore_eos=True) for i in range(3)]
            firsts = [await anext(stream) for stream in streams]  # running on the victim now
            load = UnaryLoad(balanced)
            await load.wait_for(2 * NUM_REPLICAS)  # the load runs on every replica before the signal
            before_others = sum(requests_ok(r, "Generate") for r in others)

            at_signal = len(load.results)
            victim.process.send_signal(signal.SIGTERM)
            rests = await asyncio.wait_for(asyncio.gather(*(_drain(s) for s in streams)), timeout=60)
            exit_code = await asyncio.wait_for(asyncio.to_thread(victim.process.wait), timeout=40)
            await load.wait_for(len(load.results) + 2 * NUM_REPLICAS)  # and goes on once the victim is gone
            await load.stop()
        # Every call made after the signal goes to the other replicas, except those already
        # running on the victim at that moment (at most one per worker).
        expected = len(load.results) - at_signal - len(load.workers)
        served_by_others = await _counts_once(
            lambda: sum(requests_ok(r, "Generate") for r in others) - before_others, lambda n: n >= expected
        )
    finally:
        close(victim)

    results = load.results
    failures = [r for r in results if isinstance(r, GPT2Error)]
    assert not failures, f"{len(failures)} of {len(results)} unary calls failed, e.g. {failures[0]}"
    for first, rest in zip(firsts, rests, strict=True):
        assert rest[-1].finish_reason is not None and rest[-1].finish_reason.name == "LENGTH"
        assert len(first.tokens) + sum(len(chunk.tokens) for chunk in rest) == stream_tokens
    assert exit_code == 0, "\n".join(victim.lines[-20:])
    in_flight = [int(m.group(1)) for line in victim.lines if (m := DRAINING.search(line)) is not None]
    assert in_flight and in_flight[0] >= len(streams), f"the streams were not running at SIGTERM: {in_flight}"
    assert served_by_others >= expected, "calls made after the signal did not all go to the other replicas"


async def _counts_once(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Scrape until ``done`` holds (a call is counted when it ends on the server, which may be
    just after its client has the answer) or ``timeout`` passes; the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(read)
        if done(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def _drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [chunk async for chunk in stream]


# ---- max connection age ---------------------------------------------------------------------


class PeerRecorder(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Records the client address (ip:port, so one per connection) of every unary call."""

    def __init__(self) -> None:
        self.peers: list[str] = []

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        async def recorded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self.peers.append(context.peer())
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(recorded, handler.request_deserializer, handler.response_serializer)


async def test_max_connection_age_moves_clients_to_a_new_connection_without_failing_streams(
    tiny: LoadedModel,
) -> None:
    age = 0.2
    config = dataclasses.replace(API_SERVER_CONFIG, max_connection_age=age, max_connection_age_grace=30.0)
    recorder = PeerRecorder()
    async with serve(tiny, server_config=config) as served:
        second = GenerationServer(config, interceptors=[recorder])
        port = await second.start()
        await second.attach(served.engine)
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=30) as client:
                await client.generate("first", max_new_tokens=1)
                # A stream that outlives the connection's age: the grace lets it finish.
                stream = client.stream("long", max_new_tokens=500, ignore_eos=True)
                chunks = [chunk async for chunk in stream]
                for _ in range(200):  # bounded: the GOAWAY comes within age * 1.1 of connecting
                    await client.generate("again", max_new_tokens=1)
                    if recorder.peers[-1] != recorder.peers[0]:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await second.stop()
    last = chunks[-1]
    assert last.usage is not None and last.usage.completion_tokens == 500
    assert last.timing is not None and last.timing.total_seconds > age * 1.1, "the stream did not outlive the age"
    assert recorder.peers[-1] != recorder.peers[0], "the client never reconnected"
