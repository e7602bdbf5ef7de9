"""Load named SQL from ``backplane/store/sql``: each statement is written once, in a file.

A queries file holds blocks that start with ``-- name: <name>``; the lines after it, up to the
next block, are the statement (full-line comments dropped, so they never go over the wire).
Parameters are ``%s`` (psycopg's and Django's style; ``%%`` for a literal percent sign);
``{part}`` in a statement stands for an outbox partition's name, filled in by the store.
PL/pgSQL functions live one per file, versioned by name (``bp_assign_v2.sql``): a file, once
released, never changes — a change is a new version (see ``backplane/migrations/0010_*``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent / "sql"
_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$")


def parse(text: str) -> dict[str, str]:
    """The named statements of a queries file's text."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _NAME.match(line.strip())
        if match:
            if match.group(1) in found:
                raise ValueError(f"query {match.group(1)!r} is named twice")
            current = found[match.group(1)] = []
        elif current is not None and line.strip() and not line.lstrip().startswith("--"):
            current.append(line.rstrip())
    return {name: "\n".join(lines) for name, lines in found.items()}


@functools.cache
def load(filename: str) -> dict[str, str]:
    """The named statements of ``sql/<filename>``, read once per process."""
    return parse((SQL_DIR / filename).read_text())


def function_source(versioned_name: str) -> str:
    """The ``CREATE FUNCTION`` text of one function version (``bp_assign_v2``)."""
    return (SQL_DIR / f"{versioned_name}.sql").read_text()
