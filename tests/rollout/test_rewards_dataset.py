"""Reward runner (off the loop, timeout, crash -> 0 and counted) and the prompt dataset."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from asyncgrpo.rollout.dataset import PromptDataset, load_records
from asyncgrpo.rollout.rewards import RewardRunner
from asyncgrpo.tasks.jsonl import TaskDataError
from reward_plugins import sample_rewards

PLUG = "reward_plugins.sample_rewards:"


def score(runner: RewardRunner, completions: list[str], answer: str = "x", prompt: str = "Q?", metadata=None) -> list:
    return asyncio.run(runner.score(prompt, completions, answer, metadata))


def test_weights_and_details() -> None:
    runner = RewardRunner(["gsm8k", "exact"], [2.0, 1.0])
    (s,) = score(runner, ["so #### 42"], "42")
    assert s.reward == 2.0 and s.details == {"gsm8k": 1.0, "exact": 0.0} and s.error is None
    runner.close()


def test_a_plugin_by_import_path_sees_prompt_answer_and_metadata() -> None:
    sample_rewards.SEEN.clear()
    runner = RewardRunner([PLUG + "seen", PLUG + "length_bonus"], [1.0, 2.0])
    (s,) = score(runner, ["abcd"], "42", prompt="Q: 40+2=?", metadata={"difficulty": 3, "source": "test"})
    x = sample_rewards.SEEN[-1]
    assert (x.prompt, x.completion, x.answer, dict(x.metadata)) == ("Q: 40+2=?", "abcd", "42", {"difficulty": 3, "source": "test"})
    assert s.details == {PLUG + "seen": 3.0, PLUG + "length_bonus": pytest.approx(0.4)}
    assert s.reward == pytest.approx(3.0 + 2 * 0.4) and s.error is None
    runner.close()


def test_async_and_sync_functions_mix() -> None:
    runner = RewardRunner([PLUG + "async_echo", "exact"], [1.0, 10.0])
    scores = score(runner, ["42", "41"], "42", prompt="12345")
    assert [s.reward for s in scores] == [5.0 + 10.0, 5.0]  # len(prompt) + 10 x exact
    assert runner.async_fns and runner.sync_specs == ["exact"]
    runner.close()


def test_a_slow_async_function_times_out_and_scores_zero() -> None:
    runner = RewardRunner([PLUG + "async_slow", "exact"], timeout_s=0.2)
    (s,) = score(runner, ["x"], "x")
    assert s.reward == 0.0 and f"{PLUG}async_slow: timeout after 0.2s" in (s.error or "")
    assert s.details["exact"] == 1.0 and runner.errors == 1
    runner.close()


def test_numpy_scalars_and_bools_are_numbers() -> None:
    runner = RewardRunner([PLUG + "numpy_scalar", PLUG + "a_bool"])
    (s,) = score(runner, ["7"], "7")
    assert s.error is None and s.details == {PLUG + "numpy_scalar": 0.5, PLUG + "a_bool": 1.0} and s.reward == 1.5
    runner.close()


def test_the_dataset_gives_each_prompt_its_records_other_fields(tmp_path) -> None:
    p = _write(tmp_path, [{"id": "a", "prompt": "Q: 1+1=?", "answer": "2", "difficulty": 3, "tests": ["x"]}])
    pr = PromptDataset(load_records(p, "prompt", "answer"), byte_encode, shuffle=False).get(0, 0)
    assert pr.metadata == {"id": "a", "difficulty": 3, "tests": ["x"]}


@pytest.mark.parametrize(("fn", "fragment"), [("returns_text", "returned '1.0', not a finite number"),
                                              ("returns_nan", "returned nan, not a finite number")])
def test_a_non_number_is_that_functions_error(fn: str, fragment: str) -> None:
    runner = RewardRunner([PLUG + fn])
    (s,) = score(runner, ["x"])
    assert s.reward == 0.0 and f"{PLUG}{fn}: TypeError: {fragment}" in (s.error or ""), s.error
    runner.close()


def test_crashing_reward_scores_zero_and_is_counted() -> None:
    runner = RewardRunner([PLUG + "crash_on_word"], timeout_s=5)
    scores = score(runner, ["ok", "crash", "ok"])
    assert [s.reward for s in scores] == [1.0, 0.0, 1.0]
    assert "RuntimeError: bad input" in (scores[1].error or "")
    assert runner.errors == 1
    runner.close()


def test_hanging_reward_times_out_off_the_loop() -> None:
    sample_rewards.RELEASE.clear()
    runner = RewardRunner([PLUG + "hang"], timeout_s=0.2, max_workers=1)

    async def main() -> tuple[list, int]:
        ticks = 0

        async def ticker() -> None:  # the loop keeps running while the reward hangs
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        scores = await runner.score("", ["hang"], "x")
        t.cancel()
        # the only pool thread is still stuck: the next call must run on a fresh pool, not time out
        scores += await runner.score("", ["fine"], "x")
        return scores, ticks

    scores, ticks = asyncio.run(main())
    sample_rewards.RELEASE.set()
    assert scores[0].reward == 0.0 and "timeout" in (scores[0].error or "")
    assert scores[1].reward == 1.0 and scores[1].error is None
    assert runner.errors == 1 and ticks > 2
    runner.close()


def test_process_executor_runs_builtins_and_plugins_in_other_processes() -> None:
    import os

    runner = RewardRunner(["gsm8k", PLUG + "pid"], [1.0, 0.0], executor="process", max_workers=1, timeout_s=60)
    scores = score(runner, ["#### 7", "#### 8"], "7")
    assert [s.reward for s in scores] == [1.0, 0.0]
    assert all(s.details[PLUG + "pid"] != os.getpid() for s in scores)  # scored in a spawned worker
    runner.close()


@pytest.mark.parametrize(("spec", "fragment"), [
    ("nope", "reward.fns: 'nope' is not a built-in reward function (boxed, exact, gsm8k, orm, prm); for your own function give its import path"),
    ("no_such_pkg.mod:f", "reward.fns: 'no_such_pkg.mod:f': cannot import module 'no_such_pkg.mod' (ModuleNotFoundError"),
    (PLUG + "missing", "module 'reward_plugins.sample_rewards' has no 'missing'"),
    (PLUG + "NOT_CALLABLE", "is a int, not a function taking a RewardInput"),
    ("a b:c", "is not an import path; write package.module:function"),
])
def test_bad_reward_specs_fail_at_start_up_naming_the_fix(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        RewardRunner([spec])
    assert fragment in str(e.value), str(e.value)


def _write(tmp_path, recs):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def test_dataset_order_is_deterministic_and_a_permutation(tmp_path) -> None:
    recs = [{"id": f"q{i}", "question": f"what is {i}?", "answer": str(i)} for i in range(20)]
    p = _write(tmp_path, recs)
    enc = lambda s: list(s.encode())  # noqa: E731
    mk = lambda: PromptDataset(load_records(p, "question", "answer"), enc, template="Q: {question}\nA:",  # noqa: E731
                               prompt_key="question", seed=3)
    a, b = mk(), mk()
    assert a.order(0) == b.order(0) and sorted(a.order(0)) == list(range(20)) and a.order(0) != a.order(1)
    pr = a.get(0, 0)
    row = a.order(0)[0]
    assert pr.prompt_id == f"q{row}" and pr.text == f"Q: what is {row}?\nA:" and pr.answer == str(row)
    assert pr.input_ids == list(pr.text.encode())
    assert a.fingerprint() == b.fingerprint()


def test_dataset_errors_name_the_field(tmp_path) -> None:
    p = _write(tmp_path, [{"id": "a", "prompt": "x", "answer": "1"}])
    with pytest.raises(TaskDataError, match="prompt_template"):
        PromptDataset(load_records(p, "prompt", "answer"), lambda s: [1], template="{question}")
    with pytest.raises(TaskDataError, match="'solution' is missing"):
        load_records(p, "prompt", "solution")
    with pytest.raises(TaskDataError, match="train_dataset.path"):
        load_records("", "prompt", "answer")


def test_tokenizer_encoder_from_the_model_dir(tiny_model_dir) -> None:
    from asyncgrpo.rollout.dataset import tokenizer_encoder

    encode, decode = tokenizer_encoder(str(tiny_model_dir))
    ids = encode("Q: 1+1=?\nA:")
    assert ids and all(i < 256 for i in ids)  # byte-level, no special tokens added
    assert decode(ids + [256]) == "Q: 1+1=?\nA:"  # eos is skipped when decoding a completion


def test_gsm8k_style_file(tmp_path) -> None:
    """GSM8K's own JSONL: 'question' and 'answer' (a worked solution ending '#### N'), no 'id'."""
    p = _write(tmp_path, [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
                          {"question": "What is 10 - 1?", "answer": "10 - 1 = 9\n#### 9"}])
    ds = PromptDataset(load_records(p, "question", "answer"), byte_encode, template="Question: {question}\nAnswer:",
                       prompt_key="question", shuffle=False)
    pr = ds.get(0, 0)
    assert pr.prompt_id == "0" and pr.text == "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
    scores = asyncio.run(RewardRunner(["gsm8k"]).score(pr.text, ["3 plus 4 is 7 #### 7", "#### 8"], pr.answer, pr.metadata))
    assert [s.reward for s in scores] == [1.0, 0.0]


def byte_encode(s: str) -> list[int]:
    return list(s.encode())
