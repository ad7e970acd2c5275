"""Who may call the server: TLS and mutual-TLS credentials for the gRPC port, and bearer-token
authentication as a grpc.aio server interceptor.

Authentication only, not authorization: every accepted token may call every RPC. Health and
reflection stay open (kubelet probes and generic tools carry no token). Files are read once, at
start; a bad combination of flags or an unreadable file raises ``SecurityConfigError``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gpt2_service.api.accounting import current_call
from gpt2_service.api.handlers import guarded
from gpt2_service.api.logs import new_request_id
from gpt2_service.api.status import rich_status

log = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
BEARER_SCHEME = "bearer"  # RFC 7235: the scheme is case-insensitive
UNAUTHENTICATED_REASON = "UNAUTHENTICATED"
# Methods that answer without a token: probes and generic tools (grpcurl describe) carry none.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

Metadata = Sequence[tuple[str, str | bytes]]

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]  # generic only in grpc-stubs
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class SecurityConfigError(ValueError):
    """A bad combination of security flags, or a file that cannot be used; the server refuses
    to start (``gpt2-serve`` exits 2 with this message)."""


def _digest(token: bytes) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of token lengths too.
    return hashlib.sha256(token).digest()


@dataclass(frozen=True)
class ServerSecurity:
    """The security material of one server, read from the files the flags name."""

    certificate_chain: bytes | None = None  # PEM; None = plaintext gRPC port
    private_key: bytes | None = None  # PEM, with certificate_chain
    client_ca: bytes | None = None  # PEM; set = mutual TLS: client certificates required and verified
    token_digests: tuple[bytes, ...] = ()  # SHA-256 of each accepted bearer token; () = no token auth
    tenants: tuple[str, ...] = ()  # the tenant of each token, in the same order

    @property
    def tls(self) -> bool:
        return self.certificate_chain is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for the gRPC port, or None for plaintext."""
        if self.certificate_chain is None or self.private_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is one of the accepted tokens."""
        return self.tenant_of(token) is not None

    def tenant_of(self, token: str) -> str | None:
        """The tenant of ``token``, or None if it is not accepted; compared in constant time
        with every accepted token (no early exit on the first match)."""
        candidate = _digest(token.encode())
        tenant = None
        for digest, name in zip(self.token_digests, self.tenants, strict=True):
            if hmac.compare_digest(candidate, digest):
                tenant = name
        return tenant


def _read(path: str, flag: str, marker: bytes) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"--{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    if marker not in data:
        raise SecurityConfigError(f"--{flag} {path}: not PEM ({marker.decode()} not found)")
    return data


def read_tokens(path: str) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """The SHA-256 digests of the tokens in ``path`` and their tenants: one token per non-blank
    line, optionally followed by its tenant's name (``TENANT_NAME``; default ``token-<n>`` for
    the n-th token), whitespace around them ignored. Several tokens may share a tenant."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SecurityConfigError(f"--auth-token-file {path}: cannot read it ({reason})") from None
    tokens: list[str] = []
    tenants: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        token = words[0]
        if len(words) > 2 or not token.isascii() or not token.isprintable():
            raise SecurityConfigError(
                f"--auth-token-file {path}: line {number} is not a token (printable ASCII, no spaces) "
                "and an optional tenant name"
            )
        if len(words) == 2 and not TENANT_NAME.fullmatch(words[1]):
            raise SecurityConfigError(
                f"--auth-token-file {path}: line {number}: the tenant name must be 1 to 64 of A-Z a-z 0-9 . _ -"
            )
        tokens.append(token)
        tenants.append(words[1] if len(words) == 2 else f"token-{len(tokens)}")
    if not tokens:
        raise SecurityConfigError(f"--auth-token-file {path}: no token in it (one token per line)")
    return tuple(_digest(token.encode()) for token in tokens), tuple(tenants)


