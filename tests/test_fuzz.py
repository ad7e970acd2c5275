"""Property-based fuzzing of every RPC's request fields, and of raw bytes, against a real
``gpt2-serve``: whatever a caller sends, the answer is OK or a precise refusal (INVALID_ARGUMENT
with ErrorInfo, or RESOURCE_EXHAUSTED), never UNKNOWN or INTERNAL, and an error always fits
gRPC's default 8 KiB trailer budget. The server stays up throughout.

``make test`` runs a few examples per RPC; ``make fuzz`` runs thousands
(``GPT2_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from gpt2_client.proto import common_pb2, introspection_pb2
from gpt2_client.proto import generation_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.process_helpers import ServeProcess, serve_process

EXAMPLES = int(os.environ.get("GPT2_FUZZ_EXAMPLES", "15"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
TRAILER_BUDGET = 8 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with serve_process("--max-new-tokens-limit", "16", "--default-max-new-tokens", "4") as served:
        yield served
        assert served.process.poll() is None, "the server died under fuzzing"
        served.stop()


# ---- strategies -----------------------------------------------------------------------------------

uint32 = st.integers(0, 2**32 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
token_id = st.one_of(st.integers(0, 50300), uint32)
small_count = st.integers(0, 40)
any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)
text = st.text(max_size=60)
ids = st.lists(token_id, max_size=40)


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParams:
    params = pb.SamplingParams()
    for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty"):
        if draw(st.booleans()):
            setattr(params, name, draw(st.one_of(any_float, st.floats(0, 2, width=32))))
    if draw(st.booleans()):
        params.top_k = draw(int32)
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**64 - 1))
    return params


@st.composite
def stopping(draw: st.DrawFn) -> pb.StoppingCriteria:
    criteria = pb.StoppingCriteria(
        min_new_tokens=draw(st.one_of(st.integers(0, 20), int32)),
        stop=draw(st.lists(text, max_size=draw(st.sampled_from([3, 40])))),
        stop_token_ids=draw(st.lists(token_id, max_size=draw(st.sampled_from([3, 100])))),
        ignore_eos=draw(st.booleans()),
        include_stop_in_output=draw(st.booleans()),
    )
    if draw(st.booleans()):
        criteria.max_new_tokens = draw(st.one_of(st.integers(0, 8), int32))
    return criteria


@st.composite
def generate_request(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), st.text(max_size=140))),
        sampling=draw(sampling()),
        stopping=draw(stopping()),
        truncation=draw(st.integers(0, 5)),  # type: ignore[arg-type]  # open enums: unknown values too
        overflow=draw(st.integers(0, 5)),  # type: ignore[arg-type]
        top_logprobs=draw(st.one_of(st.integers(0, 21), int32)),
    )
    if draw(st.booleans()):
        request.prompt = draw(text)
    else:
        request.prompt_token_ids.ids.extend(draw(ids))
    return request


def _input(draw: st.DrawFn, message: Any) -> Any:
    choice = draw(st.sampled_from(["text", "ids", "none"]))
    if choice == "text":
        message.text = draw(text)
    elif choice == "ids":
        message.token_ids.CopyFrom(common_pb2.TokenIds(ids=draw(ids)))
    return message


@st.composite
def introspection_request(draw: st.DrawFn) -> tuple[str, Any]:
    rpc = draw(
        st.sampled_from(["Tokenize", "Detokenize", "Embed", "Attention", "HiddenStates", "PredictNext", "Trace"])
    )
    message = getattr(introspection_pb2, f"{rpc}Request")()
    if rpc == "Detokenize":
        message.token_ids.ids.extend(draw(ids))
        return rpc, message
    _input(draw, message)
    if rpc in ("Embed", "Attention", "HiddenStates"):
        message.dtype = draw(st.integers(0, 5))
    if rpc == "Attention":
        message.layers.extend(draw(st.lists(st.one_of(st.integers(0, 4), uint32), max_size=8)))
        message.heads.extend(draw(st.lists(st.one_of(st.integers(0, 4), uint32), max_size=8)))
        message.include_scores = draw(st.booleans())
    if rpc == "HiddenStates":
        message.layers.extend(draw(st.lists(st.one_of(st.integers(0, 4), uint32), max_size=8)))
        message.last_token_only = draw(st.booleans())
        message.include_vectors = draw(st.booleans())
    if rpc in ("PredictNext", "Trace"):
        for name in ("temperature", "top_p", "min_p", "typical_p"):
            if draw(st.booleans()):
                setattr(message, name, draw(any_float))
        for name, values in (
            ("top_k", int32),
            ("seed", st.integers(0, 2**64 - 1)),
            ("num_samples", st.one_of(st.integers(0, 4), uint32)),
            ("num_candidates", st.one_of(st.integers(0, 30), uint32)),
        ):
            if draw(st.booleans()):
                setattr(message, name, draw(values))
    return rpc, message


# ---- checks -------------------------------------------------------------------------------------


def check_outcome(call: Any) -> None:
    """The call's answer is OK or a precise, bounded refusal."""
    try:
        response = call()
        if hasattr(response, "__iter__") and not isinstance(response, bytes):
            for _ in response:
                pass
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        assert code in ACCEPTABLE, f"{code}: {error.details()}"  # type: ignore[attr-defined]
        trailers = error.trailing_metadata() or ()  # type: ignore[attr-defined]
        assert sum(len(k) + len(v) for k, v in trailers) + len(error.details() or "") < TRAILER_BUDGET  # type: ignore[attr-defined]
        details = [value for key, value in trailers if key == "grpc-status-details-bin"]
        assert details, "no google.rpc.Status in the trailers"
        info = error_details_pb2.ErrorInfo()
        assert any(d.Unpack(info) for d in status_pb2.Status.FromString(details[0]).details if d.Is(info.DESCRIPTOR))
        assert info.reason and info.metadata["request_id"]


