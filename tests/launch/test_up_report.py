"""What `up` reports at the end: the paired gain of the final model over the warm start, and why a run ended
before its target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from asyncgrpo.launch.up import _early_end_reason, paired_gain


def test_paired_gain_by_hand() -> None:
    # per-prompt gains 0.5, 0, 0: mean 1/6; sample std sqrt(((1/3)^2 + 2 (1/6)^2) / 2) = sqrt(1/12)
    g = paired_gain([0.0, 0.5, 1.0], [0.5, 0.5, 1.0])
    assert g["mean"] == pytest.approx(1 / 6)
    assert g["ci95"] == pytest.approx(1.959964 * math.sqrt(1 / 12) / math.sqrt(3), rel=1e-5)
    # the same shift on every prompt is certain however the prompts differ: pairing removes their spread
    assert paired_gain([0.0, 0.2, 0.9], [0.1, 0.3, 1.0]) == pytest.approx({"mean": 0.1, "ci95": 0.0}, abs=1e-12)
    with pytest.raises(ValueError):
        paired_gain([0.0], [0.0, 1.0])  # different prompts: not a pairing


def test_early_end_reason_reads_only_this_runs_lines(tmp_path: Path) -> None:
    log = tmp_path / "trainer.log"
    log.write_text("10:00 WARNING x: run ended early: an earlier run's reason\n")
    since = {log: log.stat().st_size}
    with log.open("a") as f:
        f.write("10:01 INFO x: step 3: loss 0.1\n10:02 WARNING x: run ended early: the prompts ran out at version 3.\n")
    assert _early_end_reason(log, since) == "the prompts ran out at version 3."
    assert _early_end_reason(log, {log: log.stat().st_size}) == f"see {log}"
    assert _early_end_reason(tmp_path / "missing.log", {}) == f"see {tmp_path / 'missing.log'}"


def test_the_final_evaluation_uses_rule_rewards_and_skips_served_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # reward.fns = [orm] only: the reward server may be gone when up evaluates, so there is nothing to evaluate
    # offline, and up says so instead of failing after the whole run
    from asyncgrpo.config import load_config
    from asyncgrpo.launch.up import _evaluate

    cfg = load_config(overrides={"reward": {"fns": ["orm"], "orm": {"url": "http://127.0.0.1:9"}}})
    _evaluate(cfg, tmp_path / "missing-before", tmp_path / "missing-after", tmp_path / "test.jsonl", tmp_path)
    out = capsys.readouterr().out
    assert "no before -> after evaluation" in out and "has no rule reward" in out, out
    assert not (tmp_path / "eval.json").exists()
