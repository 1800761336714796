"""Reward functions on hand-written completions: what counts as a correct final answer and what does not."""

from __future__ import annotations

import pytest

from asyncgrpo.rewards import REWARD_FNS, RewardInput, get_reward_fn
from asyncgrpo.rewards.boxed import last_boxed
from asyncgrpo.rewards.extract import extract_gsm8k_answer, normalize_number

GSM8K = [
    (" 47+85=132 #### 132", "132", 1.0),
    (" 47+85=132 #### 131", "132", 0.0),
    ("so the total is #### 1,234", "1234", 1.0),
    ("#### 1234", "1,234", 1.0),
    ("#### -5", "-5", 1.0),
    ("#### 5", "-5", 0.0),  # the sign matters
    ("#### -1,234", "-1234", 1.0),
    ("#### $1,000.00", "1000", 1.0),
    ("#### 12.5", "12.50", 1.0),
    ("####42.", "42", 1.0),
    ("the answer is 42", "42", 0.0),  # no marker, no reward
    ("42", "42", 0.0),
    ("", "42", 0.0),
    ("#### 3 then again #### 4", "4", 1.0),  # the last marker wins
    ("#### 3 then again #### 4", "3", 0.0),
    ("#### 4 2", "42", 0.0),
    (" 7-9=-2 #### -2\nQ: 1+1=?\nA: 1+1=2 #### 2", "-2", 0.0),  # rambling past the answer changes it
    ("#### 42", "Natalia sold 48/2 = 24 clips.\n#### 42", 1.0),  # a full GSM8K reference answer
]

BOXED = [
    (" 47+85=132 \\boxed{132}", "132", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),  # nested braces
    ("first \\boxed{1}, finally \\boxed{2}", "2", 1.0),  # the last box wins
    ("first \\boxed{1}, finally \\boxed{2}", "1", 0.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{3}", "-3", 0.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("the answer is 2", "2", 0.0),  # no box, no reward
    ("#### 2", "2", 0.0),
    ("\\boxed{}", "2", 0.0),
    ("\\boxed{2", "2", 0.0),  # unclosed
]

EXACT = [
    (" 42 ", "42", 1.0),
    ("42.0", "42", 1.0),
    ("1,000", "1000", 1.0),
    ("the answer is 42", "42", 0.0),
    ("Paris", "Paris", 1.0),
    ("paris", "Paris", 0.0),
    ("43", "42", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "expected"), GSM8K)
def test_gsm8k(completion: str, answer: str, expected: float) -> None:
    assert REWARD_FNS["gsm8k"](RewardInput("", completion, answer)) == expected


@pytest.mark.parametrize(("completion", "answer", "expected"), BOXED)
def test_boxed(completion: str, answer: str, expected: float) -> None:
    assert REWARD_FNS["boxed"](RewardInput("", completion, answer)) == expected


@pytest.mark.parametrize(("completion", "answer", "expected"), EXACT)
def test_exact(completion: str, answer: str, expected: float) -> None:
    assert REWARD_FNS["exact"](RewardInput("", completion, answer)) == expected


def test_last_boxed_balances_braces() -> None:
    assert last_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{1} \\boxed{{2}}") == "{2}"
    assert last_boxed("no box") is None


def test_number_helpers() -> None:
    assert normalize_number("1,234.50") == "1234.5"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("abc") is None
    assert normalize_number("inf") is None
    assert extract_gsm8k_answer("#### 7\n#### 8") == "8"
    assert extract_gsm8k_answer("no marker") is None


def test_unknown_reward_fn_names_the_choices() -> None:
    with pytest.raises(ValueError, match="reward.fns: 'gsm9k' is not a built-in reward function .*gsm8k"):
        get_reward_fn("gsm9k")


def test_task_solutions_score_one_with_their_reward_fn() -> None:
    # The task's own worked solutions are the reference completions: each must earn full reward.
    from asyncgrpo.tasks.arithmetic import ArithmeticSpec, make_split

    for fmt in ("gsm8k", "boxed"):
        train, test = make_split(50, 10, seed=3, spec=ArithmeticSpec(ops=("+", "-", "*"), answer_format=fmt))
        for rec in train + test:
            assert REWARD_FNS[fmt](RewardInput(rec["prompt"], rec["solution"], rec["answer"])) == 1.0, rec
