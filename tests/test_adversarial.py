"""Hostile input never hurts anyone else: each class of bad request is refused quickly, with an
error that fits gRPC's default 8 KiB trailer budget, while a small Generate and a health Check
sent at the same time by someone else stay fast (< 0.5 s).

The server is the real entry point (``gpt2-serve`` in its own process, so the test's own CPU use
does not share its interpreter). Hostile messages are serialized before the probes start and
sent as raw bytes, so building them costs the server nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from gpt2_client import Client, GPT2Error, InvalidArgumentError
from gpt2_client.errors import METADATA_TOO_LARGE, error_from_rpc
from gpt2_client.proto import common_pb2
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import introspection_pb2 as ipb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.process_helpers import ServeProcess, poll, serve_process

PROBE_LIMIT_S = 0.5  # the bound on a bystander's latency
TRAILER_BUDGET = 8 * 1024  # grpcio's default soft limit on received metadata
GENERATION = "/gpt2.v1.TextGeneration/"
INTROSPECTION = "/gpt2.v1.Introspection/"
MAX_LISTED = 9  # MAX_REPORTED_VIOLATIONS (8) plus the "and N more" entry


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with serve_process("--max-batch-requests", "64", "--max-queue-size", "512") as served:
        yield served
        served.stop()


def _raw(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


@dataclass
class Probes:
    """A bystander calling health Check and a 4-token Generate in a loop, timing each."""

    target: str
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"health": [], "generate": []})
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            generate = _raw(channel, GENERATION + "Generate")
            small = pb.GenerateRequest(
                prompt="The cat",
                sampling=pb.SamplingParams(temperature=0),
                stopping=pb.StoppingCriteria(max_new_tokens=4),
            ).SerializeToString()
            calls: dict[str, Callable[[], object]] = {
                "health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10),
                "generate": lambda: generate(small, timeout=10),
            }
            while not self._stop.is_set():
                for name, call in calls.items():
                    started = time.monotonic()
                    try:
                        call()
                    except grpc.RpcError as exc:
                        self.errors.append(f"{name}: {exc.code()}")
                    self.latencies[name].append(time.monotonic() - started)

    def worst(self) -> dict[str, float]:
        return {name: max(values) for name, values in self.latencies.items()}


def while_probing(server: ServeProcess, hostile: Callable[[], None], repeat: int = 2) -> Probes:
    """Run ``hostile`` ``repeat`` times while a bystander probes; the probes' record."""
    probes = Probes(f"127.0.0.1:{server.port}")
    thread = threading.Thread(target=probes.run)
    thread.start()
    try:
        time.sleep(0.2)  # the bystander is running before the first hostile call (a time, not a state)
        for _ in range(repeat):
            hostile()
    finally:
        probes._stop.set()
        thread.join(timeout=30)
    assert not probes.errors, probes.errors
    assert all(probes.latencies.values()), "the bystander made no call"
    return probes


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str
    reason: str
    fields: list[str]
    trailer_bytes: int
    seconds: float


def refusal_of(call: Callable[[], object]) -> Refusal:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    seconds = time.monotonic() - started
    error = caught.value
    trailers = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    size = sum(len(key) + len(value) for key, value in trailers) + len(error.details() or "")  # type: ignore[attr-defined]
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(info.DESCRIPTOR):
                    detail.Unpack(info)
                elif detail.Is(bad.DESCRIPTOR):
                    detail.Unpack(bad)
    return Refusal(
        error.code(),  # type: ignore[attr-defined]
        error.details() or "",  # type: ignore[attr-defined]
        info.reason,
        [v.field for v in bad.field_violations],
        size,
        seconds,
    )


def _generate(**fields: object) -> bytes:
    return pb.GenerateRequest(prompt="hi", **fields).SerializeToString()  # type: ignore[arg-type]


