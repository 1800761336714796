"""Verifiable tasks: synthetic problems with checkable answers, stored as JSONL records
{"id", "prompt", "answer", "solution"} that the warm start, evaluation and rollout read."""

from asyncgrpo.tasks.arithmetic import ANSWER_FORMATS, ArithmeticSpec, make_problems, write_task
from asyncgrpo.tasks.jsonl import TaskDataError, read_records, write_records

__all__ = [
    "ANSWER_FORMATS", "ArithmeticSpec", "TaskDataError", "make_problems", "read_records", "write_records", "write_task",
]
