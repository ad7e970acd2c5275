"""How a client reaches the servers: target, TLS credentials, bearer token, load balancing,
retries and channel options.

A target is one address (``host:port``, or any gRPC target such as ``dns:///gpt2.svc:50051``)
or a list of ``ip:port`` addresses, which becomes an ``ipv4:``/``ipv6:`` target. ``dns:///``
targets and address lists are balanced ``round_robin`` per call over every address (in
Kubernetes: a headless Service); a plain ``host:port`` keeps gRPC's default (``pick_first``).

Unary calls that fail with UNAVAILABLE (the server is unreachable, still loading, or draining;
in each case before any work) are retried on the next address, up to ``max_attempts`` in all.
Streams are not retried: the retry policy names the unary methods only. A stream that has
delivered tokens cannot be replayed, and one refused at its start (e.g. by a draining server)
raises ``UnavailableError`` so the caller decides.

Every call carries the caller's OpenTelemetry trace context (W3C ``traceparent``/``tracestate``,
or whatever the global propagator writes) when OpenTelemetry's API is installed, so that a server
continuing the trace puts its spans under the caller's span. OpenTelemetry is optional: without
it, or without an active span, calls go out as before.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import grpc
import grpc.aio

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

ChannelOption = tuple[str, str | int]


def _split_address(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), port


def multi_address_target(addresses: Sequence[str]) -> str:
    """``["10.0.0.1:50051", "10.0.0.2:50051"]`` -> ``"ipv4:10.0.0.1:50051,10.0.0.2:50051"``.

    gRPC's static address schemes take IP literals of one family; names go through ``dns:///``.
    """
    if not addresses:
        raise ValueError("no addresses given")
    versions: set[int] = set()
    parts: list[str] = []
    for address in addresses:
        host, port = _split_address(address)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{address!r}: a list of addresses takes IP literals (ip:port or [ipv6]:port); "
                f"for a host name use one target such as 'dns:///{address}'"
            ) from None
        versions.add(ip.version)
        parts.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(versions) > 1:
        raise ValueError("a list of addresses must be all IPv4 or all IPv6")
    scheme = "ipv6" if versions == {6} else "ipv4"
    return f"{scheme}:{','.join(parts)}"


TEXT_GENERATION = "gpt2.v1.TextGeneration"
INTROSPECTION = "gpt2.v1.Introspection"
# Unary methods: safe to retry on UNAVAILABLE, which the server answers before any work (and a
# generation has no side effects to repeat). A server-streaming method is never in this list.
RETRIED_METHODS: tuple[dict[str, str], ...] = (
    {"service": TEXT_GENERATION, "method": "Generate"},
    {"service": TEXT_GENERATION, "method": "GenerateBatch"},
    {"service": TEXT_GENERATION, "method": "GetModelInfo"},
    {"service": TEXT_GENERATION, "method": "Score"},
    {"service": TEXT_GENERATION, "method": "ScoreBatch"},
    *(
        {"service": INTROSPECTION, "method": method}
        for method in ("Tokenize", "Detokenize", "Embed", "Attention", "HiddenStates", "PredictNext", "Trace")
    ),  # its unary methods (not the TraceGeneration stream)
)
HEALTH_CHECK_SERVICE = ""  # the whole server, in grpc.health.v1 terms
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS_LIMIT = 5  # gRPC caps retryPolicy.maxAttempts at 5

PemSource = bytes | str | os.PathLike[str]


def read_pem(source: PemSource | None) -> bytes | None:
    """PEM data as bytes: ``bytes`` are the PEM itself, a ``str`` or path names a file."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def _check_token(token: str | None) -> None:
    if token is None:
        return
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("token must be non-empty printable ASCII without spaces")


