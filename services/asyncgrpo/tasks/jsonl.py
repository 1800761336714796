"""JSONL task files: one JSON object per line. Reading validates every record and names the file, the
line and the field of the first problem, so a bad data file fails at load time, not mid-run."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

TASK_FIELDS = ("id", "prompt", "answer", "solution")


class TaskDataError(ValueError):
    """A task file that cannot be used: says where (file:line), which field, and how to fix it."""


def read_records(path: str | Path, required: Sequence[str] = ("prompt", "answer"), unique_key: str | None = "id") -> list[dict[str, Any]]:
    """Read and validate a JSONL file.

    Every field in `required` must be present in every record and hold a non-empty string (answers too:
    GSM8K stores them as text, and a number written as JSON would lose "1,000"-style formatting).
    Blank lines are skipped. When `unique_key` is present in a record, its values must be unique.
    """
    p = Path(path)
    if not p.is_file():
        raise TaskDataError(f"{p}: no such file; write one with `asyncgrpo make-task --out DIR`")
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise TaskDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for field in required:
                if field not in rec:
                    raise TaskDataError(f"{where}: field '{field}' is missing; every record needs {', '.join(required)}")
                value = rec[field]
                if not isinstance(value, str):
                    raise TaskDataError(
                        f"{where}: field '{field}' must be a string, got {type(value).__name__} {value!r}; "
                        f"write it quoted, e.g. \"{field}\": \"{value}\""
                    )
                if not value.strip():
                    raise TaskDataError(f"{where}: field '{field}' is empty")
            if unique_key is not None and unique_key in rec:
                key = str(rec[unique_key])
                if key in seen:
                    raise TaskDataError(f"{where}: field '{unique_key}' value {key!r} repeats line {seen[key]}; ids must be unique")
                seen[key] = lineno
            records.append(rec)
    if not records:
        raise TaskDataError(f"{p}: no records; the file is empty")
    return records


def write_records(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write records as JSONL atomically (temp file + rename), so a crash never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, p)
    return p
