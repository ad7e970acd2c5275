"""Typed engine errors. The API layer maps each to one gRPC status code (see api/status.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

# Rejecting must cost little whatever the request holds: at most this many violations are
# reported (the rest are counted), each clipped, so an error always fits gRPC's default 8 KiB
# trailer budget (BadRequest + ErrorInfo, base64-encoded, plus grpc-message).
MAX_REPORTED_VIOLATIONS = 8
MAX_FIELD_CHARS = 120
MAX_DESCRIPTION_CHARS = 200
MAX_MESSAGE_CHARS = 256  # the error's str(), which becomes grpc-message


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: a dotted path (``sampling.top_p``) and why it is bad."""

    field: str
    description: str

    def clipped(self) -> FieldViolation:
        return FieldViolation(clip(self.field, MAX_FIELD_CHARS), clip(self.description, MAX_DESCRIPTION_CHARS))


class Violations:
    """Collects the violations of one request: the first ``MAX_REPORTED_VIOLATIONS`` (clipped),
    and a count of the rest. Callers check sizes and counts before contents, so that a huge
    list is reported once ("at most 16 ..."), not element by element."""

    def __init__(self) -> None:
        self.reported: list[FieldViolation] = []
        self.num_omitted = 0

    def __bool__(self) -> bool:
        return bool(self.reported)

    def __iter__(self) -> Iterator[FieldViolation]:
        return iter(self.reported)

    def __len__(self) -> int:
        return len(self.reported) + self.num_omitted

    def add(self, field: str, description: str) -> None:
        if len(self.reported) < MAX_REPORTED_VIOLATIONS:
            self.reported.append(FieldViolation(field, description).clipped())
        else:
            self.num_omitted += 1

    def check(self, ok: bool, field: str, description: str) -> None:
        if not ok:
            self.add(field, description)

    def extend(self, error: InvalidRequestError) -> None:
        for v in error.violations:
            self.add(v.field, v.description)
        self.num_omitted += error.num_omitted

    def raise_if_any(self, reason: str = "INVALID_ARGUMENT") -> None:
        if self.reported:
            raise InvalidRequestError(self.reported, reason=reason, num_omitted=self.num_omitted)


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    reason: str = "ENGINE_ERROR"


class InvalidRequestError(EngineError):
    """The request breaks one or more rules; nothing was enqueued. ``violations`` holds at most
    ``MAX_REPORTED_VIOLATIONS`` of them; ``num_omitted`` counts the others."""

    reason = "INVALID_ARGUMENT"

    def __init__(
        self, violations: Sequence[FieldViolation], reason: str = "INVALID_ARGUMENT", num_omitted: int = 0
    ) -> None:
        kept = [v.clipped() for v in violations[:MAX_REPORTED_VIOLATIONS]]
        self.violations = kept
        self.num_omitted = num_omitted + len(violations) - len(kept)
        self.reason = reason
        num_more = max(len(kept) - 2, 0) + self.num_omitted
        more = f" (and {num_more} more)" if num_more else ""
        summary = "; ".join(f"{v.field}: {v.description}" for v in kept[:2]) or "invalid request"
        super().__init__(clip(summary, MAX_MESSAGE_CHARS - len(more)) + more)

    def with_fields(self, rename: Callable[[str], str]) -> InvalidRequestError:
        """The same error with every field path renamed (e.g. put under ``requests[3].``)."""
        renamed = [FieldViolation(rename(v.field), v.description) for v in self.violations]
        return InvalidRequestError(renamed, reason=self.reason, num_omitted=self.num_omitted)


class EngineOverloadedError(EngineError):
    """The engine cannot take the request now (a queue bound, or a deadline it cannot meet).
    Raised before any tokenization or model work. ``retry_after``: seconds after which a retry
    may succeed, sent as google.rpc.RetryInfo; None = no suggestion."""

    reason = "QUEUE_FULL"

    def __init__(self, message: str, reason: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.retry_after = retry_after


class StreamStalledError(EngineOverloadedError):
    """A stream's reader stayed idle past ``--stream-idle-timeout`` while its buffer was full;
    the request was aborted and its buffered tokens dropped."""

    reason = "STREAM_STALLED"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class EngineUnavailableError(EngineError):
    """The engine is not started yet, or is draining and takes no new requests."""

    reason = "UNAVAILABLE"


class DeadlineExceededError(EngineError):
    """The request's deadline passed before it could finish; its slot has been freed."""

    reason = "DEADLINE_EXCEEDED"


class EngineDeadError(EngineError):
    """The engine thread failed; every pending request gets this error."""

    reason = "ENGINE_DEAD"


class ModelLoadError(Exception):
    """A model spec that cannot be loaded. The message says what to do about it."""
