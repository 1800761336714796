"""Reward server batching on CPU: scored sequences/s with batching off (--max-batch-size 1) and on (32), side by
side in one run, under the same closed-loop load (C concurrent clients, one completion per request, as the
rollout's ORM reward sends them).

    python benchmarks/reward_server_batching.py [--backbone DIR] [--preset small] [--requests 256] [--clients 32]
                                               [--append docs/benchmarks.md]

Builds an ORM head (random, seeded: the scores' values do not matter here) on the given backbone or on a fresh
tiny model of --preset, starts one `asyncgrpo reward-server` per setting (1 torch thread each, one at a time) and
reports sequences/s and the ratio batched / unbatched.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TEXT = "Q: {a}+{b}=?\nA: {a}+{b}={c} #### {c}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, n: int, clients: int) -> float:
    todo = list(range(n))

    async def worker(c: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop()
            r = await c.post(f"{url}/classify", json={"text": TEXT.format(a=i % 97, b=i % 13, c=i % 97 + i % 13)})
            r.raise_for_status()

    async with httpx.AsyncClient(timeout=600) as c:
        await c.post(f"{url}/classify", json={"text": "warm up"})
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        return n / (time.perf_counter() - t0)


def serve(model: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "asyncgrpo.cli", "reward-server", "--model", str(model), "--port",
                          str(port), "--max-batch-size", str(max_batch), "--threads", "1"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return p, url
        except httpx.HTTPError:
            time.sleep(0.3)
    p.kill()
    raise SystemExit(f"reward-server on {url} did not come up")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None, help="HF causal LM dir for the ORM's backbone (default: a fresh tiny model)")
    ap.add_argument("--preset", default="small", help="tiny-model preset when no --backbone is given")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--append", default=None, help="append the table to this markdown file")
    args = ap.parse_args()

    from asyncgrpo.tiny import build_tiny_model
    from asyncgrpo.tiny.reward_model import build_reward_model

    tmp = Path(tempfile.mkdtemp())
    backbone = Path(args.backbone) if args.backbone else build_tiny_model(tmp / "lm", preset=args.preset, seed=0)
    rm = build_reward_model(backbone, tmp / "rm", seed=0)
    rates = {}
    for max_batch in (1, 32):
        p, url = serve(rm, max_batch)
        try:
            rates[max_batch] = asyncio.run(load(url, args.requests, args.clients))
        finally:
            p.terminate()
            p.wait(30)
    what = args.backbone or f"tiny model preset {args.preset}"
    table = (f"\n## reward server batching ({dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, 1 torch "
             f"thread, fp32, ORM on {what})\n\n"
             "| clients | requests | max batch 1 seqs/s | max batch 32 seqs/s | batched / unbatched |\n|---|---|---|---|---|\n"
             f"| {args.clients} | {args.requests} | {rates[1]:.1f} | {rates[32]:.1f} | {rates[32] / rates[1]:.2f} |\n\n"
             f"`python benchmarks/reward_server_batching.py --preset {args.preset} --requests {args.requests} "
             f"--clients {args.clients}`; one completion per request, as the rollout's ORM reward sends them.\n")
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
