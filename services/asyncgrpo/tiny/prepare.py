"""`asyncgrpo prepare --out runs/tiny`: everything GRPO needs to start on a CPU, offline, in about a minute.

  1. OUT/init   a randomly initialised tiny Qwen2 checkpoint (asyncgrpo.tiny.build_tiny_model)
  2. OUT/task   the arithmetic task, train.jsonl + test.jsonl (asyncgrpo.tasks.arithmetic)
  3. OUT/warm   the warm-started policy (asyncgrpo.tiny.warm_start): GRPO's actor.path
  4. OUT/report.json   reward on test.jsonl before (init) and after (warm), sampled and greedy

Idempotent: a step is skipped when its output exists and was made with the same settings (each output
records its settings); when a step re-runs, every step after it re-runs too. --force redoes everything.
Outputs appear atomically (written beside, then renamed), so an interrupted run is simply re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from asyncgrpo.tiny.warm_start import WarmStartConfig

# Measured on a 2-core CPU, one thread, seed 0 (1-2 digit + and -; reward sampled at T=1 and greedy on the 500 test
# prompts: x 16 samples for 1500 and 1750 (2026-11-23), x 4 for the others (earlier code)):
#   steps  warm start  reward at T=1  greedy
#   1500     25 s         0.265        0.366   <- default: mostly mixed-reward groups, room for GRPO to show
#   1750     31 s         0.557        0.722      (the default before; GRPO gains half as much on it, docs/learning.md)
#   2000     34 s         0.57         0.69
#   3000     53 s         0.57         0.69   (cosine schedule over 3000 steps: the model's ceiling)
# The untrained model scores 0.00 (it never writes a '#### n' line). The outcome near 1500-1750 steps is sensitive
# to kernel rounding, so another CPU draws another warm start around these figures: at 1500 steps, x 4 samples, the
# AVX2 kernels give 0.259 / 0.366 and the AVX-512 ones 0.203 / 0.306 (same machine, ATEN_CPU_CAPABILITY=avx2 and
# MKL_ENABLE_INSTRUCTIONS=AVX2 against the default, 2026-12-02; float64 training diverges as much).
DEFAULTS = dict(preset="tiny", n_train=10000, n_test=500)  # the warm start's own defaults: WarmStartConfig


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _matches(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    return recorded is not None and all(recorded.get(k) == v for k, v in wanted.items())


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def step_model(out: Path, preset: str, seed: int, force: bool) -> bool:
    """Build OUT/init unless it exists with the same preset and seed. Returns True when it ran."""
    from asyncgrpo.tiny.model import build_tiny_model

    target = out / "init"
    if not force and _matches(_read_json(target / "asyncgrpo_tiny.json"), {"preset": preset, "seed": seed, "arch": "qwen2"}):
        _log(f"model: {target} exists (preset {preset}, seed {seed}); skipped")
        return False
    tmp = out / "init.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(tmp, preset=preset, arch="qwen2", seed=seed)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    _log(f"model: built {target} (preset {preset}, seed {seed})")
    return True


def step_task(out: Path, n_train: int, n_test: int, seed: int, answer_format: str, force: bool) -> bool:
    from asyncgrpo.tasks.arithmetic import ArithmeticSpec, write_task

    target = out / "task"
    spec = ArithmeticSpec(answer_format=answer_format)  # type: ignore[arg-type]
    wanted = {"n_train": n_train, "n_test": n_test, "seed": seed, "answer_format": answer_format,
              "ops": list(spec.ops), "min_digits": spec.min_digits, "max_digits": spec.max_digits}
    if not force and _matches(_read_json(target / "task.json"), wanted) and (target / "train.jsonl").exists() and (target / "test.jsonl").exists():
        _log(f"task: {target} exists; skipped")
        return False
    tmp = out / "task.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write_task(tmp, n_train=n_train, n_test=n_test, seed=seed, spec=spec)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    _log(f"task: wrote {target} ({n_train} train, {n_test} test, {answer_format})")
    return True


def step_warm(out: Path, cfg: Any, force: bool) -> tuple[bool, dict[str, Any]]:
    from asyncgrpo.tiny.warm_start import warm_start

    target = out / "warm"
    recorded = _read_json(target / "asyncgrpo_warm_start.json")
    if not force and recorded is not None and recorded.get("config") == asdict(cfg) and (target / "model.safetensors").exists():
        _log(f"warm start: {target} exists; skipped")
        return False, recorded
    _log(f"warm start: {cfg.steps} steps of batch {cfg.batch_size}, lr {cfg.lr} ...")
    res = warm_start(out / "init", out / "task" / "train.jsonl", target, cfg, log=_log)
    meta = _read_json(target / "asyncgrpo_warm_start.json") or {}
    _log(f"warm start: loss {res.first_loss:.3f} -> {res.final_loss:.3f} in {res.seconds:.1f}s (torch CPU kernels "
         f"{meta.get('cpu_capability')}: another kernel set ends at another warm start, docs/learning.md)")
    return True, meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/tiny", help="output directory (init/, task/, warm/, report.json)")
    parser.add_argument("--preset", default=DEFAULTS["preset"], choices=["tiny", "small", "base"], help="model size")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model init, the task and the warm start")
    parser.add_argument("--n-train", type=int, default=DEFAULTS["n_train"], help="training problems")
    parser.add_argument("--n-test", type=int, default=DEFAULTS["n_test"], help="test problems")
    parser.add_argument("--answer-format", default="gsm8k", choices=["gsm8k", "boxed"], help="'#### 42' or '\\boxed{42}' answers")
    parser.add_argument("--steps", type=int, default=WarmStartConfig.steps, help="warm-start optimizer steps")
    parser.add_argument("--batch-size", type=int, default=WarmStartConfig.batch_size, help="warm-start examples per step")
    parser.add_argument("--lr", type=float, default=WarmStartConfig.lr, help="warm-start peak learning rate")
    parser.add_argument("--eval-samples", type=int, default=4, help="completions sampled per test prompt")
    parser.add_argument("--eval-prompts", type=int, default=None, help="evaluate only the first N test prompts")
    parser.add_argument("--force", action="store_true", help="redo every step even if its output exists")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps results reproducible)")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from asyncgrpo.tiny.evaluate import EvalConfig, evaluate

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ran = step_model(out, args.preset, args.seed, args.force)
    ran = step_task(out, args.n_train, args.n_test, args.seed, args.answer_format, args.force or ran) or ran
    cfg = WarmStartConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    warm_ran, warm_meta = step_warm(out, cfg, args.force or ran)
    ran = warm_ran or ran

    fn = "boxed" if args.answer_format == "boxed" else "gsm8k"
    eval_cfg = EvalConfig(temperature=1.0, n_samples=args.eval_samples, max_prompts=args.eval_prompts, seed=args.seed, reward_fns=(fn,))
    eval_settings = json.loads(json.dumps(asdict(eval_cfg)))  # as stored: tuples become lists
    report_path = out / "report.json"
    report = _read_json(report_path)
    if args.force or ran or report is None or report.get("eval_config") != eval_settings:
        test = out / "task" / "test.jsonl"
        before, after = evaluate(out / "init", test, eval_cfg), evaluate(out / "warm", test, eval_cfg)
        report = {
            "reward_fn": fn, "eval_config": eval_settings,
            "before": {"reward": before.reward[fn], "greedy_reward": before.greedy_reward[fn], "finished_fraction": before.finished_fraction},
            "after": {"reward": after.reward[fn], "greedy_reward": after.greedy_reward[fn], "finished_fraction": after.finished_fraction,
                      "mean_completion_tokens": after.mean_completion_tokens, "examples": after.examples},
            "warm_start": {k: warm_meta.get(k) for k in ("seconds", "first_loss", "final_loss", "cpu_capability", "threads",
                                                          "mkl_enable_instructions", "config")},
            "paths": {"actor": str(out / "warm"), "train": str(out / "task" / "train.jsonl"), "test": str(out / "task" / "test.jsonl")},
        }
        tmp = report_path.with_name("report.json.tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, report_path)
    else:
        _log(f"evaluation: {report_path} is current; skipped")
    _log(f"reward ({fn}, temperature 1.0, {args.eval_samples} samples/prompt) before {report['before']['reward']:.3f} "
         f"-> after {report['after']['reward']:.3f}; greedy {report['before']['greedy_reward']:.3f} -> "
         f"{report['after']['greedy_reward']:.3f}; {time.perf_counter() - t0:.1f}s")
    print(json.dumps({k: report[k] for k in ("reward_fn", "before", "after", "warm_start", "paths")}, indent=1))
    return 0
