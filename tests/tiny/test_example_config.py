"""examples/tiny_arithmetic.yaml loads, and its dataset keys match the records the task writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncgrpo.cli import main
from asyncgrpo.config import load_config
from asyncgrpo.rewards import REWARD_FNS, RewardInput
from asyncgrpo.tasks.arithmetic import make_split

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_arithmetic.yaml"


def test_example_loads_with_the_task_settings() -> None:
    cfg = load_config([str(EXAMPLE)], [])
    assert cfg.actor.path == "runs/tiny/warm"
    assert cfg.train_dataset.path == "runs/tiny/task/train.jsonl"
    assert cfg.actor.group_size == 8 and cfg.reward.fns == ["gsm8k"]
    # What the rollout will do with a record: format the prompt, score the task's own solution.
    rec = make_split(3, 1, seed=0)[0][0]
    prompt = cfg.train_dataset.prompt_template.format(**rec)
    assert prompt == rec["prompt"] and prompt.endswith("=?\nA:")
    answer = rec[cfg.train_dataset.answer_key]
    assert all(REWARD_FNS[f](RewardInput(prompt, rec["solution"], answer)) == 1.0 for f in cfg.reward.fns)
    assert cfg.rollout.max_new_tokens >= len(rec["solution"]) + 1  # one token per byte, plus eos


def test_example_shows_via_cli_with_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(EXAMPLE), "--actor.group_size=16"]) == 0
    out = capsys.readouterr().out
    assert "path: runs/tiny/warm" in out and "group_size: 16" in out
