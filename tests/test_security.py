"""Security on the gRPC port: TLS and mutual TLS with the test certificates (tests/data/tls),
bearer tokens checked before any engine work (and counted), health and reflection open for
probes, the request-size limit, a plaintext health-only port, flag combinations that refuse to
start, and the client CLI's --tls-ca / --token."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpt2_client import AsyncClient, Client, UnauthenticatedError, UnavailableError
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import generation_pb2_grpc
from gpt2_service.api.server import GenerationServer
from gpt2_service.config import ServerConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.main import main
from gpt2_service.metrics import Metrics
from gpt2_service.model.weights import LoadedModel
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.api_helpers import API_ENGINE_CONFIG, API_SERVER_CONFIG, VENV_BIN, greedy, rich_error, serve

TLS = Path(__file__).parent / "data" / "tls"
TOKENS = ("first-token-0123456789", "second-token-abcdef")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def tls_config(**changes: Any) -> ServerConfig:
    return dataclasses.replace(
        API_SERVER_CONFIG, tls_cert=str(TLS / "server.pem"), tls_key=str(TLS / "server.key"), **changes
    )


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKENS[0]}\n\n  {TOKENS[1]}  \n")  # blank lines and surrounding spaces are ignored
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- TLS and mutual TLS ---------------------------------------------------------------------


async def test_tls_handshake_with_the_test_ca(tiny: LoadedModel) -> None:
    async with (
        serve(tiny, server_config=tls_config()) as served,
        AsyncClient(served.target, tls_ca=TLS / "ca.pem", timeout=30) as client,
    ):
        result = await client.generate("The cat", max_new_tokens=2, ignore_eos=True)
    assert result.usage.completion_tokens == 2


async def test_a_plaintext_client_cannot_call_the_tls_port(tiny: LoadedModel) -> None:
    async with (
        serve(tiny, server_config=tls_config()) as served,
        AsyncClient(served.target, timeout=10, max_attempts=1) as plaintext,
    ):
        with pytest.raises(UnavailableError):
            await plaintext.generate("Hi", max_new_tokens=1)


async def test_mutual_tls_refuses_a_client_without_a_certificate(tiny: LoadedModel) -> None:
    async with serve(tiny, server_config=tls_config(tls_client_ca=str(TLS / "ca.pem"))) as served:
        async with AsyncClient(
            served.target, tls_ca=TLS / "ca.pem", tls_cert=TLS / "client.pem", tls_key=TLS / "client.key", timeout=30
        ) as client:
            assert (await client.generate("Hi", max_new_tokens=1)).usage.completion_tokens == 1
        async with AsyncClient(served.target, tls_ca=TLS / "ca.pem", timeout=10, max_attempts=1) as anonymous:
            with pytest.raises(UnavailableError):
                await anonymous.generate("Hi", max_new_tokens=1)


# ---- bearer tokens --------------------------------------------------------------------------

BAD_CREDENTIALS = {
    "none": (),
    "wrong-token": (("authorization", "Bearer not-the-token"),),
    "token-prefix": (("authorization", f"Bearer {TOKENS[0][:-1]}"),),
    "no-scheme": (("authorization", TOKENS[0]),),
    "basic-scheme": (("authorization", f"Basic {TOKENS[0]}"),),
    "two-headers": (("authorization", f"Bearer {TOKENS[0]}"), ("authorization", "Bearer x")),
}


@pytest.fixture
def engine_spy(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every engine submission and every tokenization (of ``tiny``) during the test."""
    calls: list[str] = []
    real_submit, real_encode = Engine.submit, tiny.tokenizer.encode

    async def submit(self: Engine, request: Any, **kwargs: Any) -> Any:
        calls.append("submit")
        return await real_submit(self, request, **kwargs)

    def encode(text: str) -> list[int]:
        calls.append("encode")
        return real_encode(text)

    monkeypatch.setattr(Engine, "submit", submit)
    monkeypatch.setattr(tiny.tokenizer, "encode", encode)
    return calls


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
async def test_a_call_without_an_accepted_token_is_unauthenticated_before_any_work(
    tiny: LoadedModel, token_file: str, engine_spy: list[str], credentials: str
) -> None:
    metadata = BAD_CREDENTIALS[credentials]
    config = dataclasses.replace(API_SERVER_CONFIG, auth_token_file=token_file)
    async with serve(tiny, server_config=config) as served, served.channel() as channel:
        stub = generation_pb2_grpc.TextGenerationStub(channel)
        steps = served.engine.stats.num_steps
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "Generate": lambda: stub.Generate(greedy(), metadata=metadata),
            "GenerateBatch": lambda: stub.GenerateBatch(
                pb.GenerateBatchRequest(requests=[greedy()]), metadata=metadata
            ),
            "GetModelInfo": lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata),
            "GenerateStream": lambda: stub.GenerateStream(greedy(), metadata=metadata).read(),
        }
        for rpc, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            error = rich_error(refused.value)
            assert (error.code, error.reason, error.domain) == (
                grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "gpt2.v1"
            ), rpc  # fmt: skip
            assert "bearer token" in error.message and TOKENS[0] not in error.message
        assert served.engine.stats.num_steps == steps
        assert served.engine.num_in_flight == 0
    assert engine_spy == [], "an unauthenticated call reached the engine or the tokenizer"


