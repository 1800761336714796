"""A synthetic, verifiable arithmetic task that a tiny byte-level model can partly learn in a minute of CPU.

Record: {"id", "prompt", "answer", "solution"}. The prompt is "Q: 47+85=?\\nA:"; the solution repeats the
expression, gives the result and ends with the answer line the reward function checks:
  gsm8k: " 47+85=132 #### 132"          (reward fn gsm8k)
  boxed: " 47+85=132 \\boxed{132}"       (reward fn boxed)
Repeating the expression is the "worked" part: a model that copies it has the operands next to the result
it must produce, and the final answer is a copy of a number it just wrote.

Everything is a pure function of (spec, seed): the same arguments give byte-identical files.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from asyncgrpo.tasks.jsonl import write_records

AnswerFormat = Literal["gsm8k", "boxed"]
ANSWER_FORMATS: tuple[str, ...] = ("gsm8k", "boxed")
OPS: tuple[str, ...] = ("+", "-", "*")
PROMPT_TEMPLATE = "Q: {expr}=?\nA:"


@dataclass(frozen=True)
class ArithmeticSpec:
    """Which problems to draw. Each operand first draws its digit count uniformly from
    [min_digits, max_digits], then a value with exactly that many digits (0-9 for one digit), so short
    and long operands are equally common."""

    ops: tuple[str, ...] = ("+", "-")
    min_digits: int = 1
    max_digits: int = 2
    answer_format: AnswerFormat = "gsm8k"

    def __post_init__(self) -> None:
        if not self.ops:
            raise ValueError("ops: give at least one of '+', '-', '*'")
        bad = [o for o in self.ops if o not in OPS]
        if bad:
            raise ValueError(f"ops: unknown operator(s) {bad}; choose from {list(OPS)}")
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise ValueError(f"digits: need 1 <= min_digits ({self.min_digits}) <= max_digits ({self.max_digits}) <= 9")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format {self.answer_format!r} unknown; choose from {list(ANSWER_FORMATS)}")

    def operand_count(self) -> int:
        """How many distinct operand values the digit range allows."""
        low = 0 if self.min_digits == 1 else 10 ** (self.min_digits - 1)
        return 10**self.max_digits - low

    def problem_count(self) -> int:
        """How many distinct prompts exist (an upper bound on n_train + n_test)."""
        return len(self.ops) * self.operand_count() ** 2


def _operand(rng: random.Random, spec: ArithmeticSpec) -> int:
    digits = rng.randint(spec.min_digits, spec.max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def compute(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"operator {op!r} unknown; choose from {list(OPS)}")


def format_solution(expr: str, result: int, answer_format: str) -> str:
    """The completion the warm start learns (leading space: the prompt ends in "A:")."""
    if answer_format == "gsm8k":
        return f" {expr}={result} #### {result}"
    if answer_format == "boxed":
        return f" {expr}={result} \\boxed{{{result}}}"
    raise ValueError(f"answer_format {answer_format!r} unknown; choose from {list(ANSWER_FORMATS)}")


def make_problems(n: int, seed: int, spec: ArithmeticSpec = ArithmeticSpec(), exclude: set[str] | None = None) -> list[tuple[int, str, int]]:
    """n distinct (a, op, b) problems, drawn deterministically from seed, none whose expression is in exclude."""
    taken = set(exclude or ())
    if n + len(taken) > spec.problem_count():
        raise ValueError(
            f"asked for {n} problems (+{len(taken)} excluded) but {spec} has only {spec.problem_count()} distinct ones; "
            "raise max_digits, add ops or ask for fewer"
        )
    rng = random.Random(seed)
    out: list[tuple[int, str, int]] = []
    # Rejection sampling; the budget only runs out when n is close to the whole problem space.
    budget = 100 * n + 1000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"could not draw {n} distinct problems from {spec.problem_count()}; raise max_digits or ask for fewer")
        a, op, b = _operand(rng, spec), rng.choice(spec.ops), _operand(rng, spec)
        expr = f"{a}{op}{b}"
        if expr in taken:
            continue
        taken.add(expr)
        out.append((a, op, b))
    return out


def to_record(idx: str, a: int, op: str, b: int, answer_format: str) -> dict[str, str]:
    expr = f"{a}{op}{b}"
    result = compute(a, op, b)
    return {
        "id": idx,
        "prompt": PROMPT_TEMPLATE.format(expr=expr),
        "answer": str(result),
        "solution": format_solution(expr, result, answer_format),
    }


def make_split(n_train: int, n_test: int, seed: int, spec: ArithmeticSpec = ArithmeticSpec()) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) records with disjoint prompts. The test set is drawn first, so it stays the same
    when only n_train changes."""
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"n_train ({n_train}) and n_test ({n_test}) must be >= 0 and not both 0")
    test_problems = make_problems(n_test, seed, spec)
    # A different stream for train (seed + 1 would collide with the test set of the next seed).
    train_problems = make_problems(n_train, seed * 1_000_003 + 7, spec, exclude={f"{a}{o}{b}" for a, o, b in test_problems})
    test = [to_record(f"test-{i:06d}", a, o, b, spec.answer_format) for i, (a, o, b) in enumerate(test_problems)]
    train = [to_record(f"train-{i:06d}", a, o, b, spec.answer_format) for i, (a, o, b) in enumerate(train_problems)]
    return train, test


def write_task(out_dir: str | Path, n_train: int = 10000, n_test: int = 500, seed: int = 0,
               spec: ArithmeticSpec | None = None, **spec_kw: Any) -> dict[str, Path]:
    """Write out_dir/train.jsonl and out_dir/test.jsonl (plus task.json describing how they were made).
    Spec fields (ops, min_digits, max_digits, answer_format) may be given as keywords instead of spec."""
    import json

    spec = spec or ArithmeticSpec(**spec_kw)
    out = Path(out_dir)
    train, test = make_split(n_train, n_test, seed, spec)
    paths = {"train": write_records(out / "train.jsonl", train), "test": write_records(out / "test.jsonl", test)}
    meta = {"task": "arithmetic", "n_train": n_train, "n_test": n_test, "seed": seed,
            **asdict(spec), "prompt_template": PROMPT_TEMPLATE}
    (out / "task.json").write_text(json.dumps(meta, indent=1) + "\n")
    return paths
