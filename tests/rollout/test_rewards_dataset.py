"""Reward runner (off the loop, timeout, crash -> 0 and counted) and the prompt dataset."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from asyncgrpo.rewards import REWARD_FNS
from asyncgrpo.rollout.dataset import PromptDataset, load_records
from asyncgrpo.rollout.rewards import RewardRunner, score_one
from asyncgrpo.tasks.jsonl import TaskDataError


def test_score_one_weights_and_details() -> None:
    s = score_one(["gsm8k", "exact"], [2.0, 1.0], "so #### 42", "42")
    assert s.reward == 2.0 and s.details == {"gsm8k": 1.0, "exact": 0.0} and s.error is None


def test_crashing_reward_scores_zero_and_is_counted(monkeypatch) -> None:
    def boom(completion: str, answer: str) -> float:
        if "crash" in completion:
            raise RuntimeError("bad input")
        return 1.0

    monkeypatch.setitem(REWARD_FNS, "boom", boom)
    runner = RewardRunner(["boom"], timeout_s=5)
    scores = asyncio.run(runner.score(["ok", "crash", "ok"], "x"))
    assert [s.reward for s in scores] == [1.0, 0.0, 1.0]
    assert "RuntimeError: bad input" in (scores[1].error or "")
    assert runner.errors == 1
    runner.close()


def test_hanging_reward_times_out_off_the_loop(monkeypatch) -> None:
    release = threading.Event()

    def hang(completion: str, answer: str) -> float:
        if completion == "hang":
            release.wait(10)
        return 1.0

    monkeypatch.setitem(REWARD_FNS, "hang", hang)
    runner = RewardRunner(["hang"], timeout_s=0.2, max_workers=1)

    async def main() -> tuple[list, int]:
        ticks = 0

        async def ticker() -> None:  # the loop keeps running while the reward hangs
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        scores = await runner.score(["hang"], "x")
        t.cancel()
        # the only pool thread is still stuck: the next call must run on a fresh pool, not time out
        scores += await runner.score(["fine"], "x")
        return scores, ticks

    scores, ticks = asyncio.run(main())
    release.set()
    assert scores[0].reward == 0.0 and "timeout" in (scores[0].error or "")
    assert scores[1].reward == 1.0 and scores[1].error is None
    assert runner.errors == 1 and ticks > 2
    runner.close()


def test_process_executor_scores_registry_fns() -> None:
    runner = RewardRunner(["gsm8k"], executor="process", max_workers=1, timeout_s=60)
    scores = asyncio.run(runner.score(["#### 7", "#### 8"], "7"))
    assert [s.reward for s in scores] == [1.0, 0.0]
    runner.close()


def test_unknown_reward_fn() -> None:
    with pytest.raises(ValueError, match="unknown reward function"):
        RewardRunner(["nope"])


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
    scores = asyncio.run(RewardRunner(["gsm8k"]).score(["3 plus 4 is 7 #### 7", "#### 8"], pr.answer))
    assert [s.reward for s in scores] == [1.0, 0.0]


def byte_encode(s: str) -> list[int]:
    return list(s.encode())