async def test_every_accepted_token_works_with_both_clients_and_streams(tiny: LoadedModel, token_file: str) -> None:
    config = dataclasses.replace(API_SERVER_CONFIG, auth_token_file=token_file)
    async with serve(tiny, server_config=config) as served:
        async with AsyncClient(served.target, token=TOKENS[0], timeout=30) as client:
            assert (await client.generate("Hi", max_new_tokens=2, ignore_eos=True)).usage.completion_tokens == 2
            chunks = [chunk async for chunk in client.stream("Hi", max_new_tokens=2, ignore_eos=True)]
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
        with Client(served.target, token=TOKENS[1], timeout=30) as sync_client:
            info = await asyncio.to_thread(sync_client.model_info)
            chunks = await asyncio.to_thread(lambda: list(sync_client.stream("Hi", max_new_tokens=1)))
        assert info.name == "random:tiny" and chunks
        async with AsyncClient(served.target, token="wrong", timeout=30) as wrong:
            with pytest.raises(UnauthenticatedError) as refused:
                await wrong.generate("Hi", max_new_tokens=1)
        assert refused.value.reason == "UNAUTHENTICATED"


async def test_token_over_tls_goes_as_call_credentials(tiny: LoadedModel, token_file: str) -> None:
    async with serve(tiny, server_config=tls_config(auth_token_file=token_file)) as served:
        async with AsyncClient(served.target, tls_ca=TLS / "ca.pem", token=TOKENS[1], timeout=30) as client:
            assert (await client.generate("Hi", max_new_tokens=1)).usage.completion_tokens == 1
        async with AsyncClient(served.target, tls_ca=TLS / "ca.pem", timeout=30) as anonymous:
            with pytest.raises(UnauthenticatedError):
                await anonymous.generate("Hi", max_new_tokens=1)


async def test_health_and_reflection_answer_without_a_token(tiny: LoadedModel, token_file: str) -> None:
    config = dataclasses.replace(API_SERVER_CONFIG, auth_token_file=token_file)
    async with serve(tiny, server_config=config) as served, served.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(service="gpt2.v1.TextGeneration"))).status == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
    assert "gpt2.v1.TextGeneration" in {s.name for s in responses[0].list_services_response.service}


