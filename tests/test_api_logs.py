"""Operator logs: a real ``gpt2-serve --log-format json`` writes only JSON lines; each finished RPC
gets exactly one access line with its request id, RPC, final code, token counts, finish reason
and timings (each GenerateBatch request a line of its own too); prompts stay out of the log
unless ``--log-prompts``; the start-up lines name the model, its source, random weights, the
KV-cache budget, the limits and the ports."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from gpt2_client.proto import common_pb2, generation_pb2_grpc
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.api.logs import JsonFormatter, TextFormatter, log_fields
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_SERVER_CONFIG, LogRecords, greedy, serve, stub_for
from tests.process_helpers import poll, serve_process

SECRET = "The secret prompt"
ACCESS_FIELDS = {
    "request_id",
    "rpc",
    "code",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "queue_ms",
    "ttft_ms",
    "total_ms",
}
Entry = dict[str, Any]


def _access(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e["logger"] == "gpt2_service.api.access" and e["message"] == "request finished"]


def _one(entries: list[Entry], **match: object) -> Entry:
    [entry] = [e for e in entries if all(e.get(k) == v for k, v in match.items())]
    return entry


@pytest.fixture(scope="module")
def served_log() -> Iterator[list[Entry]]:
    """The log of a server that served: Generate, GenerateStream, an invalid Generate, a batch of
    two, and a stream cancelled after its first message (5 RPCs); every line parsed as JSON."""
    with serve_process("--log-format", "json") as server:
        assert server.channel is not None
        stub = generation_pb2_grpc.TextGenerationStub(server.channel)
        stub.Generate(greedy(SECRET, max_new_tokens=5, request_id="log-unary"), timeout=30)
        list(stub.GenerateStream(greedy(SECRET, max_new_tokens=3, request_id="log-stream"), timeout=30))
        with pytest.raises(grpc.RpcError):
            stub.Generate(greedy(SECRET, request_id="log-invalid", top_logprobs=1000), timeout=30)
        batch = [greedy(SECRET, max_new_tokens=2, request_id=f"log-item-{i}") for i in range(2)]
        stub.GenerateBatch(pb.GenerateBatchRequest(requests=batch), timeout=30)
        cancelled = stub.GenerateStream(greedy(SECRET, max_new_tokens=500, request_id="log-cancelled"))
        next(cancelled)
        cancelled.cancel()
        poll(lambda: any('"log-cancelled"' in line and "CANCELLED" in line for line in server.lines))
        assert server.stop() == 0, server.log()
    entries: list[Entry] = []
    for line in server.lines:
        entry = json.loads(line)  # every line, or it fails here
        assert isinstance(entry, dict), line
        entries.append(entry)
    yield entries


def test_every_line_is_json_with_the_base_keys(served_log: list[Entry]) -> None:
    assert served_log
    for entry in served_log:
        assert {"time", "level", "logger", "request_id", "message"} <= entry.keys(), entry


def test_one_access_line_per_rpc_with_every_field(served_log: list[Entry]) -> None:
    access = _access(served_log)
    assert sorted((e["request_id"], e["rpc"], e["code"]) for e in access if e["rpc"] != "GenerateBatch") == [
        ("log-cancelled", "GenerateStream", "CANCELLED"),
        ("log-invalid", "Generate", "INVALID_ARGUMENT"),
        ("log-stream", "GenerateStream", "OK"),
        ("log-unary", "Generate", "OK"),
    ]
    assert [e["code"] for e in access if e["rpc"] == "GenerateBatch"] == ["OK"]
    for entry in access:
        assert entry.keys() >= ACCESS_FIELDS, entry


def test_a_finished_request_logs_tokens_finish_reason_and_timings(served_log: list[Entry]) -> None:
    unary = _one(_access(served_log), request_id="log-unary")
    assert (unary["completion_tokens"], unary["finish_reason"], unary["error"], unary["level"]) == (
        5, "length", None, "INFO",
    )  # fmt: skip
    assert 0 <= unary["queue_ms"] <= unary["ttft_ms"] <= unary["total_ms"]
    stream = _one(_access(served_log), request_id="log-stream")
    assert (stream["completion_tokens"], stream["finish_reason"]) == (3, "length")
    assert unary["prompt_tokens"] == stream["prompt_tokens"] == 3  # "The", " secret", " prompt"


def test_a_refused_request_logs_its_code_reason_and_error(served_log: list[Entry]) -> None:
    invalid = _one(_access(served_log), request_id="log-invalid")
    assert (invalid["rejected"], invalid["finish_reason"], invalid["completion_tokens"]) == ("invalid", None, None)
    assert "top_logprobs" in invalid["error"]
    assert invalid["total_ms"] >= 0


def test_a_cancelled_stream_logs_the_tokens_it_got(served_log: list[Entry]) -> None:
    cancelled = _one(_access(served_log), request_id="log-cancelled")
    assert cancelled["completion_tokens"] >= 1
    assert cancelled["finish_reason"] is None
    assert cancelled["error"] == "cancelled by the client"


def test_each_batch_request_gets_a_line_with_the_batch_id(served_log: list[Entry]) -> None:
    batch = _one(_access(served_log), rpc="GenerateBatch")
    items = [e for e in served_log if e["message"] == "batch item finished"]
    assert sorted(e["request_id"] for e in items) == ["log-item-0", "log-item-1"]
    for item in items:
        assert (item["batch_id"], item["code"], item["completion_tokens"], item["finish_reason"]) == (
            batch["request_id"], "OK", 2, "length",
        )  # fmt: skip
        assert item.keys() >= ACCESS_FIELDS
    assert (batch["num_requests"], batch["completion_tokens"]) == (2, 4)


def test_prompts_stay_out_of_the_log_by_default(served_log: list[Entry]) -> None:
    assert not any(SECRET in json.dumps(entry) for entry in served_log)
    assert not any("prompt" in entry for entry in served_log)


def test_start_up_lines_name_the_model_budget_limits_and_ports(served_log: list[Entry]) -> None:
    model = _one(served_log, message="model loaded")
    keys = ("model", "source", "random_weights", "dtype", "weights", "device", "batch_invariant")
    assert {k: model[k] for k in keys} == {
        "model": "random:tiny",
        "source": "random (seed 0)",
        "random_weights": True,
        "dtype": "float32",
        "weights": "float32",
        "device": "cpu",
        "batch_invariant": True,
    }
    assert model["engine_threads"] >= 1
    limits = _one(served_log, message="KV-cache budget and limits")
    assert limits["kv_cache_slots"] > 0 and limits["kv_cache_bytes"] > 0
    for key in ("max_batch_size", "max_queue_size", "max_prefill_tokens", "max_new_tokens_limit", "max_batch_requests"):
        assert limits[key] > 0, key
    messages = [e["message"] for e in served_log]
    assert any(m.startswith("listening on 127.0.0.1:") for m in messages)
    assert any(m.startswith("metrics on http://127.0.0.1:") for m in messages)


# -- --log-prompts, in process ---------------------------------------------------------------------


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Iterator[LogRecords]:
    """The access lines logged in process, as they are logged."""
    caplog.set_level(logging.INFO, logger="gpt2_service.api.access")
    records = LogRecords()
    logger = logging.getLogger("gpt2_service.api.access")
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)


async def _access_entries(access_log: LogRecords, count: int) -> list[Entry]:
    """The access lines, once ``count`` are logged (each is logged when its call has ended)."""
    return [json.loads(JsonFormatter().format(r)) for r in await access_log.wait_for_count(count)]


async def test_log_prompts_puts_each_prompt_in_its_line(tiny: LoadedModel, access_log: LogRecords) -> None:
    config = dataclasses.replace(API_SERVER_CONFIG, log_prompts=True)
    async with serve(tiny, server_config=config) as served, stub_for(served) as stub:
        await stub.Generate(greedy(SECRET, max_new_tokens=2, request_id="text"))
        ids = greedy(max_new_tokens=2, request_id="ids")
        ids.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=[464, 3797]))
        await stub.Generate(ids)
        await stub.GenerateBatch(pb.GenerateBatchRequest(requests=[greedy("batched", 2, request_id="item")]))
        entries = await _access_entries(access_log, 4)
    prompts = {e["request_id"]: e.get("prompt") for e in entries}
    assert (prompts["text"], prompts["ids"], prompts["item"]) == (SECRET, [464, 3797], "batched")


async def test_without_log_prompts_no_line_has_a_prompt(tiny: LoadedModel, access_log: LogRecords) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        await stub.Generate(greedy(SECRET, max_new_tokens=2, request_id="text"))
        [entry] = await _access_entries(access_log, 1)
    assert "prompt" not in entry and SECRET not in json.dumps(entry)


# -- the two formats -------------------------------------------------------------------------------


def _formatted(formatter: logging.Formatter, fields: dict[str, object]) -> str:
    """How ``formatter`` writes what ``log_fields`` logs."""
    captured: list[logging.LogRecord] = []

    def capture(record: logging.LogRecord) -> bool:
        captured.append(record)
        return False  # emit nothing

    logger = logging.getLogger("test_api_logs.format")
    logger.setLevel(logging.INFO)
    logger.addFilter(capture)
    try:
        log_fields(logger, logging.INFO, "request finished", fields, request_id="r-1")
    finally:
        logger.removeFilter(capture)
    return formatter.format(captured[0])


def test_text_lines_append_known_fields_as_key_value_pairs() -> None:
    line = _formatted(TextFormatter(), {"rpc": "Generate", "code": "OK", "finish_reason": None, "error": "a b"})
    assert line.endswith('[r-1] request finished rpc=Generate code=OK error="a b"')


def test_json_lines_carry_every_field_including_unknown_ones() -> None:
    entry = json.loads(_formatted(JsonFormatter(), {"rpc": "Generate", "finish_reason": None, "message": "x"}))
    assert (entry["request_id"], entry["rpc"], entry["finish_reason"]) == ("r-1", "Generate", None)
    assert entry["message"] == "request finished"  # a field never hides a base key


@pytest.mark.parametrize("hostile", ["a\nFORGED INFO x", "\x1b[2J\x1b[31mred", "x\u2028y", "\x9b31m", "tab\there"])
def test_text_lines_escape_control_characters_wherever_they_are(hostile: str) -> None:
    line = _formatted(TextFormatter(), {"rpc": hostile, "error": hostile})
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line and "\x9b" not in line
    assert "\t" not in line


def test_json_lines_escape_control_characters() -> None:
    line = _formatted(JsonFormatter(), {"error": "a\nFORGED\x1b[31m"})
    assert "\n" not in line and "\x1b" not in line
    assert json.loads(line)["error"] == "a\nFORGED\x1b[31m"
