"""The tiny ORM learns, in seconds and offline, to score right arithmetic answers above wrong ones."""

from __future__ import annotations

from pathlib import Path

import torch

from asyncgrpo.tasks.arithmetic import ArithmeticSpec, make_split
from asyncgrpo.tiny.reward_model import answer_pairs, build_reward_model, train_reward_model


def _pair_accuracy(model_dir: Path, records: list[dict[str, str]], seed: int) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def score(text: str) -> float:
        with torch.no_grad():
            return float(model(torch.tensor([tok.encode(text)])).logits[0, 0])

    pairs = answer_pairs(records, seed=seed)
    return sum(score(a) > score(b) for a, b in pairs) / len(pairs)


def test_answer_pairs_differ_only_in_the_result() -> None:
    rec = {"prompt": "Q: 2+3=?\nA:", "answer": "5", "solution": " 2+3=5 #### 5"}
    right, wrong = answer_pairs([rec], seed=0)[0]
    assert right == "Q: 2+3=?\nA: 2+3=5 #### 5"
    w = int(wrong.rsplit("#### ", 1)[1])
    assert w != 5 and abs(w - 5) <= 9 and wrong == f"Q: 2+3=?\nA: 2+3={w} #### {w}"


def test_the_tiny_orm_scores_right_answers_above_wrong_ones(tiny_model_dir: Path, tmp_path: Path) -> None:
    # 80 one-digit additions: a 2-layer model from random weights memorises which results are right in 300 steps
    # (~15 s on 2 cores); observed 0.85-0.95 of fresh (right, wrong) pairs ordered right, 0.5 is chance
    train, _ = make_split(80, 20, seed=0, spec=ArithmeticSpec(ops=("+",), min_digits=1, max_digits=1))
    rm = build_reward_model(tiny_model_dir, tmp_path / "orm", seed=1)
    before = _pair_accuracy(rm, train, seed=99)
    result = train_reward_model(rm, train, steps=300, seed=0)
    after = _pair_accuracy(rm, train, seed=99)
    print(f"\n[tiny orm] pair accuracy {before:.2f} -> {after:.2f} (train loop: {result})")
    assert after >= 0.75 and after > before + 0.15, f"pair accuracy {before:.2f} -> {after:.2f}"
