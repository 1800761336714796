"""Train/inference log-prob mismatch: the trainer's log-probs vs the genserver's, in bf16 and fp32.

    python benchmarks/logprob_mismatch.py [--model HF_DIR | --preset tiny] [--device cpu|cuda] [--prompts 32]
                                          [--max-new-tokens 32] [--temperature 1.0] [--append docs/benchmarks.md]

The genserver engine (services/asyncgrpo/genserver, in-process: continuous batching, KV cache, left-padded
batch, log-probs of the sampled tokens at the sampling temperature, exactly what it returns over HTTP) samples
completions of the same prompts with per-request seeds in fp32 and in bf16. Seeded sampling draws the same noise
in both precisions, so the two runs pick the same tokens until a near-tie flips one; every completion is cut at
its first token that differs, so every figure is over the SAME prompt + completion tokens. The megatron trainer
(GRPOTrainer, trainer.dtype fp32 and bf16: Float16Module with fp32 masters) recomputes those tokens' log-probs at
the same temperature, as it does for pi_prox. Reported per (genserver dtype, trainer dtype): max and mean
|trainer - genserver| over completion tokens. bf16/bf16 is the mismatch a bf16 deployment trains with;
fp32/fp32 is the floor (kernels and batch layout only).

Without --model a tiny random-init Qwen2 is built offline (near-uniform distributions: a lower bound on the
mismatch); `asyncgrpo prepare --out runs/tiny` leaves a trained one in runs/tiny/warm. `--device cuda` runs both
sides on the GPU (the trainer on cuda with NCCL); `--device cpu` hides any GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="an HF checkpoint dir (default: build a tiny random-init one)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"], help="tiny model preset without --model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16, help="mean prompt length (lengths vary +-50%%)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--append", type=Path, default=None, help="append the result rows to this markdown file")
    return p.parse_args(argv)


def generate(model_dir: Path, dtype: str, device: str, prompts: list[list[int]], a: argparse.Namespace) -> list[tuple[list[int], list[float]]]:
    """(completion ids, genserver log-probs) per prompt, all requests in one continuous batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncgrpo.genserver.engine import Engine, Request
    from asyncgrpo.genserver.sampling import SamplingSpec

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    eng = Engine(model, AutoTokenizer.from_pretrained(model_dir), model_path=str(model_dir), max_batch_size=max(1, len(prompts)))
    done = [threading.Event() for _ in prompts]
    reqs = [Request(rid=f"r{i}", input_ids=p, return_logprob=True,
                    spec=SamplingSpec(max_new_tokens=a.max_new_tokens, temperature=a.temperature, ignore_eos=True,
                                      sampling_seed=a.seed * 100003 + i),
                    on_event=lambda r, fin, ev=done[i]: fin and ev.set()) for i, p in enumerate(prompts)]
    eng.start()
    try:
        for r in reqs:
            eng.add_request(r)
        for i, ev in enumerate(done):
            if not ev.wait(600):
                raise RuntimeError(f"request {i} did not finish")
    finally:
        eng.shutdown()
    for r in reqs:
        if r.finish_reason is None or r.finish_reason.get("type") == "abort":
            raise RuntimeError(f"{r.rid}: {r.finish_reason}")
    return [(list(r.output_ids), list(r.logprobs)) for r in reqs]


