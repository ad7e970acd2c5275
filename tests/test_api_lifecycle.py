"""gpt2-serve as a process: health NOT_SERVING -> SERVING -> NOT_SERVING on SIGTERM, in-flight
streams finish, new RPCs are refused, and the process exits 0. Also its flags and log format."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import sys

import grpc
import pytest
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import generation_pb2_grpc
from gpt2_service.api.logs import JsonFormatter, RequestIdFilter, request_id_var
from gpt2_service.config import EngineConfig, ServerConfig, build_parser, config_from_args
from gpt2_service.main import serve
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.api_helpers import greedy, rich_error

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LISTENING = re.compile(r"listening on [\d.]+:(\d+)")


async def _start_server(*flags: str) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """gpt2-serve in a subprocess; returns it, its port, and (growing) list of its log lines."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpt2_service", "--model", "random:tiny", "--host", "127.0.0.1",
        "--port", "0", "--metrics-port", "0", "--context-window", "128", *flags,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    lines: list[str] = []
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def read_log() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            match = LISTENING.search(line)
            if match and not port.done():
                port.set_result(int(match.group(1)))
        if not port.done():
            port.set_exception(AssertionError("gpt2-serve exited before listening:\n" + "\n".join(lines)))

    process._log_reader = asyncio.create_task(read_log())  # type: ignore[attr-defined]  # keep a reference
    return process, await asyncio.wait_for(port, timeout=60), lines


async def test_sigterm_drains_in_flight_streams_and_exits_zero() -> None:
    process, port, lines = await _start_server("--grace-period", "30")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = generation_pb2_grpc.TextGenerationStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="gpt2.v1.TextGeneration"))
            seen = [(await watch.read()).status]
            while seen[-1] != SERVING:
                seen.append((await asyncio.wait_for(watch.read(), timeout=60)).status)
            assert seen[0] == NOT_SERVING, "health must be NOT_SERVING while the model loads"
            assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == SERVING

            stream = stub.GenerateStream(greedy(max_new_tokens=150))
            first = await stream.read()
            assert first is not grpc.aio.EOF
            process.send_signal(signal.SIGTERM)
            assert (await asyncio.wait_for(watch.read(), timeout=10)).status == NOT_SERVING
            assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(greedy())
            assert (refused.value.code(), rich_error(refused.value).reason) == (grpc.StatusCode.UNAVAILABLE, "DRAINING")

            rest = []
            while (message := await stream.read()) is not grpc.aio.EOF:
                rest.append(message)
            assert rest[-1].finish_reason == pb.LENGTH
            assert len(first.tokens) + sum(len(m.tokens) for m in rest) == 150
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0, "\n".join(lines)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert any("SIGTERM received: draining" in line for line in lines)


async def test_unloadable_model_without_fallback_ends_serve_with_status_1(caplog: pytest.LogCaptureFixture) -> None:
    engine_config = EngineConfig(model="/nonexistent/checkpoint", random_fallback=False)
    server_config = ServerConfig(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0)
    with caplog.at_level(logging.ERROR):
        assert await asyncio.wait_for(serve(engine_config, server_config), timeout=30) == 1
    assert any("cannot load model" in r.getMessage() for r in caplog.records)


def test_flags_come_from_the_config_dataclasses_with_env_twins() -> None:
    environ = {"GPT2_SERVE_MAX_BATCH_SIZE": "4", "GPT2_SERVE_RANDOM_FALLBACK": "false", "GPT2_SERVE_PORT": "6000"}
    args = build_parser(environ).parse_args(["--port", "7000", "--log-format", "json", "--no-reflection"])
    engine, server = config_from_args(EngineConfig, args), config_from_args(ServerConfig, args)
    assert engine == EngineConfig(max_batch_size=4, random_fallback=False)
    assert server == ServerConfig(port=7000, log_format="json", reflection=False)  # a flag beats its env twin


def test_help_shows_every_flag_with_its_env_twin_and_default() -> None:
    text = build_parser({}).format_help()
    for flag, default in [("--port", "50051"), ("--max-batch-size", "32"), ("--max-queue-size", "256"),
                          ("--max-new-tokens-limit", "2048"), ("--grace-period", "30.0"),
                          ("--max-message-bytes", "16777216"), ("--log-format", "text"), ("--log-level", "info"),
                          ("--model", "random:gpt2"), ("--host", "0.0.0.0")]:  # fmt: skip
        env = "GPT2_SERVE_" + flag[2:].upper().replace("-", "_")
        assert re.search(rf"{flag} .*?\[env\s+{env}\]\s+\(default:\s+{re.escape(default)}\)", text, re.S), flag
    assert "--no-random-fallback" in text


def test_bad_env_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser({"GPT2_SERVE_PORT": "http"})
    assert caught.value.code == 2
    assert "GPT2_SERVE_PORT" in capsys.readouterr().err


def test_json_log_lines_carry_the_request_id() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test_api_lifecycle.json")
    logger.addHandler(handler)
    token = request_id_var.set("req-123")
    try:
        logger.warning("hello %s", "world")
    finally:
        request_id_var.reset(token)
        logger.removeHandler(handler)
    entry = json.loads(out.getvalue())
    assert (entry["request_id"], entry["message"], entry["level"]) == ("req-123", "hello world", "WARNING")
