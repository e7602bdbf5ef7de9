"""Unit tests of ``backplane.logs``: the JSON line format and what it withholds."""

from __future__ import annotations

import json
import logging

from backplane.logs import JsonFormatter, logging_config


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("backplane.edge", logging.WARNING, __file__, 1, "edge %s drained %d", ("e-1", 3), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_formatter__writes_the_fields_and_the_extras_on_one_line():
    line = JsonFormatter().format(record(action="drained", connection_id="c1", count=3, ids=["a"]))
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "warning" and out["logger"] == "backplane.edge"
    assert out["message"] == "edge e-1 drained 3"
    assert (out["action"], out["connection_id"], out["count"], out["ids"]) == ("drained", "c1", 3, "['a']")
    assert out["time"].endswith("+00:00")


def test_json_formatter__withholds_fields_that_may_hold_payloads_or_secrets():
    extras = {"payload": "p", "token": "t", "headers": "h", "cookie": "c", "authorization": "a", "token_id": "x"}
    out = json.loads(JsonFormatter().format(record(action="x", **extras)))
    assert not set(extras) & out.keys()
    assert out["action"] == "x"


def test_json_formatter__writes_an_exception_as_type_and_traceback():
    try:
        raise KeyError("k")
    except KeyError:
        import sys

        rec = record()
        rec.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(rec))
    assert out["exc_type"] == "KeyError" and "Traceback" in out["exc"]


def test_logging_config__json_only_with_log_format_json(monkeypatch):
    monkeypatch.setenv("LOG_FORMAT", "json")
    assert logging_config("INFO", "WARNING")["handlers"]["console"]["formatter"] == "json"
    monkeypatch.setenv("LOG_FORMAT", "plain")
    assert logging_config("INFO", "WARNING")["handlers"]["console"]["formatter"] == "plain"


class Terminal:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_line__shows_rate_and_time_left_and_keeps_log_lines_off_it():
    from backplane.logs import ProgressLine

    terminal, now = Terminal(), [100.0]
    line = ProgressLine(terminal, now=lambda: now[0])
    handler = logging.StreamHandler(terminal)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with line:
            now[0] = 102.0
            line.update(500, 2000)
            assert terminal.text.endswith("500/2000 rows  250 rows/s  6s left")
            logging.getLogger("backplane.retention").warning("a log line")
            now[0] = 104.0
            line.update(1000, 2000)
    finally:
        root.removeHandler(handler)
    screen = terminal.text.replace("\r\x1b[K", "\n").splitlines()
    assert [s for s in screen if s] == [
        "[#######.......................] 500/2000 rows  250 rows/s  6s left",
        "a log line",
        "[###############...............] 1000/2000 rows  250 rows/s  4s left",
    ]
    assert terminal.text.endswith("\n")
