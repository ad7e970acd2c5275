"""The client's exceptions: one class per status code a caller may want to handle.

::

    GPT2Error                   every failed call; .code, .message, .reason, .request_id
    ├── InvalidArgumentError    INVALID_ARGUMENT: fix the request; .violations names the fields
    ├── OverloadedError         RESOURCE_EXHAUSTED: the server's queue is full; retry later
    ├── UnavailableError        UNAVAILABLE: not reachable, still loading, or draining; retry
    ├── DeadlineExceededError   DEADLINE_EXCEEDED: the timeout passed
    ├── CancelledError          CANCELLED: the call was cancelled
    ├── UnauthenticatedError    UNAUTHENTICATED: missing or wrong credentials
    └── InternalError           INTERNAL: a fault in the server (its log has the request id)

Other codes raise ``GPT2Error`` itself, and so does an answer whose metadata gRPC refused as too
large (RESOURCE_EXHAUSTED from the transport, not the server: reason ``METADATA_TOO_LARGE``, not
an ``OverloadedError``, since retrying would not help). The details come from the google.rpc.Status the server
puts in the ``grpc-status-details-bin`` trailer (ErrorInfo for the reason, BadRequest for the
fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]  # no py.typed

STATUS_DETAILS_KEY = "grpc-status-details-bin"
METADATA_TOO_LARGE = "METADATA_TOO_LARGE"  # the reason of an answer whose metadata gRPC refused
_METADATA_LIMIT = "metadata"  # in gRPC's own message then, e.g. "metadata size exceeds hard limit"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: its path in the request (``sampling.top_p``, ``requests[2].stopping.stop``)
    and why it is bad."""

    field: str
    description: str


class GPT2Error(Exception):
    """A failed call. ``code`` is the gRPC status code; ``reason`` the server's stable reason
    (e.g. ``QUEUE_FULL``, ``PROMPT_TOO_LONG``), empty when the server gave none."""

    code: ClassVar[grpc.StatusCode | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        request_id: str | None = None,
        violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]  # an instance may be more precise than its class
        self.reason = reason
        self.request_id = request_id
        self.violations = violations

    def __str__(self) -> str:
        name = self.code.name if self.code is not None else "ERROR"
        return f"{name}: {self.message}"


class InvalidArgumentError(GPT2Error):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OverloadedError(GPT2Error):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(GPT2Error):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(GPT2Error):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(GPT2Error):
    code = grpc.StatusCode.CANCELLED


class UnauthenticatedError(GPT2Error):
    code = grpc.StatusCode.UNAUTHENTICATED


class InternalError(GPT2Error):
    code = grpc.StatusCode.INTERNAL


ERROR_BY_CODE: dict[grpc.StatusCode, type[GPT2Error]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        OverloadedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        UnauthenticatedError,
        InternalError,
    )
    if cls.code is not None
}


def _rich_status(error: Any) -> Any:
    """The google.rpc.Status in the call's trailers, or None."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def error_from_rpc(error: grpc.RpcError) -> GPT2Error:
    """The typed exception of a failed call (``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    call: Any = error  # both kinds carry code(), details() and trailing_metadata()
    code: grpc.StatusCode = call.code()
    message: str = call.details() or code.name
    reason, request_id = "", None
    violations: list[FieldViolation] = []
    status = _rich_status(call)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, request_id = info.reason, info.metadata.get("request_id")
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    cls = ERROR_BY_CODE.get(code, GPT2Error)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and status is None and _METADATA_LIMIT in message.lower():
        # gRPC itself refused the answer's metadata (over this channel's size limit): not a full
        # queue, and retrying would get the same answer. The server bounds its error details,
        # so this means a server that does not, or a very low grpc.max_metadata_size here.
        cls, reason = GPT2Error, METADATA_TOO_LARGE
    return cls(message, code=code, reason=reason, request_id=request_id, violations=tuple(violations))
