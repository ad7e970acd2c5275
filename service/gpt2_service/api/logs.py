"""Request ids in log lines, and the server's two log formats (text, JSON lines).

The API layer sets ``request_id_var`` for the task that serves a request; ``RequestIdFilter``
copies it onto every log record, so any line logged while serving it (by any module) carries
the id. asyncio tasks copy the context when created, so concurrent requests do not mix.

A record may also carry structured fields (``log_fields``): the text format appends them as
``key=value`` pairs, the JSON format gives each its own key.
"""

from __future__ import annotations

import contextvars
import json
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

NO_REQUEST = "-"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default=NO_REQUEST)
# (trace id, span id) of the traced RPC being served (api/tracing.py, --trace), for JSON log lines
trace_ids_var: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("trace_ids", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request). Attach to handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if not hasattr(record, "trace_ids"):
            record.trace_ids = trace_ids_var.get()
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
FIELDS_ATTR = "fields"  # the LogRecord attribute that holds a record's structured fields


def log_fields(
    logger: logging.Logger,
    level: int,
    message: str,
    fields: Mapping[str, object],
    request_id: str | None = None,
    trace_ids: tuple[str, str] | None = None,
) -> None:
    """Log ``message`` with structured ``fields`` (JSON-serialisable values; None = unknown).
    ``request_id`` and ``trace_ids`` override the context's."""
    extra: dict[str, object] = {FIELDS_ATTR: dict(fields)}
    if request_id is not None:
        extra["request_id"] = request_id
    if trace_ids is not None:
        extra["trace_ids"] = trace_ids
    logger.log(level, message, extra=extra)


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields = getattr(record, FIELDS_ATTR, None)
    return fields if isinstance(fields, dict) else {}


def _text_value(value: object) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=' for c in value):
        return value
    # JSON: strings quoted and kept on one line whatever they hold, lists without spaces
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


# Control characters (C0, DEL, C1) and Unicode line and paragraph separators, as escapes: a value
# that holds them can neither start a forged log line nor send escape sequences to a terminal.
_ESCAPES = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def escape_controls(text: str) -> str:
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, then the record's fields as ``key=value`` pairs (unknown ones left out),
    all on one line: control characters in any part of it are escaped (a traceback, when there
    is one, follows on lines of its own)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        pairs = [f"{key}={_text_value(value)}" for key, value in _fields(record).items() if value is not None]
        return escape_controls(" ".join([line, *pairs]))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message, then the record's
    fields each under its own key (null when unknown), and exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", NO_REQUEST),
        }
        trace_ids = getattr(record, "trace_ids", None)
        if trace_ids is not None:  # a traced request's line (--trace)
            entry["trace_id"], entry["span_id"] = trace_ids
        entry["message"] = record.getMessage()
        for key, value in _fields(record).items():
            entry.setdefault(key, value)  # a field never hides one of the keys above
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: str, level: str) -> None:
    """Route the root logger to stderr in ``text`` or ``json`` format, with request ids."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