async def test_rejections_are_counted_in_the_metrics(tiny: LoadedModel, token_file: str) -> None:
    metrics = Metrics()
    server = GenerationServer(dataclasses.replace(API_SERVER_CONFIG, auth_token_file=token_file), metrics=metrics)
    port = await server.start()
    engine = Engine(tiny, API_ENGINE_CONFIG)
    await engine.start()
    try:
        await server.attach(engine)
        async with AsyncClient(f"127.0.0.1:{port}", token="wrong", timeout=30) as client:
            with pytest.raises(UnauthenticatedError):
                await client.generate("Hi", max_new_tokens=1)
    finally:
        await server.stop()
        await engine.shutdown()
    text = metrics.exposition().decode()
    assert 'gpt2_requests_rejected_total{reason="unauthenticated"} 1.0' in text
    assert 'gpt2_requests_total{code="UNAUTHENTICATED",rpc="Generate"} 1.0' in text


async def test_a_request_over_the_message_size_limit_is_refused_before_any_work(
    tiny: LoadedModel, engine_spy: list[str]
) -> None:
    config = dataclasses.replace(API_SERVER_CONFIG, max_message_bytes=1024)
    async with serve(tiny, server_config=config) as served, served.channel() as channel:
        stub = generation_pb2_grpc.TextGenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(greedy("x" * 2000))
        assert (await stub.Generate(greedy("small", max_new_tokens=1))).token_ids
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert engine_spy == ["submit", "encode"], "only the small request reached the engine"


# ---- the plaintext health port --------------------------------------------------------------


