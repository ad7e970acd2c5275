"""``Client``: the synchronous client of gpt2.v1.TextGeneration (and the server's health).

Contract: every method returns frozen dataclasses (gpt2_client.results) and raises only
``GPT2Error`` subclasses (gpt2_client.errors) for failed calls; ``ValueError``/``TypeError``
for arguments it can reject before sending. A client is thread-safe; close it (or use it as a
context manager) to release its channel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from types import TracebackType
from typing import Literal, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpt2_client.channel import DEFAULT_TARGET, ChannelConfig, ConnectionOptions
from gpt2_client.errors import error_from_rpc
from gpt2_client.inspect import Inspect
from gpt2_client.params import (
    BatchItem,
    GenerationParams,
    Prompt,
    ScoreItem,
    ScoreParams,
    build_batch,
    build_request,
    build_score_batch,
    build_score_request,
)
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import generation_pb2_grpc
from gpt2_client.results import (
    Generation,
    HealthStatus,
    ModelInfo,
    ScoreResult,
    StreamChunk,
    chunk_from_proto,
    generation_from_proto,
    health_status_from_proto,
    model_info_from_proto,
    score_result_from_proto,
)


class Client:
    """Talk to one gpt2-serve deployment.

    ``target``: ``host:port``, any gRPC target, or a list of ``ip:port`` addresses. A
    ``dns:///`` target (``dns:///gpt2.<namespace>.svc.cluster.local:50051`` for a headless
    Service) or a list is balanced ``round_robin`` per call; ``load_balancing`` names another
    gRPC policy. ``timeout``: default deadline of every call in seconds (None = no deadline);
    each method's ``timeout=`` overrides it.

    TLS: ``tls=True`` (system roots) or ``tls_ca=`` (the CA to trust); mutual TLS adds
    ``tls_cert=`` and ``tls_key=`` (the client's certificate chain and key). Each is PEM
    ``bytes`` or the path of a PEM file. ``token``: sent as ``authorization: Bearer <token>`` on
    every call (as call credentials over TLS; as plain metadata on a plaintext channel).
    Where OpenTelemetry's API is installed, every call also carries the caller's trace context
    (W3C ``traceparent``), so that the server's spans join the caller's trace.

    Unary calls that fail with UNAVAILABLE are retried, on the next server of a balanced
    target, up to ``max_attempts`` attempts in all (1 = no retries); streams are not retried.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        self.config = ChannelConfig.connect(target, **connection)
        self.timeout = timeout
        self._channel = self.config.open()
        self._stub = generation_pb2_grpc.TextGenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # -- calls ---------------------------------------------------------------------------------

    def generate(
        self, prompt: Prompt = "", *, timeout: float | None = None, **params: Unpack[GenerationParams]
    ) -> Generation:
        """Generate one completion of ``prompt`` (text or token ids; "" = from <|endoftext|>), or
        ``n`` of them (the prompt read once; choice i sampled with seed + i): ``choices`` holds
        every completion (always at least one), the top-level fields describe choice 0.
        ``echo=True`` also returns the prompt's tokens but the first, with their log-probabilities
        and ranks, in ``prompt_tokens``."""
        request = build_request(prompt, params)
        try:
            response = self._stub.Generate(request, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return generation_from_proto(response)

    def stream(
        self, prompt: Prompt = "", *, timeout: float | None = None, **params: Unpack[GenerationParams]
    ) -> Iterator[StreamChunk]:
        """Stream one completion: chunks of text as they are generated; the last one has
        ``finish_reason``. Leaving the loop early cancels the generation on the server. With
        ``n`` > 1 the chunks of the choices interleave, each tagged with its ``choice_index``, and
        each choice has its own last chunk; with ``echo=True`` choice 0's first chunk carries the
        prompt's scored tokens (``prompt_tokens``)."""
        request = build_request(prompt, params)
        return _iterate(self._stub.GenerateStream(request, timeout=self._timeout(timeout)))

    def generate_batch(
        self,
        prompts: Sequence[Prompt | BatchItem],
        *,
        timeout: float | None = None,
        **params: Unpack[GenerationParams],
    ) -> list[Generation]:
        """Generate one completion per item, in order. An item is a prompt (it takes ``params``)
        or a ``BatchItem`` dict with ``prompt`` and its own parameters (they override ``params``).
        ``n`` and ``echo`` apply per item, as in ``generate``."""
        request = build_batch(prompts, params)
        try:
            response = self._stub.GenerateBatch(request, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return [generation_from_proto(r) for r in response.responses]

    def score(
        self,
        text: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        context: str | None = None,
        context_token_ids: Sequence[int] | None = None,
        add_bos: bool = False,
        top_logprobs: int = 0,
        priority: Literal["interactive", "default", "batch"] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ScoreResult:
        """The log-probability the model gives each token of ``text`` (or ``token_ids``: exactly
        one of them), after ``context`` (or ``context_token_ids``), which is read but not scored.
        Without a context or ``add_bos`` (<|endoftext|> first) the first token is not scored."""
        request = build_score_request(
            {
                "text": text, "token_ids": token_ids, "context": context, "context_token_ids": context_token_ids,
                "add_bos": add_bos, "top_logprobs": top_logprobs, "priority": priority, "request_id": request_id,
            }
        )  # fmt: skip
        try:
            response = self._stub.Score(request, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return score_result_from_proto(response)

    def score_batch(
        self,
        items: Sequence[Prompt | ScoreItem],
        *,
        timeout: float | None = None,
        **params: Unpack[ScoreParams],
    ) -> list[ScoreResult]:
        """Score each item, in order. An item is a text or token ids (it takes ``params``) or a
        ``ScoreItem`` dict with ``text`` or ``token_ids`` and its own parameters (they override
        ``params``). One bad item fails the whole call."""
        request = build_score_batch(items, params)
        try:
            response = self._stub.ScoreBatch(request, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return [score_result_from_proto(r) for r in response.responses]

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        try:
            return model_info_from_proto(
                self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout))
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    @cached_property
    def inspect(self) -> Inspect:
        """The Introspection calls (gpt2_client.inspect): tokens, embeddings, attention, hidden states, ..."""
        return Inspect(self._channel, self._timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The server's health ("" = overall; or e.g. "gpt2.v1.TextGeneration")."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._health.Check(request, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
            if error.code is grpc.StatusCode.NOT_FOUND:
                return HealthStatus.SERVICE_UNKNOWN
            raise error from None
        return health_status_from_proto(response.status)


def _iterate(call: grpc.CallIterator[pb.GenerateStreamResponse]) -> Iterator[StreamChunk]:
    try:
        for response in call:
            yield chunk_from_proto(response)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None
    finally:
        call.cancel()  # type: ignore[no-untyped-call]  # no-op when done; aborts if the caller left early
