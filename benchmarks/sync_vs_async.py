"""Synchronous vs asynchronous GRPO on the same workload, side by side, with the ideal overlap bound.

    python benchmarks/sync_vs_async.py [--config examples/tiny_arithmetic.yaml] [--steps 60] [--pairs 3]
                                       [--offpolicyness 2] [--append docs/benchmarks.md]

Runs `asyncgrpo up` with rollout.max_head_offpolicyness = 0 (generation waits for each new version:
generation and training alternate) and = --offpolicyness (they overlap), same seed and config otherwise,
in interleaved pairs (the order flips every pair, so a drift of the machine hits both). From each run:
wall-clock seconds per step and per trained sample (steps after the first --skip, from metrics.jsonl), groups
dropped as stale, and the final held-out accuracy (`up`'s before -> after evaluation).

The bound: generation alone and training alone per batch, measured from the same runs' own parts.
  train  = the trainer's compute per step (metrics.jsonl step_time_s: recompute, loss, backward, optimizer)
  gen    = seconds the generation server needs for the groups one trained batch costs, measured alone: a
           genserver on the same model generating that many groups the way the rollout asks (one request
           of n = G per group, the rollout's concurrency), with nothing else running
  sync ~ gen + train, ideal async ~ max(gen, train); reported: ideal / measured for the async runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_up(config: str, steps: int, bound: int, run_dir: Path, overrides: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "asyncgrpo.cli", "up", "--config", config, "--steps", str(steps), "--run-dir",
           str(run_dir), "--no-live", "--evaluator.freq_steps=0", f"--rollout.max_head_offpolicyness={bound}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["version"]] = r
    m = re.search(r"sampled ([\d.]+) -> ([\d.]+).*greedy ([\d.]+) -> ([\d.]+)", out.stdout)
    rollout_done = [line for line in (run_dir / "logs" / "rollout.log").read_text().splitlines() if "rollout done:" in line]
    pushed = filtered = None
    if rollout_done:
        g = re.search(r"(\d+) groups pushed, (\d+) filtered", rollout_done[-1])
        pushed, filtered = (int(g.group(1)), int(g.group(2))) if g else (None, None)
    return {"rows": rows, "final_sampled": float(m.group(2)) if m else float("nan"),
            "final_greedy": float(m.group(4)) if m else float("nan"), "pushed": pushed, "filtered": filtered}


def per_step(rows: dict[int, dict], skip: int) -> float:
    vs = sorted(rows)
    a, b = rows[vs[skip]], rows[vs[-1]]
    return (b["time"] - a["time"]) / (vs[-1] - vs[skip])


def gen_alone(model: str, data: str, groups: int, g: int, concurrency: int, max_new: int, rounds: int = 3) -> float:
    """Median seconds for `groups` groups of g through one genserver, the rollout's way, nothing else running."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import generation_paths as gp  # the same request path and server start as that benchmark

    from transformers import AutoTokenizer

    from asyncgrpo.sglang.client import SGLangClient

    gp.MAX_NEW = max_new
    tok = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(line)["prompt"] for line in Path(data).read_text().splitlines()[: groups * (rounds + 1)]]
    times: list[float] = []
    with gp.genserver(model) as (_, url):
        async def go() -> None:
            async with SGLangClient(url) as client:
                for r in range(rounds + 1):
                    ids = [list(tok.encode(t, add_special_tokens=False)) for t in texts[r * groups: (r + 1) * groups]]
                    t0 = time.perf_counter()
                    await gp._round(client, ids, g, concurrency, "parallel", f"gen{r}")
                    if r:
                        times.append(time.perf_counter() - t0)

        asyncio.run(go())
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/tiny_arithmetic.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="steps left out of the pace (start-up, first versions)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--offpolicyness", type=int, default=2)
    ap.add_argument("--append", default=None)
    ap.add_argument("overrides", nargs="*", help="dotted overrides for both runs, e.g. --actor.group_size=16")
    a, extra = ap.parse_known_args()
    overrides = [*a.overrides, *extra]
    cfg = yaml.safe_load((ROOT / a.config).read_text())
    batch, g = cfg["train_dataset"]["batch_size"], cfg["actor"]["group_size"]
    work = Path(tempfile.mkdtemp(prefix="sync_vs_async."))
    runs: dict[int, list[dict]] = {0: [], a.offpolicyness: []}
    for i in range(a.pairs):
        order = [0, a.offpolicyness] if i % 2 == 0 else [a.offpolicyness, 0]
        for bound in order:
            res = run_up(a.config, a.steps, bound, work / f"pair{i}_bound{bound}", overrides)
            res["per_step"] = per_step(res["rows"], a.skip)
            runs[bound].append(res)
            print(f"pair {i} bound {bound}: {res['per_step']:.3f} s/step, stale "
                  f"{res['rows'][max(res['rows'])].get('groups_dropped_stale_total')}, final {res['final_sampled']:.3f}",
                  flush=True)
    all_rows = [r for rs in runs.values() for res in rs for v, r in res["rows"].items() if v > a.skip]
    train = statistics.median(r["step_time_s"] for r in all_rows)
    # groups generated per trained batch: dynamic filtering drops all-equal groups after generating them
    gen_per_batch = statistics.median((res["pushed"] + res["filtered"]) / a.steps
                                      for rs in runs.values() for res in rs if res["pushed"])
    gen_groups = round(gen_per_batch)
    gen = gen_alone(cfg["actor"]["path"], cfg["train_dataset"]["path"], gen_groups, g,
                    cfg["rollout"].get("max_concurrent_rollouts", 64), cfg["rollout"].get("max_new_tokens", 256))
    ideal_sync, ideal_async = gen + train, max(gen, train)
    lines = ["| bound | s/step (median of pairs) | ms per trained sample | stale drops / run | final held-out sampled / greedy | ideal / measured |",
             "|---|---|---|---|---|---|"]
    for bound, rs in runs.items():
        s = statistics.median(r["per_step"] for r in rs)
        stale = statistics.median(r["rows"][max(r["rows"])].get("groups_dropped_stale_total", 0) for r in rs)
        fs = statistics.mean(r["final_sampled"] for r in rs)
        fg = statistics.mean(r["final_greedy"] for r in rs)
        ideal = ideal_sync if bound == 0 else ideal_async
        lines.append(f"| {bound} | {s:.3f} | {1000 * s / (batch * g):.2f} | {stale:.0f} | {fs:.3f} / {fg:.3f} | "
                     f"{ideal / s:.2f} |")
    sync_s = statistics.median(r["per_step"] for r in runs[0])
    async_s = statistics.median(r["per_step"] for r in runs[a.offpolicyness])
    summary = (f"generation alone {gen:.3f} s for the {gen_groups} groups one batch costs (filtering included), training "
               f"alone {train:.3f} s/step: ideal sync {ideal_sync:.3f}, ideal async {ideal_async:.3f} s/step. Async is "
               f"{sync_s / async_s:.2f}x sync; it reaches {ideal_async / async_s:.2f} of the ideal overlap bound.")
    table = "\n".join(lines)
    print(table + "\n" + summary)
    if a.append:
        cpu = platform.processor() or platform.machine()
        with open(ROOT / a.append, "a") as f:
            f.write(f"\n## Sync vs async ({dt.date.today()}, {os.cpu_count()}-core CPU ({cpu}), {a.config}, "
                    f"{a.steps} steps x {a.pairs} interleaved pairs)\n\n{table}\n\n{summary}\n\n"
                    f"`python benchmarks/sync_vs_async.py --config {a.config} --steps {a.steps} --pairs {a.pairs} "
                    f"--offpolicyness {a.offpolicyness} {' '.join(overrides)}`; pace over steps {a.skip}..{a.steps} "
                    "from metrics.jsonl; final accuracy: `up`'s before -> after evaluation (200 prompts x 4), mean of runs.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
