"""Log output: ``LOG_FORMAT=json`` makes every process write one JSON object per line.

Each object has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and the record's
``extra`` fields (``action``, ids, counts). A field whose name says it may hold a secret or a
payload (``payload``, ``token``, ``headers``, ``cookie``, …) is never written, whatever a
caller passes: log calls must not carry them (docs/security.md), and this is the net under that
rule. Exceptions are written as their type and traceback text, as the plain format does.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any, Protocol

# The environment variable choosing the format: ``json``, or anything else for plain text.
FORMAT_ENV = "LOG_FORMAT"
# Extra fields never written (substrings of the field name, lower case).
WITHHELD = ("payload", "token", "header", "cookie", "authorization", "password", "secret", "body", "query")
# Attributes every LogRecord has: what is left is the caller's ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def json_format() -> bool:
    """Whether this process writes JSON lines (``LOG_FORMAT=json``)."""
    return os.environ.get(FORMAT_ENV, "").strip().lower() == "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key in out or any(word in key.lower() for word in WITHHELD):
                continue
            out[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else ""
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def logging_config(level: str, daphne_level: str) -> dict[str, Any]:
    """``LOGGING`` for tyrum/settings.py: plain text, or JSON lines with ``LOG_FORMAT=json``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
            "json": {"()": JsonFormatter},
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "json" if json_format() else "plain"},
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # daphne's access log prints paths only (never query strings or headers).
            "daphne": {"level": daphne_level},
            "django.channels.server": {"level": "WARNING"},
        },
    }


class Writer(Protocol):
    def write(self, text: str) -> Any: ...


def report(stream: Writer, text: str, action: str, logger: logging.Logger) -> None:
    """A command's closing line: on ``stream``, or as a log record when logs are JSON (so a
    process's output stays one JSON object per line)."""
    if json_format():
        logger.info("%s", text, extra={"action": action})
    else:
        stream.write(text + "\n")


class ProgressLine(logging.Filter):
    """A progress line on a terminal (rate and time left) that log records do not run into:
    as a filter of the handlers writing to the same terminal, it clears itself before each
    record, and the next update draws it again below."""

    WIDTH = 30

    def __init__(self, stream: Any, now: Any = None) -> None:
        super().__init__()
        import time

        self.stream = stream
        self.clock = now or time.monotonic
        self.started = self.clock()
        self.shown = False

    def update(self, done: int, total: int) -> None:
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = done / elapsed
        filled = int(self.WIDTH * done / total) if total else self.WIDTH
        left = f"{(total - done) / rate:.0f}s left" if rate > 0 and total >= done else "?s left"
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r\x1b[K[{bar}] {done}/{total} rows  {rate:.0f} rows/s  {left}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True

    def __enter__(self) -> ProgressLine:
        for handler in logging.getLogger().handlers:
            if getattr(handler, "stream", None) is self.stream:
                handler.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self)
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
