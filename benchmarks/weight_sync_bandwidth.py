"""Weight-sync bandwidth: the service's broadcast GB/s next to a bare torch.distributed broadcast of the
same bytes (same bucket sizes) over the same backend (gloo on CPU), as a ratio.

    python benchmarks/weight_sync_bandwidth.py [--hidden 1024 --layers 8 --bucket-mb 64 --receivers 2]
                                               [--repeats 3] [--append docs/benchmarks.md]

Service side: a qwen2 model of the given size (random weights, the tiny byte tokenizer) served by
`--receivers` real genservers, an `asyncgrpo weight-sync` process, and a WeightPublisher in this process
publishing 1 + `--repeats` versions (the first, cold one is not counted). Its GB/s is bucket bytes /
(first bucket fired .. last bucket's HTTP reply), as the service reports in /status: it includes the HTTP
calls and each server validating and copying the bucket into its model; its collective GB/s is bytes /
rank 0's time inside broadcast(). Baseline: rank 0 here plus `--receivers` processes that only receive
broadcasts of the same bucket sizes (init_custom_process_group, like the servers). Each service update is
followed by one bare round, so both sides are measured under the same background load. Best of the
repeats on both sides (each figure its own best). Also reported: update duration (pause .. continue) and trainer-blocked seconds (publish()).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "weight_sync"))

from procs import Proc, start_genserver, start_weight_sync, wait_until  # noqa: E402

from asyncgrpo.sglang.dist_group import destroy_custom_process_group, init_custom_process_group  # noqa: E402
from asyncgrpo.weight_sync.group import free_port  # noqa: E402
from asyncgrpo.weight_sync.publisher import WeightPublisher  # noqa: E402


def build_model(out: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from asyncgrpo.tiny import build_tiny_model

    base = build_tiny_model(out / "tiny", preset="tiny", arch="qwen2", seed=0)
    d = AutoConfig.from_pretrained(base).to_dict()
    for k in ("layer_types", "head_dim", "max_window_layers"):
        d.pop(k, None)
    d.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 11 // 4,
             num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256))
    cfg = AutoConfig.for_model(**d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    dst = out / "model"
    model.save_pretrained(dst)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy2(f, dst / f.name)
    return dst


def _receiver(port: int, rank: int, world: int, sizes: list[int], repeats: int, fresh: bool, name: str) -> None:
    torch.set_num_threads(1)
    pg = init_custom_process_group("gloo", master_address="127.0.0.1", master_port=port, world_size=world, rank=rank,
                                   group_name=name, timeout=600)
    bufs = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    for _ in range(repeats):
        for i, n in enumerate(sizes):
            b = torch.empty(n, dtype=torch.uint8) if fresh else bufs[i]
            torch.distributed.broadcast(b, src=0, group=pg)
        torch.distributed.barrier(group=pg)
    destroy_custom_process_group(pg)


class BareBroadcast:
    """Rank 0 of a plain gloo group of `receivers` processes that receive broadcasts of buckets of `sizes`
    bytes into preallocated buffers, or (fresh) into a new buffer per bucket. Rounds are run one at a time
    by the caller, interleaved with the service's updates, so both see the same background load (this
    machine is shared; back-to-back phases measured minutes apart differ by more than the effect measured)."""

    def __init__(self, sizes: list[int], receivers: int, repeats: int, fresh: bool) -> None:
        self.sizes, self.repeats, self.best = sizes, repeats, 0.0
        port, world = free_port(), receivers + 1
        name = f"bench-{port}"
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_receiver, args=(port, r, world, sizes, repeats, fresh, name))
                      for r in range(1, world)]
        for p in self.procs:
            p.start()
        self.pg = init_custom_process_group("gloo", master_address="127.0.0.1", master_port=port, world_size=world,
                                            rank=0, group_name=name, timeout=600)
        self.src = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in sizes]

    def round(self) -> float:
        t0 = time.perf_counter()
        for b in self.src:
            torch.distributed.broadcast(b, src=0, group=self.pg)
        torch.distributed.barrier(group=self.pg)
        gbps = sum(self.sizes) / (time.perf_counter() - t0) / 1e9
        self.best = max(self.best, gbps)
        return gbps

    def close(self) -> None:
        destroy_custom_process_group(self.pg)
        self.pg = None
        for p in self.procs:
            p.join(60)


def run_interleaved(model_dir: Path, work: Path, receivers: int, bucket_mb: float, repeats: int) -> dict[str, Any]:
    """Version 1 (cold: first touch of the snapshot and receive buffers) fixes the bucket sizes; then
    `repeats` rounds of: one service update, one bare round with preallocated buffers, one with fresh ones."""
    from transformers import AutoModelForCausalLM

    procs: list[Proc] = []
    bares: list[BareBroadcast] = []
    try:
        urls = []
        for i in range(receivers):
            port = free_port()
            procs.append(start_genserver(model_dir, port, work / f"gen{i}.log", dist_timeout_s=120))
            urls.append(f"http://127.0.0.1:{port}")
        port = free_port()
        ws = f"http://127.0.0.1:{port}"
        cfg = {"actor": {"path": str(model_dir)}, "fileroot": str(work / "runs"),
               "weight_sync": {"port": port, "servers": urls, "snapshot_dir": str(work / "shm"), "bucket_size_mb": bucket_mb,
                               "collective_timeout_s": 300, "request_timeout_s": 300}}
        procs.append(start_weight_sync(cfg, work, work / "weight_sync.log"))
        wait_until("servers ready", lambda: all(s["ready"] for s in httpx.get(f"{ws}/servers", timeout=10).json()), 120, procs)
        params = [(n, p.detach()) for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()]
        pub = WeightPublisher(work / "shm", service_url=ws, bucket_bytes=int(bucket_mb * (1 << 20)))
        best: dict[str, Any] = {"gbps": 0.0}
        for v in range(1, repeats + 2):
            res = pub.publish(params, v)
            st = wait_until(f"version {v} synced", lambda v=v: (s := httpx.get(f"{ws}/status", timeout=10).json())
                            ["last_update"] and s["last_update"]["version"] == v and not s["updating"] and s, 600, procs)
            lu = st["last_update"]
            if lu["failed"]:
                raise RuntimeError(f"update {v} failed: {lu['failed']}")
            if v == 1:
                layout = json.loads((work / "shm" / f"slot{pub._last_slot}.json").read_text())["layout"]
                best["sizes"] = sizes = [b["nbytes"] for b in layout["buckets"]]
                bares = [BareBroadcast(sizes, receivers, repeats, fresh=False), BareBroadcast(sizes, receivers, repeats, fresh=True)]
                continue
            rounds = [bb.round() for bb in bares]
            best.setdefault("paired", []).append(lu["collective_gbps"] / rounds[0])
            print(f"v{v}: service collective {lu['collective_gbps']:.3f} GB/s, end-to-end {lu['gbps']:.3f}; "
                  f"bare prealloc {rounds[0]:.3f}, fresh {rounds[1]:.3f}", flush=True)
            if lu["gbps"] > best["gbps"]:
                best.update(gbps=lu["gbps"], duration_s=lu["duration_s"], broadcast_s=lu["broadcast_s"],
                            bytes=lu["bytes"], blocked_s=res.blocked_s)
            best["collective_gbps"] = max(best.get("collective_gbps", 0.0), lu["collective_gbps"])
        best["bare"], best["bare_fresh"] = bares[0].best, bares[1].best
        return best
    finally:
        for bb in bares:
            bb.close()
        for p in reversed(procs):
            p.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--append", type=Path, default=None, help="append a result row to this markdown file")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ws-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        work = Path(tmp)
        model_dir = build_model(work, args.hidden, args.layers)
        svc = run_interleaved(model_dir, work, args.receivers, args.bucket_mb, args.repeats)
        sizes, bare, bare_fresh = svc.pop("sizes"), svc.pop("bare"), svc.pop("bare_fresh")
        paired = statistics.median(svc.pop("paired"))
    ratio, coll_ratio = svc["gbps"] / bare, svc["collective_gbps"] / bare
    coll_ratio_fresh = svc["collective_gbps"] / bare_fresh
    mb = svc["bytes"] / 1e6
    print(f"model {mb:.1f} MB in {len(sizes)} bucket(s) of <= {args.bucket_mb:g} MiB to {args.receivers} receivers (gloo)")
    print(f"service collectives: {svc['collective_gbps']:.3f} GB/s; service buckets incl. HTTP + servers loading: "
          f"{svc['gbps']:.3f} GB/s (broadcast phase {svc['broadcast_s']:.3f}s, update {svc['duration_s']:.3f}s, "
          f"trainer blocked {svc['blocked_s']:.3f}s)")
    print(f"bare torch.distributed broadcast: {bare:.3f} GB/s (preallocated receive buffers), "
          f"{bare_fresh:.3f} GB/s (a new receive buffer per bucket, as SGLang does; genserver keeps one per group)")
    print(f"ratio service collectives / bare: {coll_ratio:.3f} (vs bare with fresh buffers: {coll_ratio_fresh:.3f}); "
          f"ratio service end-to-end / bare: {ratio:.3f}")
    print(f"median over rounds of service collective / the bare round right after it: {paired:.3f}")
    if args.append:
        head = ("\n## weight-sync bandwidth ({d}, {m}, {c} CPUs, gloo, loopback)\n\n"
                "| model MB | buckets | receivers | service collective GB/s | service end-to-end GB/s | bare GB/s (prealloc / fresh) "
                "| collective / bare (prealloc / fresh) | end-to-end / bare | update s | trainer blocked s |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n").format(d=date.today().isoformat(), m=platform.machine(), c=os.cpu_count())
        row = (f"| {mb:.1f} | {len(sizes)} x <= {args.bucket_mb:g} MiB | {args.receivers} | {svc['collective_gbps']:.3f} | "
               f"{svc['gbps']:.3f} | {bare:.3f} / {bare_fresh:.3f} | {coll_ratio:.3f} / {coll_ratio_fresh:.3f} | {ratio:.3f} | {svc['duration_s']:.3f} | {svc['blocked_s']:.3f} |\n")
        cmd = (f"\n`python benchmarks/weight_sync_bandwidth.py --hidden {args.hidden} --layers {args.layers} --bucket-mb "
               f"{args.bucket_mb:g} --receivers {args.receivers} --repeats {args.repeats} --append {args.append}`; collective = bytes / "
               f"rank 0's time inside broadcast(); median over rounds of collective / the bare round after it: {paired:.3f}; "
               "end-to-end = bytes / (first bucket fired .. last reply), incl. HTTP and the genservers validating and "
               "copying each bucket into the model; best of repeats, bare rounds interleaved with the service's updates.\n")
        with args.append.open("a") as f:
            f.write(head + row + cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