def _method(server: ServeProcess, service: str, rpc: str, streaming: bool = False) -> Any:
    assert server.channel is not None
    make = server.channel.unary_stream if streaming else server.channel.unary_unary
    return make(f"/gpt2.v1.{service}/{rpc}", request_serializer=None, response_deserializer=None)


@FUZZ
@given(request=generate_request(), streaming=st.booleans())
def test_fuzzed_generate_requests_get_ok_or_a_precise_refusal(
    server: ServeProcess, request: pb.GenerateRequest, streaming: bool
) -> None:
    method = _method(server, "TextGeneration", "GenerateStream" if streaming else "Generate", streaming)
    check_outcome(lambda: method(request.SerializeToString(), timeout=30))


@FUZZ
@given(requests=st.lists(generate_request(), max_size=5))
def test_fuzzed_batches_get_ok_or_a_precise_refusal(server: ServeProcess, requests: list[pb.GenerateRequest]) -> None:
    method = _method(server, "TextGeneration", "GenerateBatch")
    check_outcome(lambda: method(pb.GenerateBatchRequest(requests=requests).SerializeToString(), timeout=30))


@FUZZ
@given(rpc_and_request=introspection_request())
def test_fuzzed_introspection_requests_get_ok_or_a_precise_refusal(
    server: ServeProcess, rpc_and_request: tuple[str, Any]
) -> None:
    rpc, request = rpc_and_request
    check_outcome(lambda: _method(server, "Introspection", rpc)(request.SerializeToString(), timeout=30))


RPCS = [
    ("TextGeneration", "Generate", False),
    ("TextGeneration", "GenerateStream", True),
    ("TextGeneration", "GenerateBatch", False),
    ("TextGeneration", "GetModelInfo", False),
    *(("Introspection", rpc, False) for rpc in ("Tokenize", "Detokenize", "Embed", "Attention", "PredictNext")),
]


@FUZZ
@given(data=st.binary(max_size=200), target=st.sampled_from(RPCS))
def test_raw_bytes_get_ok_or_a_precise_refusal(
    server: ServeProcess, data: bytes, target: tuple[str, str, bool]
) -> None:
    service, rpc, streaming = target
    check_outcome(lambda: _method(server, service, rpc, streaming)(data, timeout=30))
