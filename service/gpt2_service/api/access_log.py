"""The access log: one line per RPC of the gpt2 services (and one per request of a batch), with
the fields an operator filters on, in a fixed order. Not the accounting that decides the final
status code (api/accounting.py), nor the log formats (api/logs.py)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import grpc

from gpt2_service.api.logs import log_fields
from gpt2_service.core.sequence import Finished

if TYPE_CHECKING:
    from gpt2_service.api.accounting import CallRecord

log = logging.getLogger("gpt2_service.api.access")

# Expected outcomes are logged at INFO; a full queue at WARNING; faults at ERROR (the servicer
# logs their traceback separately).
_LOG_LEVEL_BY_CODE = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: logging.WARNING,
    grpc.StatusCode.INTERNAL: logging.ERROR,
    grpc.StatusCode.UNKNOWN: logging.ERROR,
    grpc.StatusCode.DATA_LOSS: logging.ERROR,
}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def log_access(call: CallRecord, code: grpc.StatusCode, error: str | None, log_prompts: bool) -> None:
    """The call's one access line (and one per request of a batch), at a level that fits ``code``."""
    total_ms = _ms(time.monotonic() - call.started)
    for item in call.items:  # a batch: a line for each of its requests, then the call's
        fields = _finished_fields(item.finished, _ms(item.finished.timing.total_seconds))
        fields.update(rpc=call.rpc, code=grpc.StatusCode.OK.name, batch_id=call.request_id)
        if log_prompts:
            fields["prompt"] = item.prompt
        log_fields(
            log,
            logging.INFO,
            "batch item finished",
            _ordered(fields),
            request_id=item.request_id,
            trace_ids=call.trace_ids,
        )
    if call.finished is not None:
        fields = _finished_fields(call.finished, total_ms)
    else:
        fields = {
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "finish_reason": None,
            "queue_ms": None,
            "ttft_ms": None,
            "total_ms": total_ms,
        }
    if call.items:
        fields["prompt_tokens"] = sum(i.finished.usage.prompt_tokens for i in call.items)
        fields["completion_tokens"] = sum(i.finished.usage.completion_tokens for i in call.items)
        fields["num_requests"] = len(call.items)
    fields.update(rpc=call.rpc, code=code.name, error=error)
    if call.rejected is not None:
        fields["rejected"] = call.rejected
    if call.tenant is not None:
        fields["tenant"] = call.tenant
    if log_prompts and call.prompt is not None:
        fields["prompt"] = call.prompt
    level = _LOG_LEVEL_BY_CODE.get(code, logging.INFO)
    log_fields(log, level, "request finished", _ordered(fields), request_id=call.request_id, trace_ids=call.trace_ids)


ACCESS_FIELDS = (
    "rpc",
    "code",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "queue_ms",
    "ttft_ms",
    "total_ms",
    "error",
)


def _finished_fields(finished: Finished, total_ms: float) -> dict[str, object]:
    return {
        "prompt_tokens": finished.usage.prompt_tokens,
        "completion_tokens": finished.usage.completion_tokens,
        "finish_reason": finished.reason.value,
        "queue_ms": _ms(finished.timing.queue_seconds),
        "ttft_ms": _ms(finished.timing.time_to_first_token_seconds),
        "total_ms": total_ms,
    }


def _ordered(fields: dict[str, object]) -> dict[str, object]:
    """The access fields first, in a fixed order (each present, None when unknown), then the rest."""
    ordered: dict[str, object] = {key: fields.get(key) for key in ACCESS_FIELDS}
    ordered.update((key, value) for key, value in fields.items() if key not in ordered)
    return ordered
