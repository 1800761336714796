"""The JSONL loader names the file, the line and the field of the first bad record."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncgrpo.tasks import TaskDataError, read_records, write_records

GOOD = '{"id": "a", "prompt": "Q: 1+1=?\\nA:", "answer": "2", "solution": " 1+1=2 #### 2"}'


def _write(tmp_path: Path, *lines: str) -> Path:
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize(
    ("second_line", "match"),
    [
        ('{"id": "b", "prompt": "Q: 2+2=?\\nA:"}', r"data.jsonl:2: field 'answer' is missing"),
        ('{"id": "b", "prompt": "Q", "answer": 4}', r"data.jsonl:2: field 'answer' must be a string, got int 4"),
        ('{"id": "b", "prompt": "  ", "answer": "4"}', r"data.jsonl:2: field 'prompt' is empty"),
        ('{"id": "b", "prompt": "Q", "answer": "4"', r"data.jsonl:2: not valid JSON"),
        ('["Q", "4"]', r"data.jsonl:2: expected a JSON object, got list"),
        ('{"id": "a", "prompt": "Q", "answer": "4"}', r"data.jsonl:2: field 'id' value 'a' repeats line 1"),
    ],
)
def test_bad_record_error_names_line_and_field(tmp_path: Path, second_line: str, match: str) -> None:
    with pytest.raises(TaskDataError, match=match):
        read_records(_write(tmp_path, GOOD, second_line))


def test_required_fields_are_configurable(tmp_path: Path) -> None:
    p = _write(tmp_path, '{"question": "Q", "final": "4"}')
    assert read_records(p, required=("question", "final"))[0]["final"] == "4"
    with pytest.raises(TaskDataError, match=r":1: field 'solution' is missing"):
        read_records(p, required=("question", "solution"))


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD, "", '{"id": "c", "prompt": "Q"}')
    with pytest.raises(TaskDataError, match=r"data.jsonl:3: field 'answer'"):
        read_records(p)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="no such file.*make-task"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="no records"):
        read_records(tmp_path / "empty.jsonl")


def test_round_trip(tmp_path: Path) -> None:
    recs = [{"id": str(i), "prompt": f"Q{i} ünïcode", "answer": str(i)} for i in range(5)]
    write_records(tmp_path / "x.jsonl", recs)
    assert read_records(tmp_path / "x.jsonl") == recs
    assert not (tmp_path / "x.jsonl.tmp").exists()
