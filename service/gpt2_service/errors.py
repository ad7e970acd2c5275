"""Typed engine errors. The API layer maps each to one gRPC status code (see api/status.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: a dotted path (``sampling.top_p``) and why it is bad."""

    field: str
    description: str


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    reason: str = "ENGINE_ERROR"


class InvalidRequestError(EngineError):
    """The request breaks one or more rules; nothing was enqueued."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], reason: str = "INVALID_ARGUMENT") -> None:
        self.violations = list(violations)
        self.reason = reason
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class EngineOverloadedError(EngineError):
    """The waiting queue is full. Raised before any tokenization or model work."""

    reason = "QUEUE_FULL"


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
