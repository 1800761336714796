"""Trainer throughput: tokens (prompt + completion) per second through full GRPO steps on CPU.

    python benchmarks/trainer_throughput.py [--preset tiny] [--groups 4] [--group-size 8] [--steps 5]
                                            [--prompt-len 32] [--completion-len 96] [--append docs/benchmarks.md]

Builds the tiny model offline, then times GRPOTrainer.train_step on random sequences: proximal
log-prob recompute (no grad), forward + backward per micro-batch, megatron DDP grad sync, Adam step.
World size 1, one thread (OMP_NUM_THREADS=1) unless --threads is given. The first step is a warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=96)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--append", type=Path, default=None, help="append a result row to this markdown file")
    a = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)

    import torch

    torch.set_num_threads(a.threads)
    from asyncgrpo.config.schema import RunConfig
    from asyncgrpo.tiny import build_tiny_model
    from asyncgrpo.trainer.train_step import Batch, GRPOTrainer, Sample

    tmp = tempfile.mkdtemp(prefix="trainer_bench_")
    model_dir = build_tiny_model(Path(tmp) / "model", preset=a.preset)
    cfg = RunConfig()
    cfg.actor.path = str(model_dir)
    cfg.actor.group_size = a.group_size
    cfg.actor.micro_batch_size = a.micro_batch_size
    trainer = GRPOTrainer(cfg)
    rng = random.Random(0)

    def batch(step: int) -> Batch:
        samples = []
        for g in range(a.groups):
            prompt = [rng.randrange(256) for _ in range(a.prompt_len)]
            for _ in range(a.group_size):
                n = a.completion_len
                samples.append(Sample(prompt, [rng.randrange(256) for _ in range(n)], [-5.9] * n, [step] * n,
                                      float(rng.random() > 0.5), f"s{step}g{g}"))
        return Batch(samples)

    trainer.train_step(batch(0))  # warm-up
    tps, times = [], []
    for s in range(1, a.steps + 1):
        b = batch(s)
        t0 = time.perf_counter()
        trainer.train_step(b)
        dt = time.perf_counter() - t0
        times.append(dt)
        tps.append(a.groups * a.group_size * (a.prompt_len + a.completion_len) / dt)
    tokens = a.groups * a.group_size * (a.prompt_len + a.completion_len)
    med = statistics.median(tps)
    print(f"trainer throughput ({a.preset}, {a.groups}x{a.group_size} seqs of {a.prompt_len}+{a.completion_len} tokens, "
          f"mbs {a.micro_batch_size}, {a.threads} thread(s)): {med:.0f} tokens/s median, step {statistics.median(times):.3f} s")
    if a.append:
        cmd = "python benchmarks/trainer_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        row = (f"\n## trainer throughput ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
               f"megatron-core local spec, fp32, world size 1)\n\n"
               f"| model | seqs/step | tokens/seq | tokens/step | threads | step s (median) | tokens/s (median) |\n"
               f"|---|---|---|---|---|---|---|\n"
               f"| {a.preset} | {a.groups * a.group_size} | {a.prompt_len}+{a.completion_len} | {tokens} | {a.threads} | "
               f"{statistics.median(times):.3f} | {med:.0f} |\n\n`{cmd.strip()}`; a step = prox recompute + "
               f"forward/backward + DDP sync + Adam.\n")
        with open(a.append, "a") as f:
            f.write(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
