"""Generation for GRPO groups on CPU: the rollout's two request shapes against one genserver, and a bare HF
`generate` loop on the same model, side by side in one run.

    python benchmarks/generation_paths.py --model runs/tiny/warm --data runs/tiny/task/train.jsonl \
        [--groups 16] [--group-size 8] [--concurrency 32] [--rounds 4] [--append docs/benchmarks.md]

  per-completion  G requests per group (`rollout.sampling.sample_completion` each), what the rollout sent
  parallel        one request per group with sampling_params.n = G (`rollout.sampling.sample_group`)
  hf-generate     HF `model.generate` of the same prompts x G in one batch, in this process (1 thread)

Each round generates `--groups` groups (prompts from --data, T=1, eos ends a completion, max_new_tokens 32)
with `--concurrency` groups in flight, as the rollout service keeps them; modes interleave round by round.
Reported per mode: seconds per batch of groups (median of rounds), the client's CPU seconds per batch (this
process: what the rollout process burns) and the genserver's (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from asyncgrpo.rollout.sampling import sample_completion, sample_group
from asyncgrpo.sglang.client import SGLangClient
from asyncgrpo.utils.net import free_port

MAX_NEW = 32


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round(client: SGLangClient, prompts: list[list[int]], g: int, concurrency: int, mode: str, tag: str) -> None:
    sem = asyncio.Semaphore(concurrency)
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}

    async def one(i: int, ids: list[int]) -> None:
        async with sem:
            if mode == "parallel":
                await sample_group(client, ids, params, g, max_new_tokens=MAX_NEW, rid=f"{tag}:{i}", max_resubmits=0)
            else:
                await asyncio.gather(*(sample_completion(client, ids, params, max_new_tokens=MAX_NEW,
                                                         rid=f"{tag}:{i}:{j}", max_resubmits=0) for j in range(g)))

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


@contextlib.contextmanager
def genserver(model: str, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`asyncgrpo genserver` on the model (1 torch thread, no keys, loopback), healthy; stopped on exit."""
    port = free_port("127.0.0.1")
    log = Path(tempfile.mkdtemp()) / "genserver.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASYNCGRPO_API_KEY": "", "ASYNCGRPO_ADMIN_API_KEY": ""}
    srv = subprocess.Popen([sys.executable, "-m", "asyncgrpo.cli", "genserver", "--model", model, "--port", str(port),
                            "--threads", "1", *extra], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or srv.poll() is not None:
                raise SystemExit(f"genserver did not start; see {log}")
            time.sleep(0.5)
        yield srv, url
    finally:
        srv.terminate()
        srv.wait(30)


def _hf_round(model, tok, texts: list[str], g: int) -> None:  # type: ignore[no-untyped-def]
    import torch

    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW,
                       num_return_sequences=g, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="JSONL with a 'prompt' field")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-batch-size", type=int, default=128, help="the genserver's --max-batch-size")
    ap.add_argument("--append", default=None)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    texts = [json.loads(line)["prompt"] for line in Path(a.data).read_text().splitlines()[: a.groups * (a.rounds + 1)]]
    res: dict[str, list[tuple[float, float, float]]] = {"per-completion": [], "parallel": [], "hf-generate": []}
    with genserver(a.model, "--max-batch-size", str(a.max_batch_size)) as (srv, url):
        async def run_all() -> None:
            async with SGLangClient(url) as client:
                for r in range(a.rounds + 1):  # round 0 warms every path up and is not counted
                    chunk = texts[r * a.groups: (r + 1) * a.groups]
                    ids = [list(tok.encode(t, add_special_tokens=False)) for t in chunk]
                    for mode in ("per-completion", "parallel", "hf-generate"):
                        c0, s0, t0 = time.process_time(), _proc_cpu_s(srv.pid), time.perf_counter()
                        if mode == "hf-generate":
                            _hf_round(model, tok, chunk, a.group_size)
                        else:
                            await _round(client, ids, a.group_size, a.concurrency, mode, f"b{r}{mode[0]}")
                        wall = time.perf_counter() - t0
                        if r:
                            res[mode].append((wall, time.process_time() - c0, _proc_cpu_s(srv.pid) - s0))

        asyncio.run(run_all())
    hf = statistics.median(w for w, _, _ in res["hf-generate"])
    lines = [f"| mode | s per {a.groups} groups x {a.group_size} | client CPU s | genserver CPU s | / hf-generate |",
             "|---|---|---|---|---|"]
    for mode, rows in res.items():
        w = statistics.median(x[0] for x in rows)
        lines.append(f"| {mode} | {w:.3f} | {statistics.median(x[1] for x in rows):.3f} | "
                     f"{statistics.median(x[2] for x in rows):.3f} | {w / hf:.2f} |")
    table = "\n".join(lines)
    print(table)
    if a.append:
        cpu = platform.processor() or platform.machine()
        with open(a.append, "a") as f:
            f.write(f"\n## Generation paths for GRPO groups ({dt.date.today()}, {os.cpu_count()}-core CPU ({cpu}), "
                    f"1 torch thread, fp32, {Path(a.model).name})\n\n{table}\n\n`python benchmarks/generation_paths.py "
                    f"--model {a.model} --data {a.data} --groups {a.groups} --group-size {a.group_size} --concurrency "
                    f"{a.concurrency} --rounds {a.rounds} --max-batch-size {a.max_batch_size}`; median of rounds, modes interleaved; hf-generate's client "
                    "CPU is the generation itself.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
