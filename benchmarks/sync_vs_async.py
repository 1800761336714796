"""Synchronous vs asynchronous GRPO on the same workload, side by side, with the ideal overlap bound.

    python benchmarks/sync_vs_async.py [--config examples/tiny_arithmetic.yaml] [--steps 60] [--pairs 3]
                                       [--offpolicyness 2] [--append docs/benchmarks.md]

Runs `asyncgrpo up` with rollout.max_head_offpolicyness = 0 (generation waits for each new version:
generation and training alternate) and = --offpolicyness (they overlap), same seed and config otherwise,
in interleaved pairs (the order flips every pair, so a drift of the machine hits both). From each run:
wall-clock seconds per step and per trained sample (steps after the first --skip, from metrics.jsonl), groups
dropped as stale, and the final held-out accuracy (`up`'s before -> after evaluation).

The bound: generation alone and training alone per batch, measured from the same runs' own parts.
  train  = the trainer's compute per step in the sync run, where generation waits for it (metrics.jsonl
           step_time_s: loss forward, backward, optimizer)
  gen    = seconds the generation server needs for the groups one trained batch costs, measured alone: a
           genserver on the same model generating that many groups the way the rollout asks (one request
           of n = G per group, the rollout's concurrency), with nothing else running
  sync ~ gen + train, ideal async ~ max(gen, train); reported: ideal / measured, each pair against the parts
  measured right after it (a shared machine drifts), and the CPU seconds per step of each service.
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
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


SERVICES = ("genserver", "rollout", "trainer", "weight-sync", "control", "up")
CLK_TCK = os.sysconf("SC_CLK_TCK")
_SERVICE_ARGS = {s.encode() for s in SERVICES}


def _processes() -> dict[int, tuple[int, str | None, float]]:
    """pid -> (ppid, the service its command line names or None, CPU seconds so far) of every process."""
    out: dict[int, tuple[int, str | None, float]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... utime(11) stime(12)
        name = next((a.decode() for a in argv if a in _SERVICE_ARGS), None)
        if any(b"redis-server" in a for a in argv):
            name = "redis"
        out[int(p.name)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def _cpu_by_pid(root_pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (service, CPU seconds so far) of `up` and everything under it: a process counts for the nearest
    ancestor (or itself) whose command line names a service (torchrun's ranks for the trainer, say)."""
    procs = _processes()
    out: dict[int, tuple[str, float]] = {}
    for pid, (_, _, cpu) in procs.items():
        name, cur, seen = None, pid, 0
        while cur in procs and seen < 64:  # walk up to `up`
            ppid, own, _ = procs[cur]
            name = name or own
            if cur == root_pid:
                out[pid] = (name or "other", cpu)
                break
            cur, seen = ppid, seen + 1
    return out


def _cpu_per_step(first: tuple[int, dict[int, tuple[str, float]]], last: tuple[int, dict[int, tuple[str, float]]]
                  ) -> dict[str, float]:
    """CPU seconds per step by service between two samples, over the processes alive at both."""
    (n0, c0), (n1, c1) = first, last
    out: dict[str, float] = {}
    for pid, (name, cpu) in c1.items():
        if pid in c0:
            out[name] = out.get(name, 0.0) + (cpu - c0[pid][1]) / (n1 - n0)
    return out


def run_up(config: str, steps: int, bound: int, run_dir: Path, overrides: list[str], skip: int) -> dict[str, float]:
    """One `up` run; also the CPU seconds per trained step of each service between step `skip` and the end
    (sampled from /proc every 0.25 s, so a slow service shows whether the machine's cores were the limit)."""
    cmd = [sys.executable, "-m", "asyncgrpo.cli", "up", "--config", config, "--steps", str(steps), "--run-dir",
           str(run_dir), "--no-live", "--evaluator.freq_steps=0", f"--rollout.max_head_offpolicyness={bound}", *overrides]
    metrics = run_dir / "metrics.jsonl"
    samples: list[tuple[int, dict[int, tuple[str, float]]]] = []  # (steps logged, CPU so far by process)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) as proc:
        def sample() -> None:
            n, offset = 0, 0
            while proc.poll() is None:
                if metrics.exists():  # count the rows added since the last look, not the whole file again
                    with metrics.open("rb") as f:
                        f.seek(offset)
                        chunk = f.read()
                    n, offset = n + chunk.count(b"\n"), offset + len(chunk)
                if skip <= n < steps:
                    samples.append((n, _cpu_by_pid(proc.pid)))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        sampler.join()
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    cpu = _cpu_per_step(samples[0], samples[-1]) if len(samples) >= 2 and samples[-1][0] > samples[0][0] else {}
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
            "final_greedy": float(m.group(4)) if m else float("nan"), "pushed": pushed, "filtered": filtered, "cpu": cpu}


def per_step(rows: dict[int, dict], skip: int) -> float:
    vs = sorted(rows)
    a, b = rows[vs[skip]], rows[vs[-1]]
    return (b["time"] - a["time"]) / (vs[-1] - vs[skip])


