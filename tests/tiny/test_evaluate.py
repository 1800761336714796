"""Evaluation: counts, determinism, and a policy overfit on a few problems scores high on them."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from asyncgrpo.cli import main
from asyncgrpo.tasks import write_task
from asyncgrpo.tasks.jsonl import read_records, write_records
from asyncgrpo.tiny.evaluate import EvalConfig, cut_at_eos, evaluate
from asyncgrpo.tiny.warm_start import WarmStartConfig, warm_start


def test_cut_at_eos() -> None:
    assert cut_at_eos([5, 6, 256, 7, 256], 256) == ([5, 6], True)
    assert cut_at_eos([5, 6], 256) == ([5, 6], False)


@pytest.fixture(scope="module")
def overfit(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A policy trained to memorise 4 problems, and the file holding them."""
    root = tmp_path_factory.mktemp("overfit")
    write_task(root, n_train=4, n_test=1, seed=0)
    warm_start(tiny_model_dir, root / "train.jsonl", root / "warm",
               WarmStartConfig(steps=150, batch_size=4, warmup_steps=10, lr=1e-2), log=lambda _: None)
    return root / "warm", root / "train.jsonl"


def test_untrained_policy_scores_zero(tiny_model_dir: Path, overfit: tuple[Path, Path]) -> None:
    res = evaluate(tiny_model_dir, overfit[1], EvalConfig(n_samples=2, max_new_tokens=16))
    assert res.prompts == 4 and res.samples == 8
    assert res.reward == {"gsm8k": 0.0} and res.greedy_reward == {"gsm8k": 0.0}


def test_memorised_problems_score_high_and_wrong_answers_score_zero(overfit: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = overfit
    cfg = EvalConfig(n_samples=4, max_new_tokens=24, reward_fns=("gsm8k", "exact"))
    res = evaluate(model, data, cfg)
    # The overfit model is another one on another CPU (150 steps at lr 1e-2 amplify kernel rounding: top-2 logit
    # gaps moved by ~0.5 between AVX2 and non-vectorised kernels), so only margins far above that are asserted.
    # Greedy: the memorised tokens lead by >= 7.7 in the logits (measured), an exact argmax. Sampled at T=1:
    # each of the 16 samples is the memorised completion with p >= 0.99 (measured 0.993-0.995), so 5 or more
    # wrong or unfinished samples have probability < C(16,5) 0.01^5 = 4e-7 whichever seeded draws the CPU's
    # model turns into tokens. "All 16 finish" had no margin: one draw landing elsewhere could break it.
    assert res.greedy_reward["gsm8k"] == 1.0
    assert res.reward["gsm8k"] >= 0.75, res
    assert res.reward["exact"] == 0.0  # the completion is a worked answer, never the bare number
    assert res.finished_fraction >= 0.75, res
    # Same completions, wrong references: the reward must drop to zero.
    wrong = [{**r, "answer": str(int(r["answer"]) + 1)} for r in read_records(data)]
    write_records(tmp_path / "wrong.jsonl", wrong)
    assert evaluate(model, tmp_path / "wrong.jsonl", cfg).greedy_reward["gsm8k"] == 0.0


def test_same_seed_same_result(overfit: tuple[Path, Path]) -> None:
    cfg = EvalConfig(n_samples=3, max_new_tokens=24, temperature=2.0, greedy=False, seed=7)
    a, b = (asdict(evaluate(*overfit, cfg)) for _ in range(2))
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_evaluate_command_prints_json(overfit: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import json

    model, data = overfit
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--n-samples", "2", "--max-new-tokens", "24"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 8 and set(out["reward"]) == {"gsm8k"} and out["greedy_reward"]["gsm8k"] == 1.0


def test_solution_probability_is_the_product_of_the_token_probabilities(tiny_model_dir: Path) -> None:
    """exp(-n x mean token cross-entropy) of the warm start's own loss (tested by hand in test_warm_start), for
    each row alone and in a padded batch with rows of other lengths; and 256 distinct completions (each ended by
    eos) have probabilities summing to at most 1."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncgrpo.tiny.evaluate import solution_probabilities
    from asyncgrpo.tiny.warm_start import collate, completion_loss, encode_pair

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts, sols = ["Q: 1+2=?\nA:", "Q: 10-7=?\nA:", "Q: 5+5=?\nA:"], [" 1+2=3 #### 3", " 10-7=3", " 5+5=10 #### 10"]
    batched = solution_probabilities(tiny_model_dir, prompts, sols)
    for p, s, got in zip(prompts, sols, batched):
        ids, labels = encode_pair(tok, p, s, tok.eos_token_id)
        b = collate([(ids, labels)], pad_id=tok.eos_token_id)
        with torch.no_grad():
            loss = completion_loss(model(input_ids=b["input_ids"]).logits, b["labels"])
        n = sum(1 for x in labels if x != -100)
        want = math.exp(-float(loss) * n)
        assert got == pytest.approx(want, rel=1e-4), (p, s, got, want)
        assert solution_probabilities(tiny_model_dir, [p], [s])[0] == pytest.approx(got, rel=1e-4)
    one_token = solution_probabilities(tiny_model_dir, ["Q: 1+2=?\nA:"] * 256, [bytes([i]).decode("latin-1") for i in range(256)])
    assert 0 < sum(one_token) <= 1 + 1e-5