class ConnectionOptions(TypedDict, total=False):
    """How ``Client`` and ``AsyncClient`` reach the servers (keyword arguments of both); each
    option is described on ``ChannelConfig``. PEM options take bytes or the path of a file."""

    tls: bool
    tls_ca: PemSource | None
    tls_cert: PemSource | None
    tls_key: PemSource | None
    token: str | None
    server_name_override: str | None
    load_balancing: str | None
    max_attempts: int
    max_message_bytes: int
    options: Sequence[ChannelOption]


@dataclass(frozen=True)
class ChannelConfig:
    """Everything needed to open a channel, sync or asyncio."""

    target: str | Sequence[str] = DEFAULT_TARGET
    tls: bool = False  # implied by tls_ca / tls_cert; alone it trusts the system's roots
    tls_ca: bytes | None = None  # PEM root certificates to trust; None = the system's trust store
    tls_cert: bytes | None = None  # PEM client certificate chain (mutual TLS), with tls_key
    tls_key: bytes | None = None  # PEM client private key (mutual TLS), with tls_cert
    token: str | None = None  # sent as 'authorization: Bearer <token>' on every call
    server_name_override: str | None = None  # check the server certificate against this name
    load_balancing: str | None = None  # "round_robin", "pick_first"; None = by target (module doc)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # of a unary call that fails with UNAVAILABLE; 1 = no retry
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    options: tuple[ChannelOption, ...] = ()  # further raw gRPC channel arguments

    @classmethod
    def connect(cls, target: str | Sequence[str], **options: Unpack[ConnectionOptions]) -> ChannelConfig:
        """The config of a client's keyword arguments: PEM sources read, sequences made tuples."""
        fields: dict[str, Any] = dict(options)
        for name in ("tls_ca", "tls_cert", "tls_key"):
            fields[name] = read_pem(fields.get(name))
        fields["options"] = tuple(fields.get("options", ()))
        return cls(target=target if isinstance(target, str) else tuple(target), **fields)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("mutual TLS takes both tls_cert and tls_key")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts must be 1-{MAX_ATTEMPTS_LIMIT}, got {self.max_attempts}")
        _check_token(self.token)

    @property
    def grpc_target(self) -> str:
        return self.target if isinstance(self.target, str) else multi_address_target(self.target)

    @property
    def secure(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    @property
    def lb_policy(self) -> str | None:
        if self.load_balancing is not None:
            return self.load_balancing
        if not isinstance(self.target, str) or self.target.startswith(("dns:", "ipv4:", "ipv6:")):
            return "round_robin"
        return None

    def service_config(self) -> dict[str, Any]:
        """The gRPC service config: load-balancing policy and the unary calls' retry policy."""
        config: dict[str, Any] = {}
        if self.lb_policy is not None:
            config["loadBalancingConfig"] = [{self.lb_policy: {}}]
        if self.lb_policy == "round_robin":
            # Client-side health checking (gRFC A17): each subchannel watches the server's health
            # and round_robin picks only SERVING ones, so a replica that starts draining (or is
            # still loading) gets no new calls while its running streams go on.
            config["healthCheckConfig"] = {"serviceName": HEALTH_CHECK_SERVICE}
        if self.max_attempts > 1:
            retry_policy = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
            config["methodConfig"] = [{"name": list(RETRIED_METHODS), "retryPolicy": retry_policy}]
        return config

    def channel_options(self) -> list[ChannelOption]:
        options: list[ChannelOption] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 1),
        ]
        own_service_config = any(key == "grpc.service_config" for key, _ in self.options)
        if not own_service_config:  # a service config in `options` replaces this one
            options.append(("grpc.service_config", json.dumps(self.service_config())))
        if self.server_name_override is not None:
            options.append(("grpc.ssl_target_name_override", self.server_name_override))
        return options + list(self.options)

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials; with a token, composed with call credentials that send it (gRPC sends
        call credentials only over a secure channel)."""
        tls = grpc.ssl_channel_credentials(self.tls_ca, self.tls_key, self.tls_cert)
        if self.token is None:
            return tls
        return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(self.token))

    def _call_headers(self) -> tuple[tuple[str, str], ...]:
        """Metadata added to every call by an interceptor: the token on a plaintext channel (over
        TLS it goes as call credentials)."""
        return () if self.secure or self.token is None else (_authorization(self.token),)

    def open(self) -> grpc.Channel:
        if self.secure:
            channel = grpc.secure_channel(self.grpc_target, self.credentials(), options=self.channel_options())
        else:
            channel = grpc.insecure_channel(self.grpc_target, options=self.channel_options())
        headers, trace = self._call_headers(), _tracing_available()
        if not headers and not trace:
            return channel
        return grpc.intercept_channel(channel, _CallMetadata(headers, trace))

    def open_aio(self) -> grpc.aio.Channel:
        headers, trace = self._call_headers(), _tracing_available()
        interceptors = _aio_interceptors(headers, trace) if headers or trace else None
        if self.secure:
            return grpc.aio.secure_channel(
                self.grpc_target, self.credentials(), options=self.channel_options(), interceptors=interceptors
            )
        return grpc.aio.insecure_channel(self.grpc_target, options=self.channel_options(), interceptors=interceptors)


# -- metadata on every call ------------------------------------------------------------------------
# gRPC refuses call credentials on an insecure channel, so there the token goes in as metadata
# added to every call by an interceptor (handy on loopback and in tests; in production use TLS).
# The same interceptor adds the caller's trace context, on every channel, when OpenTelemetry's
# API is installed.


def _authorization(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


@functools.cache
def _tracing_available() -> bool:
    """Whether OpenTelemetry's API is installed (found, not imported: the client does not need it)."""
    try:
        return importlib.util.find_spec("opentelemetry.propagate") is not None
    except (ImportError, ValueError):
        return False


