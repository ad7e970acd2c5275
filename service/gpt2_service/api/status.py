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
    DeadlineExceededError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    FieldViolation,
    InvalidRequestError,
)

ERROR_DOMAIN = "gpt2.v1"

# The one mapping from engine error to status code; subclasses map like their nearest listed base.
STATUS_CODE_BY_ERROR: Mapping[type[EngineError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    EngineOverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
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


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    request_id: str,
    violations: list[FieldViolation] | None = None,
) -> grpc.Status:
    """A grpc.Status whose trailer carries google.rpc.Status with ErrorInfo (+ BadRequest)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata={"request_id": request_id})
    details = [_pack(info)]
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in violations
            ]
        )
        details.append(_pack(bad_request))
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def status_for_error(error: EngineError, request_id: str) -> grpc.Status:
    """The status a call that failed with ``error`` ends with."""
    code = status_code_for(error)
    if code is grpc.StatusCode.INTERNAL:
        return internal_status(request_id)
    violations = error.violations if isinstance(error, InvalidRequestError) else None
    return rich_status(code, str(error), error.reason, request_id, violations)


def internal_status(request_id: str) -> grpc.Status:
    message = f"internal error while serving request {request_id}; the server log has the details"
    return rich_status(grpc.StatusCode.INTERNAL, message, "INTERNAL", request_id)
