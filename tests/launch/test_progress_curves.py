"""The progress display of `up` (plain and live) and the PNG curves, from synthetic rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from asyncgrpo.launch.curves import step_rows, write_curves
from asyncgrpo.launch.progress import ProgressSnapshot, ProgressView, format_eta, plain_line

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("s,want", [(None, "?"), (float("inf"), "?"), (float("nan"), "?"), (-1.0, "?"), (42.4, "42s"),
                                    (185, "3m05s"), (3720, "1h02m")])
def test_format_eta(s: float | None, want: str) -> None:
    assert format_eta(s) == want


def test_plain_mode_prints_one_line_per_new_step_and_state_changes() -> None:
    out = io.StringIO()
    with ProgressView(10, live=False, file=out) as v:
        v.update(ProgressSnapshot(step=0, total_steps=10, elapsed_s=1.0))  # nothing trained yet: no line
        snap = ProgressSnapshot(step=2, total_steps=10, elapsed_s=4.0, reward=0.5, rollout_reward=0.61, eval_reward=0.6,
                                eval_greedy=0.7, eval_step=0, queue_depth=3, staleness_mean=0.8, staleness_max=2.0,
                                stale_dropped=4, gen_tokens_per_s=5400.0, train_tokens_per_s=9700.0, step_time_s=0.35)
        v.update(snap)
        v.update(snap)  # the same step again: no second line
        v.update(ProgressSnapshot(step=2, total_steps=10, elapsed_s=5.0, state="paused"))
        v.note("held-out at version 0: sampled 0.600")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("step 2/10 | reward 0.500 rollout 0.610 | held-out 0.600 greedy 0.700 @0 | queue 3 |")
    assert "staleness 0.80 max 2 dropped 4" in lines[0] and "gen 5400 tok/s train 9700 tok/s" in lines[0]
    assert lines[0].endswith("ETA 16s"), lines[0]  # 2 steps in 4 s: 8 more take 16 s
    assert lines[1:] == ["run paused", "held-out at version 0: sampled 0.600"]


def test_missing_values_show_a_dash() -> None:
    line = plain_line(ProgressSnapshot(step=1, total_steps=5, elapsed_s=0.0))
    assert "reward - rollout -" in line and "held-out - " in line and "ETA ?" in line, line


def test_live_mode_renders_on_a_terminal() -> None:
    out = io.StringIO()
    out.isatty = lambda: True  # type: ignore[method-assign]
    with ProgressView(100, file=out) as v:
        assert v.live
        v.update(ProgressSnapshot(step=37, total_steps=100, elapsed_s=60.0, state="running", reward=0.6,
                                  steps_per_s=0.5))
        v.note("a note")
    text = out.getvalue()
    assert "step 37/100" in text and "ETA 2m06s" in text and "a note" in text, text


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def test_curves_from_metrics_and_evals(tmp_path: Path) -> None:
    rows = [{"version": v, "time": 100.0 + 2 * v, "reward_mean": 0.5 + v / 100, "staleness_mean": 0.5,
             "staleness_max": 1, "tokens_per_s": 9000.0, "step_time_s": 0.3} for v in range(1, 31)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, json.dumps({**rows[2], "reward_mean": 0.0}))  # a replayed step 3 written after the first
    lines[6:6] = ["", "{half a line"]
    _write(tmp_path / "metrics.jsonl", lines)
    got = step_rows(tmp_path / "metrics.jsonl")
    assert [r["version"] for r in got] == list(range(1, 31))
    assert got[2]["reward_mean"] == 0.0  # the last row of a version wins
    _write(tmp_path / "evals.jsonl", [json.dumps(e) for e in (
        {"version": 0, "reward": 0.5, "reward_ci95": 0.05, "greedy_reward": 0.7, "greedy_ci95": 0.06},
        {"version": 20, "reward": 0.6, "reward_ci95": 0.05, "greedy_reward": 0.72, "greedy_ci95": 0.06},
        {"version": 0, "reward": 0.52, "reward_ci95": None, "greedy_reward": 0.7, "greedy_ci95": None, "source": "final"},
        {"version": 30, "reward": 0.62, "reward_ci95": None, "greedy_reward": None, "greedy_ci95": None, "source": "final"})])
    paths = write_curves(tmp_path / "metrics.jsonl", tmp_path / "evals.jsonl", tmp_path / "curves", title="t/1")
    assert sorted(p.name for p in paths) == ["accuracy.png", "curves.png", "reward.png", "staleness.png", "throughput.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 5000, (p, len(data))
    assert not list((tmp_path / "curves").glob(".*tmp"))


def test_curves_without_evals_or_rows(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.jsonl", [json.dumps({"version": 1, "time": 1.0, "reward_mean": 0.5})])
    names = [p.name for p in write_curves(tmp_path / "metrics.jsonl", tmp_path / "absent.jsonl", tmp_path / "c")]
    assert names == ["reward.png", "curves.png"], names
    assert write_curves(tmp_path / "none.jsonl", None, tmp_path / "d") == []


def test_plain_mode_says_a_run_that_starts_paused_is_paused() -> None:
    out = io.StringIO()
    with ProgressView(10, live=False, file=out) as v:
        v.update(ProgressSnapshot(step=0, total_steps=10, elapsed_s=1.0, state="paused", eval_reward=0.5))
    assert out.getvalue().splitlines() == ["run paused"]
    assert "held-out 0.500 |" in plain_line(ProgressSnapshot(step=1, total_steps=2, elapsed_s=1.0, eval_reward=0.5))


def test_the_last_panel_is_saved_as_svg(tmp_path: Path) -> None:
    out = io.StringIO()
    with ProgressView(100, live=False, file=out) as v:
        assert v.save_svg(tmp_path / "none.svg") is False and not (tmp_path / "none.svg").exists()  # nothing drawn yet
        v.update(ProgressSnapshot(step=3, total_steps=100, elapsed_s=6.0, reward=0.25))
        v.update(ProgressSnapshot(step=40, total_steps=100, elapsed_s=60.0, reward=0.625, eval_reward=0.59,
                                  eval_greedy=0.75, eval_step=40, queue_depth=7))
    assert v.save_svg(tmp_path / "p.svg")
    svg = (tmp_path / "p.svg").read_text()
    # rich writes each text run as its own element with spaces as &#160;: compare the text without markup
    import html
    import re

    text = html.unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")
    assert svg.startswith("<svg") and "step 40/100" in text and "0.625" in text and "0.590" in text, text[:2000]
    assert "step 3/100" not in text
    assert v.save_svg(tmp_path / "missing-dir" / "p.svg") is False
