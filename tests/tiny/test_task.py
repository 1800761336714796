"""The arithmetic task: deterministic, correct, train and test disjoint, and the files load back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from asyncgrpo.cli import main
from asyncgrpo.tasks import ArithmeticSpec, read_records, write_task
from asyncgrpo.tasks.arithmetic import compute, make_split

PROMPT_RE = re.compile(r"^Q: (\d+)([+\-*])(\d+)=\?\nA:$")


def test_same_seed_same_records_other_seed_other_records() -> None:
    spec = ArithmeticSpec(ops=("+", "-", "*"))
    assert make_split(200, 50, seed=5, spec=spec) == make_split(200, 50, seed=5, spec=spec)
    assert make_split(200, 50, seed=5, spec=spec) != make_split(200, 50, seed=6, spec=spec)


@pytest.mark.parametrize("fmt", ["gsm8k", "boxed"])
def test_answers_are_correct(fmt: str) -> None:
    train, test = make_split(500, 100, seed=1, spec=ArithmeticSpec(ops=("+", "-", "*"), min_digits=1, max_digits=3, answer_format=fmt))
    ops_seen = set()
    for rec in train + test:
        m = PROMPT_RE.match(rec["prompt"])
        assert m, rec["prompt"]
        a, op, b = int(m[1]), m[2], int(m[3])
        ops_seen.add(op)
        # Independent check: Python evaluates the expression itself.
        truth = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert rec["answer"] == str(truth)
        tail = f" #### {truth}" if fmt == "gsm8k" else f" \\boxed{{{truth}}}"
        assert rec["solution"] == f" {a}{op}{b}={truth}{tail}"
    assert ops_seen == {"+", "-", "*"}
    assert any(int(r["answer"]) < 0 for r in train), "subtraction should produce negative answers too"


def test_train_and_test_prompts_do_not_overlap_and_are_unique() -> None:
    # A small problem space (2 ops x 100 x 100) makes collisions likely if the split were careless.
    train, test = make_split(5000, 1000, seed=0, spec=ArithmeticSpec())
    train_p, test_p = [r["prompt"] for r in train], [r["prompt"] for r in test]
    assert len(set(train_p)) == len(train_p) == 5000
    assert len(set(test_p)) == len(test_p) == 1000
    assert not set(train_p) & set(test_p)
    assert len({r["id"] for r in train + test}) == 6000


def test_test_set_does_not_depend_on_train_size() -> None:
    assert make_split(100, 50, seed=2)[1] == make_split(900, 50, seed=2)[1]


def test_digit_range_is_respected() -> None:
    train, _ = make_split(300, 0, seed=0, spec=ArithmeticSpec(ops=("+",), min_digits=3, max_digits=3))
    for rec in train:
        a, _, b = PROMPT_RE.match(rec["prompt"]).groups()  # type: ignore[union-attr]
        assert len(a) == len(b) == 3


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(ops=("/",)), "unknown operator"),
        (dict(ops=()), "at least one"),
        (dict(min_digits=3, max_digits=2), "min_digits"),
        (dict(answer_format="latex"), "answer_format"),
    ],
)
def test_bad_spec_is_rejected(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ArithmeticSpec(**kw)


def test_asking_for_more_problems_than_exist_fails_clearly() -> None:
    spec = ArithmeticSpec(ops=("+",), min_digits=1, max_digits=1)  # 100 distinct problems
    with pytest.raises(ValueError, match="only 100 distinct"):
        make_split(95, 10, seed=0, spec=spec)
    train, test = make_split(90, 10, seed=0, spec=spec)  # the whole space still works
    assert len({r["prompt"] for r in train + test}) == 100


def test_compute() -> None:
    assert compute(7, "-", 9) == -2
    with pytest.raises(ValueError):
        compute(1, "/", 2)


def test_write_task_is_byte_identical_and_loads(tmp_path: Path) -> None:
    a = write_task(tmp_path / "a", n_train=300, n_test=40, seed=9)
    b = write_task(tmp_path / "b", n_train=300, n_test=40, seed=9)
    for split in ("train", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
    records = read_records(a["train"], required=("id", "prompt", "answer", "solution"))
    assert len(records) == 300 and len(read_records(a["test"])) == 40
    meta = json.loads((tmp_path / "a" / "task.json").read_text())
    assert meta["seed"] == 9 and meta["answer_format"] == "gsm8k"


def test_make_task_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-task", "--out", str(tmp_path), "--n-train", "50", "--n-test", "5", "--answer-format", "boxed",
                 "--ops", "*", "--seed", "4"]) == 0
    recs = read_records(tmp_path / "train.jsonl")
    assert len(recs) == 50 and all("*" in r["prompt"] and "\\boxed{" in r["solution"] for r in recs)
    assert main(["make-task", "--out", str(tmp_path), "--ops", "/"]) == 2
    assert "unknown operator" in capsys.readouterr().err