async def test_health_port_serves_only_health_in_plaintext_with_the_same_statuses(tiny: LoadedModel) -> None:
    config = tls_config(tls_client_ca=str(TLS / "ca.pem"), health_port=free_port())
    async with (
        serve(tiny, server_config=config, attach=False) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{config.health_port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="gpt2.v1.TextGeneration")
        assert (await health.Check(check)).status == NOT_SERVING
        await served.server.attach(served.engine)
        assert (await health.Check(check)).status == SERVING
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as only_health:
            await generation_pb2_grpc.TextGenerationStub(channel).Generate(greedy())
        assert only_health.value.code() == grpc.StatusCode.UNIMPLEMENTED
        watch = health.Watch(check)
        assert (await watch.read()).status == SERVING
        await served.server.drain(grace_period=1.0)
        assert (await watch.read()).status == NOT_SERVING


# ---- flags that cannot work -----------------------------------------------------------------


CERT, KEY, CA = str(TLS / "server.pem"), str(TLS / "server.key"), str(TLS / "ca.pem")
# Flags and what the error line must say; EMPTY, SPACED and MISSING stand for files the test makes.
BAD_FLAGS = {
    "key-without-cert": (["--tls-key", KEY], "--tls-key needs --tls-cert"),
    "cert-without-key": (["--tls-cert", CERT], "--tls-cert needs --tls-key"),
    "client-ca-without-cert": (["--tls-client-ca", CA], "--tls-client-ca (mutual TLS) needs --tls-cert"),
    "unreadable-cert": (["--tls-cert", "MISSING", "--tls-key", KEY], "--tls-cert MISSING: cannot read it"),
    "key-is-not-pem": (["--tls-cert", CERT, "--tls-key", "EMPTY"], "--tls-key EMPTY: not PEM"),
    "cert-is-a-key": (["--tls-cert", KEY, "--tls-key", KEY], "--tls-cert"),
    "unreadable-client-ca": (["--tls-cert", CERT, "--tls-key", KEY, "--tls-client-ca", "MISSING"], "cannot read"),
    "unreadable-token-file": (["--auth-token-file", "MISSING"], "--auth-token-file MISSING: cannot read it"),
    "empty-token-file": (["--auth-token-file", "EMPTY"], "no token in it"),
    "token-with-space": (["--auth-token-file", "SPACED"], "line 1 is not a token"),
    "bad-tenant-name": (["--auth-token-file", "BADTENANT"], "line 2: the tenant name must be"),
    "health-port-is-the-port": (["--port", "50051", "--health-port", "50051"], "must differ from --port"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_security_flags_exit_2_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    for name in [n for n in os.environ if n.startswith("GPT2_SERVE_")]:
        monkeypatch.delenv(name)
    (tmp_path / "EMPTY").write_text("\n\n")
    (tmp_path / "SPACED").write_text("three spaced words\n")  # a token, and at most its tenant's name
    (tmp_path / "BADTENANT").write_text("token-a team-a\ntoken-b team/b\n")
    files = {name: str(tmp_path / name) for name in ("EMPTY", "SPACED", "BADTENANT", "MISSING")}
    flags, expected = BAD_FLAGS[case]
    flags = [files.get(flag, flag) for flag in flags]
    for name, path in files.items():
        expected = expected.replace(name, path)
    with pytest.raises(SystemExit) as exited:
        main(["--model", "random:tiny", *flags])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-serve: error: ") and expected in err and err.count("\n") == 1, err


# ---- the command line client ----------------------------------------------------------------


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "gpt2-client"), *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_takes_the_ca_and_the_token(tiny: LoadedModel, token_file: str) -> None:
    async with serve(tiny, server_config=tls_config(auth_token_file=token_file)) as served:
        status, out, err = await _cli(
            "--tls-ca", str(TLS / "ca.pem"), "--target", served.target, "--json", "info",
            env={"GPT2_CLIENT_TOKEN": TOKENS[0]},
        )  # fmt: skip
        assert status == 0, err
        status, _, err = await _cli(
            "info", "--target", served.target, "--tls-ca", str(TLS / "ca.pem"), "--token", "wrong", env={}
        )
    assert '"name": "random:tiny"' in out
    assert status == 1 and "UNAUTHENTICATED" in err


# ---- client certificates for client authentication -----------------------------------------------


async def test_require_client_eku_refuses_a_server_certificate_from_the_same_ca(tiny: LoadedModel) -> None:
    config = tls_config(tls_client_ca=str(TLS / "ca.pem"), tls_require_client_eku=True)
    metrics = Metrics()
    async with serve(tiny, server_config=config, metrics=metrics) as served:
        async with AsyncClient(
            served.target, tls_ca=TLS / "ca.pem", tls_cert=TLS / "client.pem", tls_key=TLS / "client.key", timeout=30
        ) as client:
            assert (await client.generate("Hi", max_new_tokens=1)).usage.completion_tokens == 1
        async with AsyncClient(
            served.target,
            tls_ca=TLS / "ca.pem",
            tls_cert=TLS / "server.pem",  # signed by the CA, but not for client authentication
            tls_key=TLS / "server.key",
            timeout=30,
            max_attempts=1,
        ) as impostor:
            with pytest.raises(UnauthenticatedError) as caught:
                await impostor.generate("Hi", max_new_tokens=1)
    assert caught.value.reason == "CLIENT_CERTIFICATE_NOT_FOR_CLIENT_AUTH"
    assert 'gpt2_requests_rejected_total{reason="unauthenticated"} 1.0' in metrics.exposition().decode()


async def test_without_require_client_eku_any_certificate_of_the_ca_is_accepted(tiny: LoadedModel) -> None:
    """The default keeps earlier behaviour (documented): the CA alone decides."""
    async with (
        serve(tiny, server_config=tls_config(tls_client_ca=str(TLS / "ca.pem"))) as served,
        AsyncClient(
            served.target, tls_ca=TLS / "ca.pem", tls_cert=TLS / "server.pem", tls_key=TLS / "server.key", timeout=30
        ) as client,
    ):
        assert (await client.generate("Hi", max_new_tokens=1)).usage.completion_tokens == 1


def test_require_client_eku_needs_mutual_tls(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--tls-cert", str(TLS / "server.pem"), "--tls-key", str(TLS / "server.key"), "--tls-require-client-eku"])
    assert caught.value.code == 2
    assert "--tls-require-client-eku needs --tls-client-ca" in capsys.readouterr().err
