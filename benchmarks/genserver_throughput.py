"""genserver throughput: output tokens/s at 1, 8, 32 and 128 concurrent requests, against a bare HF
`model.generate` loop on the same device and model at the same batch size.

    python benchmarks/genserver_throughput.py [--device cpu|cuda] [--dtype float32|bfloat16]
        [--shape tiny|qwen2.5-0.5b] [--model DIR] [--levels 1,8,32,128] [--requests-per-level 96] [--waves 0]
        [--max-new-tokens 64] [--hf-rounds 2] [--append docs/benchmarks.md]

    # on a GPU (what benchmarks/gpu/run_all.sh runs):
    python benchmarks/genserver_throughput.py --device cuda --dtype bfloat16 --levels 1,8,32,128 \\
        --requests-per-level 4 --waves 2 --max-new-tokens 128 --append docs/benchmarks.md

Starts one `asyncgrpo genserver` process (1 torch thread) on the given HF checkpoint, or on a freshly built
model: the tiny model on CPU by default, a Qwen2.5-0.5B-shaped model (config only, random weights, the
project's byte tokenizer; nothing is downloaded) on CUDA by default. Closed-loop workers drive it through the
project's SGLang client: each of C workers sends its next request as soon as the last one returns. Every
request decodes exactly max_new_tokens (ignore_eos), sampled at T=1 with its own seed and log-probs, so
tokens/s = all output tokens / wall time. A level runs max(requests-per-level, waves * C, C) requests.

The baseline, after the server has stopped: the same checkpoint in this process on the same device and dtype,
`model.generate` of a batch of C copies of the prompt (do_sample, T=1, no top-k/top-p, exactly max_new_tokens
each: min_new_tokens = max_new_tokens), --hf-rounds timed rounds after one warm-up. HF returns no log-probs
and uses one generator; the genserver computes log-probs and samples each request with its own. The ratio is
genserver tokens/s / HF tokens/s at the same batch.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from asyncgrpo.sglang.client import SGLangClient  # noqa: E402
from bench_models import append_markdown, build_qwen2  # noqa: E402

PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]
# Qwen2.5-0.5B's config.json shape (random weights here): 494M parameters with the tied embedding

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


def build_model(out: Path, shape: str, device: str, dtype: str) -> Path:
    """An HF checkpoint directory of the given shape with random weights and the project's byte tokenizer."""
    if shape == "tiny":
        from asyncgrpo.tiny import build_tiny_model

        return build_tiny_model(out, preset="tiny", seed=0)
    return build_qwen2(out, shape, dtype, device)


def hf_generate(model_dir: str, device: str, dtype: str, levels: list[int], max_new: int, rounds: int) -> dict[int, float]:
    """tokens/s of a bare HF model.generate loop at each batch size (rounds timed after one warm-up)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not device.startswith("cuda"):
        torch.set_num_threads(1)  # as the genserver (--threads 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def gen(batch: int, n: int) -> int:
        ids = torch.tensor([PROMPT] * batch, device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
        return (out.shape[1] - ids.shape[1]) * batch

    gen(2, 4)  # warm-up
    result = {}
    for c in levels:
        sync()
        t0 = time.perf_counter()
        toks = sum(gen(c, max_new) for _ in range(rounds))
        sync()
        result[c] = toks / (time.perf_counter() - t0)
        print(f"HF generate batch {c:>3}: {toks} tokens, {result[c]:8.1f} tokens/s", flush=True)
    del model
    return result


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"{os.cpu_count()}-CPU {platform.machine()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: build one of --shape)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (genserver --device, and the HF baseline)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--shape", default=None, choices=["tiny", "qwen2.5-0.5b"],
                    help="model built when --model is not given (default: tiny on cpu, qwen2.5-0.5b on cuda)")
    ap.add_argument("--levels", default="1,8,32,128", help="concurrency levels")
    ap.add_argument("--requests-per-level", type=int, default=96)
    ap.add_argument("--waves", type=int, default=0, help="at least this many requests per worker at every level")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-rounds", type=int, default=2, help="timed HF generate rounds per level (0: no baseline)")
    ap.add_argument("--append", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    shape = args.shape or ("qwen2.5-0.5b" if cuda else "tiny")
    levels = [int(x) for x in args.levels.split(",")]
    if cuda:
        import torch

        if not torch.cuda.is_available():
            print(f"--device {args.device}: torch sees no GPU", file=sys.stderr)
            return 2

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    what = args.model or f"{shape} shape, random weights, byte tokenizer"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generation_paths import genserver  # one way to start a benchmark's genserver

    rows = []
    try:
        if model is None:
            t = time.perf_counter()
            model = str(build_model(Path(tmp.name) / shape, shape, args.device, dtype))
            print(f"built {shape} in {time.perf_counter() - t:.1f}s: {model}", flush=True)
        with genserver(model, "--device", args.device, "--dtype", dtype, "--max-batch-size", str(max(levels))) as (_, url):
            asyncio.run(level(url, 4, 4, 8))  # warm-up
            for c in levels:
                n = max(args.requests_per_level, args.waves * c, c)
                tps, toks, batch = asyncio.run(level(url, c, n, args.max_new_tokens))
                rows.append((c, n, toks, tps, batch))
                print(f"concurrency {c:>3}: {toks} tokens, {tps:8.1f} tokens/s, {batch:.1f} tokens per step", flush=True)
        hf = hf_generate(model, args.device, dtype, levels, args.max_new_tokens, args.hf_rounds) if args.hf_rounds else {}
    finally:
        tmp.cleanup()

    date = dt.date.today().isoformat()
    threads = "" if cuda else ", 1 torch thread"
    cmd = "python benchmarks/genserver_throughput.py " + shlex.join(sys.argv[1:])
    by = f" (run by `{os.environ['ASYNCGRPO_RUN_ALL']}`)" if os.environ.get("ASYNCGRPO_RUN_ALL") else ""

    def ratio(c: int, tps: float) -> str:
        return f"{tps / hf[c]:.2f}" if hf.get(c) else "-"

    lines = [
        f"\n## genserver throughput ({date}, {device_name(args.device)}, {dtype}{threads}, {what})\n",
        "| concurrency | requests | tokens/request | output tokens | genserver tokens/s | tokens per step "
        "| HF generate tokens/s (batch = concurrency) | genserver / HF |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {c} | {n} | {args.max_new_tokens} | {t} | {tps:.1f} | {b:.1f} | "
          f"{f'{hf[c]:.1f}' if c in hf else '-'} | {ratio(c, tps)} |" for c, n, t, tps, b in rows],
        f"\n`{cmd}`{by}; closed-loop clients through asyncgrpo.sglang.client, T=1, log-probs on, ignore_eos, a seed per "
        f"request; HF: `model.generate` of the same checkpoint on the same device, do_sample T=1, exactly "
        f"{args.max_new_tokens} new tokens, no log-probs, {args.hf_rounds} timed rounds per batch size.\n",
    ]
    append_markdown(args.append, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