HOSTILE: dict[str, tuple[str, bytes, str, list[str]]] = {
    # name: (method, serialized request, expected reason, expected first fields)
    "1M out-of-range stop_token_ids": (
        GENERATION + "Generate",
        _generate(stopping=pb.StoppingCriteria(stop_token_ids=[99999] * 1_000_000)),
        "INVALID_ARGUMENT",
        ["stopping.stop_token_ids"],
    ),
    "1M empty stop strings": (
        GENERATION + "GenerateStream",
        _generate(stopping=pb.StoppingCriteria(stop=[""] * 1_000_000)),
        "INVALID_ARGUMENT",
        ["stopping.stop"],
    ),
    "batch of 64 x 20k bad stop ids": (
        GENERATION + "GenerateBatch",
        pb.GenerateBatchRequest(
            requests=[pb.GenerateRequest(stopping=pb.StoppingCriteria(stop_token_ids=[99999] * 20_000))] * 64
        ).SerializeToString(),
        "INVALID_ARGUMENT",
        [f"requests[{i}].stopping.stop_token_ids" for i in range(8)] + ["..."],
    ),
    "batch of 64 with a bad top_p each": (
        GENERATION + "GenerateBatch",
        pb.GenerateBatchRequest(
            requests=[pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=2.0))] * 64
        ).SerializeToString(),
        "INVALID_ARGUMENT",
        [f"requests[{i}].sampling.top_p" for i in range(8)] + ["..."],
    ),
    "10 MB prompt under REJECT": (
        GENERATION + "Generate",
        pb.GenerateRequest(prompt="word " * 2_000_000, truncation=pb.REJECT).SerializeToString(),
        "PROMPT_TOO_LONG",
        ["prompt"],
    ),
    "Attention with layers=[5]*1M": (
        INTROSPECTION + "Attention",
        ipb.AttentionRequest(text="a b", layers=[5] * 1_000_000).SerializeToString(),
        "INVALID_ARGUMENT",
        ["layers"],
    ),
    "Embed with 10 MB of text": (
        INTROSPECTION + "Embed",
        ipb.EmbedRequest(text="bank " * 2_000_000).SerializeToString(),
        "INVALID_ARGUMENT",
        ["text"],
    ),
    "Trace with 1M ids": (
        INTROSPECTION + "Trace",
        ipb.TraceRequest(token_ids=common_pb2.TokenIds(ids=[262] * 1_000_000)).SerializeToString(),
        "INVALID_ARGUMENT",
        ["token_ids.ids"],
    ),
    "Tokenize with 10 MB of text": (
        INTROSPECTION + "Tokenize",
        ipb.TokenizeRequest(text="x" * 10_000_000).SerializeToString(),
        "RESPONSE_TOO_LARGE",
        ["text"],
    ),
    "Detokenize 1M ids of the longest token": (
        INTROSPECTION + "Detokenize",
        ipb.DetokenizeRequest(token_ids=common_pb2.TokenIds(ids=[35496] * 1_000_000)).SerializeToString(),
        "RESPONSE_TOO_LARGE",
        ["token_ids.ids"],
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_request_is_refused_fast_and_small_while_others_stay_fast(server: ServeProcess, name: str) -> None:
    method, payload, reason, fields = HOSTILE[name]
    refusals: list[Refusal] = []
    assert server.channel is not None
    call = _raw(server.channel, method)
    probes = while_probing(server, lambda: refusals.append(refusal_of(lambda: call(payload, timeout=60))))
    for refusal in refusals:
        assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT, refusal
        assert refusal.reason == reason
        assert refusal.fields == fields
        assert refusal.trailer_bytes < TRAILER_BUDGET / 2
        assert len(refusal.message) <= 256
        assert refusal.seconds < 2.0, f"rejecting took {refusal.seconds:.2f}s"
    assert max(probes.worst().values()) < PROBE_LIMIT_S, probes.worst()


def test_a_huge_valid_prompt_is_truncated_off_the_event_loop(server: ServeProcess) -> None:
    """A million prompt ids (3.8 MB) are checked and truncated off the event loop while others stay fast."""
    assert server.channel is not None
    call = _raw(server.channel, GENERATION + "Generate")
    payload = pb.GenerateRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=[262] * 1_000_000), stopping=pb.StoppingCriteria(max_new_tokens=1)
    ).SerializeToString()
    responses: list[pb.GenerateResponse] = []
    probes = while_probing(server, lambda: responses.append(pb.GenerateResponse.FromString(call(payload, timeout=60))))
    # the window (128) less room for the one new token
    assert [r.usage.truncated_prompt_tokens for r in responses] == [1_000_000 - 127] * 2
    assert max(probes.worst().values()) < PROBE_LIMIT_S, probes.worst()


def test_a_long_text_prompt_is_tokenized_off_the_event_loop(server: ServeProcess) -> None:
    assert server.channel is not None
    call = _raw(server.channel, GENERATION + "Generate")
    payload = pb.GenerateRequest(
        prompt="the cat sat on the mat " * 40_000, stopping=pb.StoppingCriteria(max_new_tokens=1)
    ).SerializeToString()
    responses: list[pb.GenerateResponse] = []
    probes = while_probing(
        server, lambda: responses.append(pb.GenerateResponse.FromString(call(payload, timeout=60))), repeat=1
    )
    assert responses[0].usage.truncated_prompt_tokens > 200_000
    assert max(probes.worst().values()) < PROBE_LIMIT_S, probes.worst()


# ---- undecodable messages -----------------------------------------------------------------------


def _nested_groups(depth: int) -> bytes:
    start, end = bytes([(99 << 3 | 3) & 0x7F | 0x80, 99 >> 4]), bytes([(99 << 3 | 4) & 0x7F | 0x80, 99 >> 4])
    return start * depth + end * depth