def gen_alone(model: str, data: str, groups: int, g: int, concurrency: int, max_new: int, decode_steps: int,
              rounds: int = 3) -> float:
    """Median seconds for `groups` groups of g through one genserver started as `up` starts it, the rollout's
    way, nothing else running."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import generation_paths as gp  # the same request path and server start as that benchmark

    from transformers import AutoTokenizer

    from asyncgrpo.sglang.client import SGLangClient

    gp.MAX_NEW = max_new
    tok = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(line)["prompt"] for line in Path(data).read_text().splitlines()[: groups * (rounds + 1)]]
    times: list[float] = []
    with gp.genserver(model, "--num-continuous-decode-steps", str(decode_steps)) as (_, url):
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
    from asyncgrpo.config import load_config

    cfg = load_config([ROOT / a.config], overrides)  # resolved as `up` resolves it: the parts run the same way
    batch, g = cfg.train_dataset.batch_size, cfg.actor.group_size
    work = Path(tempfile.mkdtemp(prefix="sync_vs_async."))
    runs: dict[int, list[dict]] = {0: [], a.offpolicyness: []}
    parts: list[dict[str, float]] = []  # per pair: generation alone and training alone, measured beside its runs
    for i in range(a.pairs):
        order = [0, a.offpolicyness] if i % 2 == 0 else [a.offpolicyness, 0]
        pair = []
        for bound in order:
            res = run_up(a.config, a.steps, bound, work / f"pair{i}_bound{bound}", overrides, a.skip)
            res["per_step"] = per_step(res["rows"], a.skip)
            runs[bound].append(res)
            pair.append(res)
            print(f"pair {i} bound {bound}: {res['per_step']:.3f} s/step, stale "
                  f"{res['rows'][max(res['rows'])].get('groups_dropped_stale_total')}, final {res['final_sampled']:.3f}",
                  flush=True)
        # The bound of this pair, measured right after it: a shared machine's speed drifts by more than the effect
        # over the minutes of a benchmark, so each pair is compared with its own parts.
        # training alone: the sync run's steps, during which generation waits (in the async run it shares the cores)
        train = statistics.median(r["step_time_s"] for v, r in runs[0][-1]["rows"].items() if v > a.skip)
        # groups generated per trained batch: dynamic filtering drops all-equal groups after generating them
        counted = [(res["pushed"] + res["filtered"]) / a.steps for res in pair if res["pushed"] is not None]
        if not counted:
            raise SystemExit(f"pair {i}: no run logged 'rollout done: N groups pushed, M filtered'; see {work}")
        groups = round(statistics.median(counted))
        gen = gen_alone(cfg.actor.path, cfg.train_dataset.path, groups, g, cfg.rollout.max_concurrent_rollouts,
                        cfg.rollout.max_new_tokens, cfg.launch.num_continuous_decode_steps)
        parts.append({"gen": gen, "train": train, "groups": groups, 0: gen + train, a.offpolicyness: max(gen, train)})
        print(f"pair {i}: generation alone {gen:.3f} s for {groups} groups, training alone {train:.3f} s/step", flush=True)
    lines = ["| bound | s/step (median of pairs) | ms per trained sample | stale drops / run | final held-out sampled / greedy "
             "| ideal / measured (median of pairs) |", "|---|---|---|---|---|---|"]
    fraction: dict[int, float] = {}
    for bound, rs in runs.items():
        s = statistics.median(r["per_step"] for r in rs)
        stale = statistics.median(r["rows"][max(r["rows"])].get("groups_dropped_stale_total", 0) for r in rs)
        fs = statistics.mean(r["final_sampled"] for r in rs)
        fg = statistics.mean(r["final_greedy"] for r in rs)
        fraction[bound] = statistics.median(p[bound] / r["per_step"] for p, r in zip(parts, rs, strict=True))
        lines.append(f"| {bound} | {s:.3f} | {1000 * s / (batch * g):.2f} | {stale:.0f} | {fs:.3f} / {fg:.3f} | "
                     f"{fraction[bound]:.2f} |")
    sync_s = statistics.median(r["per_step"] for r in runs[0])
    async_s = statistics.median(r["per_step"] for r in runs[a.offpolicyness])
    gen, train = statistics.median(p["gen"] for p in parts), statistics.median(p["train"] for p in parts)
    groups = statistics.median(p["groups"] for p in parts)
    summary = (f"generation alone {gen:.3f} s for the {groups:.0f} groups one batch costs (filtering included), "
               f"training alone {train:.3f} s/step (medians of the pairs'): ideal sync {gen + train:.3f}, ideal async "
               f"{max(gen, train):.3f} s/step. Async is {sync_s / async_s:.2f}x sync; it reaches "
               f"{fraction[a.offpolicyness]:.2f} of the ideal overlap bound (per pair: "
               + ", ".join(f"{p[a.offpolicyness] / r['per_step']:.2f}" for p, r in zip(parts, runs[a.offpolicyness], strict=True))
               + ").")
    # Where the CPU went: if the services' CPU per step, spread over every core, is close to the measured pace, the
    # cores were the limit (the parts compete for them), not waiting.
    cores = os.cpu_count() or 1
    lines += ["", "| bound | CPU s per step: " + " / ".join(SERVICES[:4]) + " / other | total | total / cores "
              "(the pace if every core were busy) | measured / that |", "|---|---|---|---|---|"]
    for bound, rs in runs.items():
        cpus = [r["cpu"] for r in rs if r["cpu"]]
        if not cpus or not sum(sum(c.values()) for c in cpus):
            continue
        med = {k: statistics.median(c.get(k, 0.0) for c in cpus) for k in {k for c in cpus for k in c}}
        other = sum(v for k, v in med.items() if k not in SERVICES[:4])
        total = sum(med.values())
        s = statistics.median(r["per_step"] for r in rs)
        lines.append(f"| {bound} | " + " / ".join(f"{med.get(k, 0.0):.3f}" for k in SERVICES[:4]) +
                     f" / {other:.3f} | {total:.3f} | {total / cores:.3f} | {s / (total / cores):.2f} |")
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
