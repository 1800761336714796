"""genserver throughput on CPU: output tokens/s of the tiny model at 1, 8 and 32 concurrent requests.

    python benchmarks/genserver_throughput.py [--model DIR] [--requests-per-level 32] [--max-new-tokens 64]
                                              [--append docs/benchmarks.md]

Starts one `asyncgrpo genserver` process (1 torch thread) on the given HF checkpoint, or on a freshly
built tiny model, and drives it through the project's SGLang client with closed-loop workers: each of C
workers sends its next request as soon as the last one returns. Every request decodes exactly
max_new_tokens (ignore_eos), sampled at T=1 with log-probs, so tokens/s = all output tokens / wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from asyncgrpo.sglang.client import SGLangClient

PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]


async def level(url: str, concurrency: int, n_requests: int, max_new: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, output tokens per scheduler step) for n_requests spread over `concurrency` closed-loop workers."""
    todo = list(range(n_requests))
    tokens = 0

    async def worker(c: SGLangClient) -> None:
        nonlocal tokens
        while todo:
            i = todo.pop()
            r = await c.generate(PROMPT, {"max_new_tokens": max_new, "ignore_eos": True, "sampling_seed": i})
            tokens += len(r.output_ids)

    async with SGLangClient(url, timeout_s=600) as c:
        before = (await c.server_info())["internal_states"][0]
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(c) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
        after = (await c.server_info())["internal_states"][0]
    steps = max(1, after["steps"] - before["steps"])
    return tokens / wall, tokens, (after["tokens"] - before["tokens"]) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: build the tiny model)")
    ap.add_argument("--levels", default="1,8,32", help="concurrency levels")
    ap.add_argument("--requests-per-level", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--append", default=None, help="append the table to this markdown file")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from asyncgrpo.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tmp.name) / "tiny", preset="tiny", seed=0))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generation_paths import genserver  # one way to start a benchmark's genserver

    try:
        with genserver(model) as (_, url):
            asyncio.run(level(url, 4, 4, 8))  # warm-up
            rows = []
            for c in [int(x) for x in args.levels.split(",")]:
                n = max(args.requests_per_level, c)
                tps, toks, batch = asyncio.run(level(url, c, n, args.max_new_tokens))
                rows.append((c, n, toks, tps, batch))
                print(f"concurrency {c:>3}: {toks} tokens, {tps:8.1f} tokens/s, {batch:.1f} tokens per step", flush=True)
    finally:
        tmp.cleanup()

    date = dt.date.today().isoformat()
    cpus = os.cpu_count()
    lines = [
        f"\n## genserver throughput ({date}, 2-core CPU ({platform.machine()}, {cpus} CPUs), 1 torch thread, fp32, "
        f"{'tiny model' if args.model is None else args.model})\n",
        "| concurrency | requests | tokens/request | output tokens | tokens/s | tokens per step |",
        "|---|---|---|---|---|---|",
        *[f"| {c} | {n} | {args.max_new_tokens} | {t} | {tps:.1f} | {b:.1f} |" for c, n, t, tps, b in rows],
        f"\n`python benchmarks/genserver_throughput.py --requests-per-level {args.requests_per_level} "
        f"--max-new-tokens {args.max_new_tokens}`; closed-loop clients through asyncgrpo.sglang.client, T=1, "
        "log-probs on, ignore_eos.\n",
    ]
    print("\n".join(lines))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