def load_security(
    tls_cert: str = "", tls_key: str = "", tls_client_ca: str = "", auth_token_file: str = ""
) -> ServerSecurity:
    """Check the flags' combination and read their files (empty string = flag unset)."""
    if bool(tls_cert) != bool(tls_key):
        missing, given = ("--tls-key", "--tls-cert") if tls_cert else ("--tls-cert", "--tls-key")
        raise SecurityConfigError(f"{given} needs {missing} too (TLS takes a certificate and its private key)")
    if tls_client_ca and not tls_cert:
        raise SecurityConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    digests, tenants = read_tokens(auth_token_file) if auth_token_file else ((), ())
    return ServerSecurity(
        certificate_chain=_read(tls_cert, "tls-cert", b"-----BEGIN CERTIFICATE-----") if tls_cert else None,
        private_key=_read(tls_key, "tls-key", b"PRIVATE KEY-----") if tls_key else None,
        client_ca=_read(tls_client_ca, "tls-client-ca", b"-----BEGIN CERTIFICATE-----") if tls_client_ca else None,
        token_digests=digests,
        tenants=tenants,
    )


def bearer_token(metadata: Metadata | None) -> str | None:
    """The token of the call's one ``authorization: Bearer <token>`` header; None if the call
    has no such header, several, or another scheme."""
    values = [value for key, value in metadata or () if key == AUTHORIZATION_KEY]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != BEARER_SCHEME or not token.strip():
        return None
    return token.strip()


def _rejecting_handler(
    handler: grpc.RpcMethodHandler[Any, Any], status: grpc.Status
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` that ends the call with ``status``. It has no
    request deserializer: an unauthenticated caller's payload is not even parsed."""

    async def reject(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(status.code, status.details, status.trailing_metadata)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


CLIENT_CERTIFICATE_REASON = "CLIENT_CERTIFICATE_NOT_FOR_CLIENT_AUTH"


@functools.lru_cache(maxsize=256)
def is_client_certificate(pem: bytes) -> bool:
    """Whether the PEM certificate may authenticate a TLS client: its extended key usage is
    present and names clientAuth (RFC 5280 4.2.1.12). A server's certificate signed by the same CA
    usually names only serverAuth, or has no such extension."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage


class ClientCertificateInterceptor(_ServerInterceptor):
    """Under mutual TLS, refuses calls whose client certificate (verified against the CA by
    gRPC) lacks the clientAuth extended key usage: UNAUTHENTICATED, reason
    ``CLIENT_CERTIFICATE_NOT_FOR_CLIENT_AUTH``. Health and reflection pass, as with tokens."""

    def __init__(self, on_reject: Callable[[], None] | None = None) -> None:
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        return guarded(handler, self._check)

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        certificates = list(context.auth_context().get("x509_pem_cert") or ())
        if certificates and is_client_certificate(bytes(certificates[0])):
            return
        if self._on_reject is not None:
            self._on_reject()
        message = "the client certificate is not for client authentication (its extended key usage lacks clientAuth)"
        status = rich_status(grpc.StatusCode.UNAUTHENTICATED, message, CLIENT_CERTIFICATE_REASON, new_request_id())
        await context.abort(status.code, status.details, status.trailing_metadata)


class BearerTokenInterceptor(_ServerInterceptor):
    """Ends every call that lacks an accepted bearer token with UNAUTHENTICATED (ErrorInfo
    reason ``UNAUTHENTICATED``, domain ``gpt2.v1``) before its handler runs: no queueing, no
    tokenization, no engine work. Health and reflection pass without a token.

    Put it last among the server's interceptors (innermost), so the others (metrics) still see
    the rejected calls and their status. ``on_reject`` is called once per rejected call.
    """

    def __init__(self, security: ServerSecurity, on_reject: Callable[[], None] | None = None) -> None:
        if not security.token_digests:
            raise ValueError("BearerTokenInterceptor needs at least one accepted token")
        self._security = security
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        tenant = self._security.tenant_of(token) if token is not None else None
        if tenant is not None:
            current_call().tenant = tenant  # the RPC's task: the handler sees it
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)  # only looks the method up; runs nothing
        if handler is None:  # an unknown method: UNIMPLEMENTED, as for anyone (stubs say never None)
            return handler
        why = "missing bearer token" if token is None else "invalid bearer token"
        request_id = new_request_id()
        # The access line (api/access_log.py) logs the outcome; this says which check failed.
        log.debug("%s: UNAUTHENTICATED (%s)", method, why, extra={"request_id": request_id})
        if self._on_reject is not None:
            self._on_reject()
        message = f"{why}: send the metadata 'authorization: Bearer <token>' with an accepted token"
        return _rejecting_handler(
            handler, rich_status(grpc.StatusCode.UNAUTHENTICATED, message, UNAUTHENTICATED_REASON, request_id)
        )
