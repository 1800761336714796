"""The genserver under the rollout's steady load: groups per second with C groups always in flight, for several
values of --num-continuous-decode-steps, side by side.

    python benchmarks/genserver_streaming.py [--model runs/tiny/warm] [--data runs/tiny/task/train.jsonl]
        [--steps 1,3] [--rounds 2] [--concurrency 32] [--group-size 8] [--warmup-s 5] [--window-s 20]
        [--append docs/benchmarks.md]

Unlike generation_paths.py, which sends a batch of groups at once and waits for all of them, this keeps the
rollout's shape: each of --concurrency workers sends its next group (one request, n = group size, T=1,
max_new_tokens 32, eos ends a completion) as soon as the last one returns, so groups join a running batch at
every step. Counted: groups finished in the window after a warm-up, the genserver's CPU (from /proc) and its
prefill and decode-step counts (/server_info). Settings interleave round by round (a fresh genserver each) so
the machine's drift hits all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation_paths as gp  # noqa: E402 - the same genserver start as that benchmark
from bench_models import append_markdown  # noqa: E402

from asyncgrpo.sglang.client import SGLangClient  # noqa: E402


async def _steady(url: str, prompts: list[list[int]], g: int, concurrency: int, warmup_s: float,
                  window_s: float) -> tuple[float, dict]:
    """Groups per second over the window, and the server's counters at the end."""
    finished: list[float] = []
    todo = itertools.cycle(prompts)
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": gp.MAX_NEW}
    t0 = time.perf_counter()
    end = t0 + warmup_s + window_s
    async with SGLangClient(url) as client:
        async def worker() -> None:
            while time.perf_counter() < end:
                await client.generate_n(next(todo), params, g)
                finished.append(time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        info = (await client.server_info())["internal_states"][0]
    n = sum(1 for t in finished if t0 + warmup_s <= t < t0 + warmup_s + window_s)
    return n / window_s, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/tiny/warm")
    ap.add_argument("--data", default="runs/tiny/task/train.jsonl")
    ap.add_argument("--steps", default="1,3", help="values of --num-continuous-decode-steps to compare")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--warmup-s", type=float, default=5.0)
    ap.add_argument("--window-s", type=float, default=20.0)
    ap.add_argument("--append", default=None)
    a = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    texts = [json.loads(line)["prompt"] for line in Path(a.data).read_text().splitlines()]
    prompts = [list(tok.encode(t, add_special_tokens=False)) for t in texts]
    settings = [int(x) for x in a.steps.split(",")]
    res: dict[int, list[tuple[float, float, float]]] = {n: [] for n in settings}
    for r in range(a.rounds):
        for n in settings if r % 2 == 0 else settings[::-1]:
            with gp.genserver(a.model, "--num-continuous-decode-steps", str(n)) as (srv, url):
                c0 = gp._proc_cpu_s(srv.pid)
                gps, info = asyncio.run(_steady(url, prompts, a.group_size, a.concurrency, a.warmup_s, a.window_s))
                cores = (gp._proc_cpu_s(srv.pid) - c0) / (a.warmup_s + a.window_s)
            res[n].append((gps, cores, info["prefills"] / max(1, info["steps"])))
            print(f"round {r} decode steps {n}: {gps:.1f} groups/s, genserver {cores:.2f} cores, "
                  f"{info['prefills']} prefills / {info['steps']} decode steps", flush=True)
    base = statistics.median(x[0] for x in res[settings[0]])
    lines = ["| --num-continuous-decode-steps | groups/s (median of rounds) | per round | genserver cores | "
             f"prefills per decode step | / {settings[0]} |", "|---|---|---|---|---|---|"]
    for n, rows in res.items():
        gps = statistics.median(x[0] for x in rows)
        lines.append(f"| {n} | {gps:.1f} | {', '.join(f'{x[0]:.1f}' for x in rows)} | "
                     f"{statistics.median(x[1] for x in rows):.2f} | {statistics.median(x[2] for x in rows):.2f} | "
                     f"{gps / base:.2f} |")
    cpu = platform.processor() or platform.machine()
    append_markdown(a.append, (
        f"\n## genserver under a steady load ({dt.date.today()}, {os.cpu_count()}-core CPU ({cpu}), 1 torch thread, "
        f"fp32, {Path(a.model).name})\n\n" + "\n".join(lines) + "\n\n`python benchmarks/genserver_streaming.py "
        f"--model {a.model} --data {a.data} --steps {a.steps} --rounds {a.rounds} --concurrency {a.concurrency} "
        f"--group-size {a.group_size}`: {a.concurrency} groups of {a.group_size} always in flight, {a.window_s:g} s "
        f"counted after {a.warmup_s:g} s.\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