def trainer_logprobs(model_dir: Path, dtype: str, seqs: list[tuple[list[int], list[int]]], temperature: float) -> list[list[float]]:
    """The megatron trainer's log-probs (at `temperature`) of each completion given its prompt."""
    import torch

    from asyncgrpo.config.schema import RunConfig
    from asyncgrpo.trainer.train_step import GRPOTrainer, Sample, pack

    cfg = RunConfig()
    cfg.actor.path = str(model_dir)
    cfg.actor.temperature = temperature
    cfg.trainer.dtype = dtype
    trainer = GRPOTrainer(cfg)
    samples = [Sample(p, c, [0.0] * len(c), [0] * len(c), 0.0, f"g{i}") for i, (p, c) in enumerate(seqs)]
    out = []
    mbs = 8
    for i in range(0, len(samples), mbs):
        chunk = samples[i : i + mbs]
        packed = pack(chunk, trainer.pad_id)
        with torch.no_grad():
            lp = trainer._logp(trainer.model, packed["input_ids"])[0].float().cpu()
        for j, s in enumerate(chunk):
            p = len(s.prompt_ids)
            out.append(lp[j, p : p + len(s.completion_ids)].tolist())
    del trainer
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer follows CUDA when it sees one
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    from asyncgrpo.tiny import build_tiny_model
    from asyncgrpo.trainer.model import destroy_parallel, init_parallel, te_available

    model_dir = a.model or build_tiny_model(Path(tempfile.mkdtemp(prefix="lp_mismatch_")) / "model", preset=a.preset, seed=a.seed)
    if not (Path(model_dir) / "config.json").exists():
        print(f"--model {model_dir}: no config.json", file=sys.stderr)
        return 2
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(max(1, a.prompt_len // 2), a.prompt_len * 3 // 2))]
               for _ in range(a.prompts)]
    t0 = time.perf_counter()
    gen = {dt: generate(Path(model_dir), dt, a.device, prompts, a) for dt in DTYPES}
    # the same tokens for both precisions: cut each completion at its first token that differs
    seqs, gen_lp = [], {dt: [] for dt in DTYPES}
    total = 0
    for i, p in enumerate(prompts):
        c32, c16 = gen["float32"][i][0], gen["bfloat16"][i][0]
        n = next((k for k, (x, y) in enumerate(zip(c32, c16)) if x != y), min(len(c32), len(c16)))
        total += len(c32)
        if n == 0:
            continue
        seqs.append((p, c32[:n]))
        for dt in DTYPES:
            gen_lp[dt].append(gen[dt][i][1][:n])
    n_tok = sum(len(c) for _, c in seqs)
    if n_tok == 0:
        print("no common completion tokens between the fp32 and bf16 genservers", file=sys.stderr)
        return 1
    init_parallel(1, seed=a.seed)
    tr_lp = {dt: trainer_logprobs(Path(model_dir), dt, seqs, a.temperature) for dt in DTYPES}
    destroy_parallel()
    rows = []
    for g_dt in ("bfloat16", "float32"):
        for t_dt in ("bfloat16", "float32"):
            d = torch.tensor([abs(x - y) for tl, gl in zip(tr_lp[t_dt], gen_lp[g_dt]) for x, y in zip(tl, gl)], dtype=torch.float64)
            rows.append((g_dt, t_dt, float(d.max()), float(d.mean())))
    lp_all = torch.tensor([x for gl in gen_lp["float32"] for x in gl])
    dt_s = time.perf_counter() - t0
    if a.device == "cuda":
        dev = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    else:
        dev = f"CPU ({platform.machine()}, {os.cpu_count()} CPUs, {a.threads} torch thread(s)), torch {torch.__version__}"
    name = str(a.model) if a.model else f"tiny random-init preset {a.preset} (seed {a.seed})"
    print(f"log-prob mismatch on {dev}, model {name}: {len(seqs)} completions, {n_tok} common tokens of {total} "
          f"(fp32 log-probs mean {float(lp_all.mean()):.3f}, min {float(lp_all.min()):.3f}), T={a.temperature}, {dt_s:.1f} s")
    print(f"{'genserver':>10} {'trainer':>10} {'max|d|':>10} {'mean|d|':>10}")
    for g_dt, t_dt, mx, mn in rows:
        print(f"{g_dt:>10} {t_dt:>10} {mx:10.3e} {mn:10.3e}")
    if a.append:
        cmd = "python benchmarks/logprob_mismatch.py " + " ".join(argv if argv is not None else sys.argv[1:])
        via = f" (run by `{os.environ['ASYNCGRPO_RUN_ALL']}`)" if os.environ.get("ASYNCGRPO_RUN_ALL") else ""
        text = (f"\n## log-prob mismatch, trainer vs genserver ({time.strftime('%Y-%m-%d')}, {dev})\n\n"
                f"Model {name}; {len(prompts)} prompts, {n_tok} completion tokens common to the fp32 and bf16 genservers "
                f"(of {total} sampled; fp32 log-probs mean {float(lp_all.mean()):.2f}), T={a.temperature}.\n\n"
                "| genserver dtype | trainer dtype | max \\|delta\\| | mean \\|delta\\| |\n|---|---|---|---|\n"
                + "".join(f"| {g} | {t} | {mx:.3e} | {mn:.3e} |\n" for g, t, mx, mn in rows)
                + f"\n`{cmd}`{via}; delta = trainer log-prob - genserver log-prob of the same sampled token "
                "(genserver: in-process engine, continuous batch with KV cache; trainer: megatron-core "
                f"{'Transformer Engine' if te_available() else 'local'} spec, bf16 = Float16Module with fp32 master "
                "weights). See docs/precision.md.\n")
        with open(a.append, "a") as f:
            f.write(text)
        print(f"appended to {a.append}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