MALFORMED = {
    "invalid UTF-8 in prompt": b"\x12\x02\xff\xfe",  # field 2 (prompt), 2 bytes that are not UTF-8
    "truncated field": b"\x12\x10abc",  # says 16 bytes, has 3
    "bad wire type": b"\x17",  # field 2, wire type 7 (there is none)
    "nesting too deep": _nested_groups(200),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_an_undecodable_message_is_invalid_argument_counted_and_logged_without_traceback(
    server: ServeProcess, name: str
) -> None:
    assert server.channel is not None
    before = server.samples().get(("gpt2_requests_rejected_total", frozenset({("reason", "malformed")})), 0.0)
    refusal = refusal_of(lambda: _raw(server.channel, GENERATION + "Generate")(MALFORMED[name], timeout=10))  # type: ignore[union-attr]
    assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.reason == "MALFORMED_REQUEST"
    key = ("gpt2_requests_rejected_total", frozenset({("reason", "malformed")}))
    poll(lambda: server.samples()[key] >= before + 1)  # counted when the call ends, just after the answer
    assert server.samples()[key] == before + 1
    assert "Traceback" not in server.log()
    assert any("code=INVALID_ARGUMENT" in line and "rejected=malformed" in line for line in server.lines)


# ---- ids and logs -------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["abc\nFORGED INFO line", "\x1b[31mred", "a b", "é", "x" * 129])
def test_an_unsafe_request_id_is_refused_and_never_logged(server: ServeProcess, request_id: str) -> None:
    assert server.channel is not None
    payload = pb.GenerateRequest(request_id=request_id, prompt="hi").SerializeToString()
    refusal = refusal_of(lambda: _raw(server.channel, GENERATION + "Generate")(payload, timeout=10))  # type: ignore[union-attr]
    assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.fields == ["request_id"]
    assert not any(line.startswith("FORGED") or "\x1b" in line for line in server.lines)
    assert all(request_id not in line for line in server.lines)


# ---- deadlines ----------------------------------------------------------------------------------


def test_calls_whose_deadline_passes_count_as_deadline_exceeded_not_cancelled(server: ServeProcess) -> None:
    """A client whose deadline passes cancels the call a moment before the server's copy of that
    deadline runs out; every such call must still count as DEADLINE_EXCEEDED, none as CANCELLED.
    (Once the batch is full of these 500-token calls, the server refuses the later ones at once,
    RESOURCE_EXHAUSTED: their deadline cannot be met. Those are not deadlines that passed.)"""
    num_calls = 60
    assert server.channel is not None
    call = _raw(server.channel, GENERATION + "Generate")
    # ignore_eos: a sampled <|endoftext|> would end a call in time, OK, and that is not this test
    stopping = pb.StoppingCriteria(max_new_tokens=500, ignore_eos=True)
    payload = pb.GenerateRequest(prompt="Once", stopping=stopping).SerializeToString()

    def key(code: str) -> tuple[str, frozenset[tuple[str, str]]]:
        return ("gpt2_requests_total", frozenset({("rpc", "Generate"), ("code", code)}))

    before = server.samples()

    def one(i: int) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as caught:
            call(payload, timeout=0.2 + 0.01 * (i % 10))
        return caught.value.code()  # type: ignore[attr-defined,no-any-return]

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(num_calls)))
    assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    num_expired = codes.count(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert num_expired >= 8  # at least the first batch's worth ran into its deadline
    expected = before.get(key("DEADLINE_EXCEEDED"), 0) + num_expired
    poll(
        lambda: (
            server.samples().get(key("DEADLINE_EXCEEDED"), 0) + server.samples().get(key("CANCELLED"), 0) >= expected
        )
    )
    after = server.samples()
    assert after.get(key("CANCELLED"), 0) == before.get(key("CANCELLED"), 0)
    assert after[key("DEADLINE_EXCEEDED")] == expected


# ---- the project's client -----------------------------------------------------------------------


def test_the_client_raises_invalid_argument_for_a_thousand_empty_stop_strings(server: ServeProcess) -> None:
    with (
        Client(f"127.0.0.1:{server.port}", timeout=30, max_attempts=1) as client,
        pytest.raises(InvalidArgumentError) as caught,
    ):
        client.generate("hi", stop=[""] * 1000)
    assert [v.field for v in caught.value.violations] == ["stopping.stop"]


def test_the_client_maps_refused_metadata_to_a_non_retryable_error() -> None:
    class TooLarge(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return "received trailing metadata size exceeds limit"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    error = error_from_rpc(TooLarge())
    assert type(error) is GPT2Error
    assert error.reason == METADATA_TOO_LARGE
