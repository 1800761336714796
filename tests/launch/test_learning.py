"""GRPO learns: README's main job, shortened, as a user runs it (`asyncgrpo prepare`, then `asyncgrpo up` with
every service a real process), must raise held-out accuracy significantly.

The measure is exact, not sampled. On the tiny task a right answer has one form (" 29-1=28 #### 28"), so
the probability that the policy samples it at T = 1 is the prompt's sampled accuracy. A teacher-forced forward
pass computes it (tiny.evaluate.solution_probabilities) with no sampling noise.

What is compared: the final model and the warm start, on the same 3,500 held-out prompts (the task's 500 test
prompts plus 3,000 more problems that are in neither split). The claim: the paired 95% interval of the mean
gain over prompts excludes 0.

Measured on 2 cores (docs/learning.md), on the 500 test prompts: 150-200 steps at lr 1e-4 gain +0.036 to
+0.041, with a paired half-width of 0.013-0.014; 3,500 prompts narrow it about 2.6-fold.

What fails it: a sign error in the advantages, weights that never reach the generation server, or log-probs
misaligned by a token. Each leaves the gain at or below 0, and the test prints the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asyncgrpo.launch.up import paired_gain
from asyncgrpo.tasks.arithmetic import ArithmeticSpec, make_problems, to_record
from asyncgrpo.tiny.evaluate import solution_probabilities

# prepare + 100 steps + the evaluations: about 3-6 minutes on 2 cores, more on a loaded machine than the default 600 s allow
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_arithmetic.yaml"
STEPS = 100
EXTRA_HELD_OUT = 3000


def _cli(*args: str, timeout: float) -> str:
    p = subprocess.run([sys.executable, "-m", "asyncgrpo.cli", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"asyncgrpo {args[0]} exited {p.returncode}:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_grpo_raises_held_out_accuracy_significantly(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    _cli("prepare", "--out", str(tiny), "--eval-prompts", "10", timeout=900)  # README's warm start (seed 0)
    train, test = _records(tiny / "task" / "train.jsonl"), _records(tiny / "task" / "test.jsonl")
    seen = {r["prompt"].removeprefix("Q: ").split("=?")[0] for r in train + test}
    extra = [to_record(f"extra-{i}", a, op, b, "gsm8k")
             for i, (a, op, b) in enumerate(make_problems(EXTRA_HELD_OUT, seed=7, spec=ArithmeticSpec(), exclude=seen))]
    held_out = test + extra
    assert not {r["prompt"] for r in held_out} & {r["prompt"] for r in train}

    run_dir = tmp_path / "run"
    out = _cli("up", "--config", str(EXAMPLE), "--steps", str(STEPS), "--run-dir", str(run_dir), "--no-live",
               f"--actor.path={tiny / 'warm'}", f"--train_dataset.path={tiny / 'task' / 'train.jsonl'}",
               "--optimizer.lr=1e-4", "--evaluator.freq_steps=0", "--evaluator.prompts=200", "--evaluator.samples=4",
               timeout=1200)
    final = run_dir / "hf" / f"version_{STEPS}"
    assert final.is_dir(), out[-3000:]

    prompts, solutions = [r["prompt"] for r in held_out], [r["solution"] for r in held_out]
    before = solution_probabilities(tiny / "warm", prompts, solutions)
    after = solution_probabilities(final, prompts, solutions)
    gain = paired_gain(before, after)
    sampled = json.loads((run_dir / "eval.json").read_text())["gain"]
    report = (f"exact held-out accuracy on {len(prompts)} prompts: {sum(before) / len(before):.4f} -> "
              f"{sum(after) / len(after):.4f}, paired gain {gain['mean']:+.4f} +- {gain['ci95']:.4f}; up's sampled "
              f"evaluation (200 x 4): {sampled['sampled']['mean']:+.3f} +- {sampled['sampled']['ci95']:.3f}, greedy "
              f"{sampled['greedy']['mean']:+.3f} +- {sampled['greedy']['ci95']:.3f}")
    assert gain["mean"] - gain["ci95"] > 0, "no significant gain: " + report + "\n" + out[-3000:]
    # greedy answers must not get significantly worse (a collapse shows there first)
    assert sampled["greedy"]["mean"] + sampled["greedy"]["ci95"] > 0, "greedy accuracy fell: " + report
    print(report)
