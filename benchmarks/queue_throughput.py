"""Queue throughput: scored groups (G = 16, 512-token completions) pushed and consumed per second through
asyncgrpo.queue, next to redis-benchmark on the same server with the same payload size, as a ratio.

    python benchmarks/queue_throughput.py [--groups 1000] [--append docs/benchmarks.md]

Starts a private redis-server on a unix socket (no persistence) unless --socket is given. One client, no
pipelining, on both sides: push = encode + one Lua call (idempotency check, XADD, lease, counters);
consume = XREADGROUP of 16 + decode + the step commit (version, trained count, XACK/XDEL in one script).
The baselines are redis-benchmark's XADD and SET with a value of the encoded group's size (-c 1, no pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from asyncgrpo.queue import Completion, Group, GroupQueue, PromptRef, encode_group, make_redis


def make_group(run_id: str, i: int, g: int, n: int, rng: random.Random) -> Group:
    comps = []
    for _ in range(g):
        split = n // 2
        comps.append(Completion(output_ids=[rng.randrange(150_000) for _ in range(n)],
                                logprobs=[-rng.random() * 5 for _ in range(n)],
                                version_spans=[("3", 0, split), ("4", split, n)], finish_reason="length",
                                reward=float(rng.random() < 0.5), reward_details={"gsm8k": 1.0}, started_at=1.0, finished_at=2.0))
    ref = PromptRef(0, i, 0)
    return Group(run_id=run_id, group_id=ref.group_id(), prompt_id=f"q{i}", epoch=0, position=i, attempt=0,
                 prompt_ids=list(range(200)), completions=comps, answer="42")


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server not found (apt-get install redis-server)")
    sock = workdir / "redis.sock"
    proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("redis-server did not start")
        time.sleep(0.02)
    return proc, str(sock)


def redis_benchmark(sock: str, n: int, size: int) -> dict[str, float]:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return {}
    out: dict[str, float] = {}
    res = subprocess.run([exe, "-s", sock, "-c", "1", "-P", "1", "-n", str(n), "-d", str(size), "-t", "set", "--csv"],
                         capture_output=True, text=True, check=True)
    for line in res.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] == "SET":
            out["SET"] = float(cells[1])
    payload = "x" * size  # one argv string: fits Linux's 128 KiB per-argument limit for sizes up to that
    res = subprocess.run([exe, "-s", sock, "-c", "1", "-P", "1", "-n", str(n), "--csv", "XADD", "bench:xadd", "MAXLEN",
                          "~", "1000", "*", "g", payload], capture_output=True, text=True, check=True)
    for line in res.stdout.splitlines()[1:]:
        cells = [c.strip('"') for c in line.split(",")]
        out["XADD"] = float(cells[1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=1000, help="groups pushed and consumed")
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per completion")
    ap.add_argument("--socket", default=None, help="an existing redis-server's unix socket (default: start one)")
    ap.add_argument("--append", default=None, help="append a row to this markdown file (docs/benchmarks.md)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    proc = None
    sock = args.socket
    if sock is None:
        proc, sock = start_redis(Path(tmp.name))
    try:
        r = make_redis(f"unix://{sock}")
        run_id = f"bench/q{os.getpid()}"
        rng = random.Random(0)
        # distinct groups (ids differ; content reused) so every push is a real append, not an idempotent no-op
        protos = [make_group(run_id, i, args.group_size, args.tokens, rng) for i in range(8)]
        size = len(encode_group(protos[0]))
        q = GroupQueue(r, run_id)
        q.ensure_consumer_group()

        t0 = time.perf_counter()
        for i in range(args.groups):
            g = protos[i % len(protos)]
            g.group_id = PromptRef(0, i, 0).group_id()
            q.push(g)
        push_s = time.perf_counter() - t0

        got = 0
        t0 = time.perf_counter()
        while got < args.groups:
            batch = q.consume("bench", count=16)
            # what the trainer does per step without checkpoints: version, trained count and the ack in one script
            q.commit_step([m for m, _ in batch], got // 16 + 1, got + len(batch), 0, ack=True)
            got += len(batch)
        consume_s = time.perf_counter() - t0
        for k in q.keys.all():
            r.delete(k)

        base = redis_benchmark(sock, min(args.groups * 2, 20000), size)
        res = {
            "group_size": args.group_size, "tokens": args.tokens, "message_bytes": size, "groups": args.groups,
            "push_groups_per_s": round(args.groups / push_s, 1), "consume_groups_per_s": round(args.groups / consume_s, 1),
            "redis_benchmark_xadd_per_s": base.get("XADD"), "redis_benchmark_set_per_s": base.get("SET"),
        }
        if base.get("XADD"):
            res["push_vs_xadd"] = round(res["push_groups_per_s"] / base["XADD"], 3)
            res["consume_vs_xadd"] = round(res["consume_groups_per_s"] / base["XADD"], 3)
        print(json.dumps(res, indent=2))
        if args.append:
            p = Path(args.append)
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("# Benchmarks\n\nOne row per measurement; newest last.\n\n")
            with p.open("a") as f:
                f.write(
                    f"\n## queue throughput ({time.strftime('%Y-%m-%d', time.gmtime())}, {platform.machine()}, "
                    f"{os.cpu_count()} CPUs, redis-server unix socket, 1 client)\n\n"
                    "| G | tokens | message | push groups/s | consume groups/s | redis-benchmark XADD/s (same size) | push / XADD | consume / XADD |\n"
                    "|---|---|---|---|---|---|---|---|\n"
                    f"| {args.group_size} | {args.tokens} | {size / 1024:.1f} KiB | {res['push_groups_per_s']} | "
                    f"{res['consume_groups_per_s']} | {res.get('redis_benchmark_xadd_per_s')} | {res.get('push_vs_xadd')} | "
                    f"{res.get('consume_vs_xadd')} |\n\n"
                    f"`python benchmarks/queue_throughput.py --groups {args.groups}`; redis-benchmark SET -d {size}: "
                    f"{res.get('redis_benchmark_set_per_s')}/s.\n")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(5)
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
