"""Process rewards on the rollout side: steps from text, reward functions that score each step, the weighted step
rewards, and steps as token ranges (what the queue message carries)."""

from __future__ import annotations

import asyncio

import pytest

from asyncgrpo.rewards.steps import char_ends, split_steps, token_ends
from asyncgrpo.rollout.rewards import RewardRunner, combine

PLUG = "reward_plugins.sample_rewards:"


@pytest.mark.parametrize("text,want", [
    ("a\nb\n\nc", ("a\n", "b\n\n", "c")),
    ("a\nb\n", ("a\n", "b\n")),
    ("one step", ("one step",)),
    ("", ()),
    ("\nx", ("\n", "x")),
])
def test_split_steps_keeps_every_character(text: str, want: tuple[str, ...]) -> None:
    assert split_steps(text, "\n") == want
    assert "".join(split_steps(text, "\n")) == text


def test_multi_character_separator_and_char_ends() -> None:
    steps = split_steps("1+2=3 ki 3*3=9 ki done", " ki ")
    assert steps == ("1+2=3 ki ", "3*3=9 ki ", "done")
    assert char_ends(steps) == [9, 18, 22]
    with pytest.raises(ValueError, match="step_separator"):
        split_steps("x", "")


def _decode_pairs(ids: list[int]) -> str:
    """A tokenizer whose every token is two characters ('ab' for id 0, ...), the last one possibly one."""
    return "".join("ab" if i == 0 else "c" for i in ids)


def test_token_ends_find_the_token_that_completes_each_step() -> None:
    # tokens "ab" "ab" "ab" "c": text "abababc"; steps end at chars 2, 3, 7: the first token completes char 2, the
    # second holds char 3 (so it completes that step), the last ends the last step
    assert token_ends(_decode_pairs, [0, 0, 0, 1], [2, 3, 7]) == [1, 2, 4]
    # two steps completed by one token end at the same token (the queue and the estimator keep both)
    assert token_ends(_decode_pairs, [0, 0], [1, 2, 4]) == [1, 1, 2]
    assert token_ends(_decode_pairs, [], []) == []


def test_token_ends_with_the_byte_level_tokenizer_and_multibyte_text(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Each byte is a token: a prefix cut inside a 3-byte character decodes to U+FFFD, which must not count as the
    character. Steps "计算一。" and "结果二。" (4 characters, 12 bytes each) end at tokens 12 and 24."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "计算一。结果二。"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 24

    def decode(x: list[int]) -> str:
        return tok.decode(x, skip_special_tokens=True)

    steps = split_steps(text, "。")
    assert token_ends(decode, ids, char_ends(steps)) == [12, 24]
    ascii_ids = tok.encode("1+2=3\n#### 3", add_special_tokens=False)
    assert token_ends(decode, ascii_ids, char_ends(split_steps("1+2=3\n#### 3", "\n"))) == [6, 12]


def test_combine_weights_steps_and_puts_outcomes_on_the_last_step() -> None:
    total, details, steps = combine(["prm", "gsm8k"], [2.0, 0.5], {"prm": [0.5, 1.0, 0.25], "gsm8k": 1.0}, 3)
    assert steps == [1.0, 2.0, 0.5 + 0.5]  # 2 x step scores; + 0.5 x outcome on the last
    assert details == {"prm": 0.25, "gsm8k": 1.0}  # a step function's scalar is its worst step
    assert total == 2.0 * 0.25 + 0.5 * 1.0
    assert combine(["gsm8k"], [1.0], {"gsm8k": 1.0}, 2)[2] is None  # outcome rewards only: no steps
    # no steps (a completion that decodes to no text): an outcome reward, never an empty step list
    assert combine(["prm", "gsm8k"], [1.0, 1.0], {"prm": [], "gsm8k": 1.0}, 0) == (1.0, {"prm": 0.0, "gsm8k": 1.0}, None)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_runner_scores_steps_with_plugins(executor: str) -> None:
    runner = RewardRunner([PLUG + "step_digits", "gsm8k"], [1.0, 1.0], executor=executor, max_workers=2)
    try:
        (s,) = asyncio.run(runner.score("Q", ["think\n2+2=4\n#### 4"], "4"))
    finally:
        runner.close()
    assert s.error is None
    assert s.step_rewards == [0.0, 1.0, 1.0 + 1.0]  # digits per step; gsm8k's 1 on the last
    assert s.step_char_ends == [6, 12, 18]
    assert s.reward == 0.0 + 1.0  # the worst step (0) + the outcome


def test_async_step_reward_and_a_wrong_count_is_an_error() -> None:
    runner = RewardRunner([PLUG + "async_step_lengths"])
    (s,) = asyncio.run(runner.score("Q", ["ab\ncde"], "x"))
    assert s.step_rewards == [3.0, 3.0] and s.reward == 3.0
    bad = RewardRunner([PLUG + "step_count_wrong"])
    (s,) = asyncio.run(bad.score("Q", ["ab\ncde"], "x"))
    assert s.reward == 0.0 and s.step_rewards is None and "3 step scores for 2 steps" in s.error
    runner.close()
    bad.close()


def test_the_rollout_turns_scored_steps_into_queue_steps(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """RolloutService's step mapping with the real tokenizer, into real Completions: a multi-step completion, and
    one that is only EOS (decodes to no text, so it has no steps and stays an outcome reward)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from asyncgrpo.queue.schema import Completion, spans_from_versions
    from asyncgrpo.rollout.sampling import Sample
    from asyncgrpo.rollout.service import RolloutService

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def decode(x: list[int]) -> str:
        return tok.decode(x, skip_special_tokens=True)

    texts = ["2+3=5\n#### 5", ""]
    samples = [Sample(output_ids=tok.encode(texts[0], add_special_tokens=False), finish_reason="stop"),
               Sample(output_ids=[tok.eos_token_id], finish_reason="stop")]
    for s in samples:
        s.logprobs, s.token_versions = [-1.0] * len(s.output_ids), [0] * len(s.output_ids)
    runner = RewardRunner([PLUG + "step_digits"])
    try:
        scores = asyncio.run(runner.score("Q", [decode(s.output_ids) for s in samples], "5"))
    finally:
        runner.close()
    steps = RolloutService._group_steps(SimpleNamespace(decode=decode), samples, scores)  # type: ignore[arg-type]
    assert steps == [{"step_rewards": [1.0, 1.0], "step_ends": [6, 12]}, {}]
    for s, sc, st in zip(samples, scores, steps):
        c = Completion(s.output_ids, s.logprobs, spans_from_versions(s.token_versions), "stop", sc.reward, **st)
        assert c.step_ends == st.get("step_ends")
