"""The error model of the API: one table from engine error type to gRPC status code, and the
google.rpc rich status (ErrorInfo + BadRequest) each failed call carries.

INTERNAL is kept for real faults; its message names the request id and nothing else (the
traceback goes to the server log, never to the caller).
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]  # no py.typed
from grpc_status import rpc_status

from gpt2_service.errors import (
    MAX_FIELD_CHARS,
    MAX_MESSAGE_CHARS,
    DeadlineExceededError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    StreamStalledError,
    clip,
)

ERROR_DOMAIN = "gpt2.v1"
MALFORMED_REQUEST = "MALFORMED_REQUEST"  # the reason of a request message that could not be decoded
OMITTED_FIELD = "..."  # the BadRequest entry that counts the violations not listed

# The one mapping from engine error to status code; subclasses map like their nearest listed base.
STATUS_CODE_BY_ERROR: Mapping[type[EngineError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    EngineOverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StreamStalledError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineUnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    EngineDeadError: grpc.StatusCode.INTERNAL,
    EngineError: grpc.StatusCode.INTERNAL,
}


class NotReadyError(EngineUnavailableError):
    """The model is still loading (or the engine has not started)."""

    reason = "NOT_READY"


class DrainingError(EngineUnavailableError):
    """The server is shutting down and takes no new requests."""

    reason = "DRAINING"


def status_code_for(error: EngineError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = STATUS_CODE_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _pack(
    message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    request_id: str,
    invalid: InvalidRequestError | None = None,
    retry_after: float | None = None,
) -> grpc.Status:
    """A grpc.Status whose trailer carries google.rpc.Status with ErrorInfo, a RetryInfo when
    ``retry_after`` (seconds) is set, and a BadRequest for ``invalid``'s violations (already
    bounded: at most ``MAX_REPORTED_VIOLATIONS``, each clipped), closed by an entry with field
    ``OMITTED_FIELD`` that counts the others. With the message clipped, the trailers fit gRPC's
    default 8 KiB metadata budget."""
    metadata = {"request_id": clip(request_id, MAX_FIELD_CHARS)}
    details = []
    if invalid is not None and invalid.violations:
        entries = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in invalid.violations
        ]
        if invalid.num_omitted:
            entries.append(
                error_details_pb2.BadRequest.FieldViolation(
                    field=OMITTED_FIELD, description=f"and {invalid.num_omitted} more violations, not listed"
                )
            )
        metadata["num_violations"] = str(len(invalid.violations) + invalid.num_omitted)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=entries)))
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(max(int(retry_after * 1e9), 0))
        details.append(_pack(retry))
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    details.insert(0, _pack(info))
    status = status_pb2.Status(code=code.value[0], message=clip(message, MAX_MESSAGE_CHARS), details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def status_for_error(error: EngineError, request_id: str) -> grpc.Status:
    """The status a call that failed with ``error`` ends with."""
    code = status_code_for(error)
    if code is grpc.StatusCode.INTERNAL:
        return internal_status(request_id)
    invalid = error if isinstance(error, InvalidRequestError) else None
    retry_after = error.retry_after if isinstance(error, EngineOverloadedError) else None
    return rich_status(code, str(error), error.reason, request_id, invalid, retry_after)


def internal_status(request_id: str) -> grpc.Status:
    message = f"internal error while serving request {request_id}; the server log has the details"
    return rich_status(grpc.StatusCode.INTERNAL, message, "INTERNAL", request_id)