def _trace_context(metadata: Any) -> tuple[tuple[str, str], ...]:
    """The current OpenTelemetry context as metadata, by the global propagator (W3C
    ``traceparent``/``tracestate`` by default); none without an active span (or baggage), and
    none whose key the call's metadata already has (e.g. from OpenTelemetry's gRPC
    instrumentation, whose client span is then the parent)."""
    if "opentelemetry.context" not in sys.modules:
        return ()  # nothing in this process uses OpenTelemetry yet, so there is no span to pass on
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return ()
    present = {key for key, _ in metadata or ()}
    return tuple((key.lower(), value) for key, value in carrier.items() if key.lower() not in present)


def _headers(details: Any, headers: tuple[tuple[str, str], ...], trace: bool) -> tuple[tuple[str, str], ...]:
    return headers + _trace_context(details.metadata) if trace else headers


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, headers: tuple[tuple[str, str], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = (*(details.metadata or ()), *headers)
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class _CallMetadata(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``headers`` (``authorization: Bearer <token>``) and, with ``trace``, the caller's
    trace context to every call of a sync channel (it runs in the calling thread, in its context)."""

    def __init__(self, headers: tuple[tuple[str, str], ...], trace: bool) -> None:
        self._headers = headers
        self._trace = trace

    def _details(self, details: Any) -> Any:
        headers = _headers(details, self._headers, self._trace)
        return _CallDetails(details, headers) if headers else details

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _aio_interceptors(headers: tuple[tuple[str, str], ...], trace: bool) -> list[Any]:
    """Interceptors that add ``headers`` and, with ``trace``, the caller's trace context to every
    call of an asyncio channel (grpc.aio takes one interceptor per call kind). grpc.aio runs them
    in a task made when the call is, which copies the caller's context (and so its span)."""

    def with_headers(details: Any) -> Any:
        extra = _headers(details, headers, trace)
        if not extra:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *extra)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
        async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
            return await continuation(with_headers(details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
        async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
            return await continuation(with_headers(details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
        async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
            return await continuation(with_headers(details), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
        async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
            return await continuation(with_headers(details), requests)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
