"""Weight update seconds through the weight-sync service, next to a bare torch copy of the same bytes.

    python benchmarks/gpu/weight_update.py [--sizes qwen2.5-0.5b,qwen2.5-1.5b] [--repeats 3] [--append docs/benchmarks.md]
    python benchmarks/gpu/weight_update.py --smoke          # CPU, tiny model, one update: only proves it runs

Per model size (Qwen2.5-0.5B / 1.5B shapes from a config, random weights, bf16; nothing is downloaded):
- tensor transport: one genserver on the GPU (--device cuda --dtype bfloat16), an `asyncgrpo weight-sync`
  process with it as a tensor server (each bucket staged on the same GPU and handed over as a CUDA IPC handle
  through /update_weights_from_tensor), and a WeightPublisher here publishing 1 + repeats versions (the first,
  cold one is not counted). Reported: the update (pause .. continue) and its sending part, from /status.
- NCCL broadcast: the same server as a broadcast member (backend nccl). NCCL may refuse two ranks on one
  device; then the row says so with the server's error instead of a time.
- baseline: the bytes of the same buckets copied host -> GPU (pageable memory, like the snapshot) and then
  GPU -> GPU (what the server does into its parameters), in this process, best of `repeats`.
ratio = service update seconds / baseline seconds (1.0 would be a free protocol).
On CPU (--smoke, or no CUDA) the tensor transport runs over shared memory and the baseline is two memcpys.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "weight_sync"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from procs import Proc, start_weight_sync, wait_until  # noqa: E402
from service_procs import start_genserver  # noqa: E402

from bench_models import SHAPES, append_markdown, build_qwen2  # noqa: E402

from asyncgrpo.utils.net import free_port  # noqa: E402
from asyncgrpo.weight_sync import WeightPublisher  # noqa: E402

def named_weights(model_dir: Path, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return [(n, p.detach().contiguous()) for n, p in model.named_parameters()]


def bare_copy_s(nbytes: int, device: str, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8)  # pageable, as the shared-memory snapshot is
    mid = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mid.copy_(src)
        dst.copy_(mid)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def run_transport(model_dir: Path, weights: list[tuple[str, torch.Tensor]], transport: str, device: str, dtype: str,
                  repeats: int, work: Path) -> dict[str, Any]:
    """Publish 1 + repeats versions to one genserver over `transport`; best update and send seconds."""
    gport, wport = free_port(), free_port()
    url = f"http://127.0.0.1:{gport}"
    procs: list[Proc] = [start_genserver(model_dir, gport, work / f"genserver-{transport}.log", "--device", device,
                                         "--dtype", dtype, "--weight-version", "0", "--dist-timeout-s", "60", timeout=300)]
    ws: dict[str, Any] = {"port": wport, "snapshot_dir": str(work / f"shm-{transport}"), "bucket_size_mb": 512,
                          "group_timeout_s": 60, "collective_timeout_s": 120, "request_timeout_s": 120,
                          "resync_interval_s": 0.5, "dtype": dtype, "transport_fallback": False}
    if transport == "tensor":
        ws |= {"servers": [], "tensor_servers": [url], "tensor_device": device}
    else:
        ws |= {"servers": [url], "backend": "nccl" if device != "cpu" else "gloo"}
    cfg = {"actor": {"path": str(model_dir)}, "fileroot": str(work / "runs"), "weight_sync": ws}
    procs.append(start_weight_sync(cfg, work, work / f"weight_sync-{transport}.log"))
    ws_url = f"http://127.0.0.1:{wport}"
    pub = WeightPublisher(work / f"shm-{transport}", service_url=ws_url, dtype=dtype, bucket_bytes=512 << 20)
    out: dict[str, Any] = {"update_s": [], "send_s": [], "bytes": 0, "error": None}
    try:
        for v in range(1, repeats + 2):
            pub.publish(weights, v)

            def done() -> bool:
                s = httpx.get(f"{ws_url}/status", timeout=10).json()
                srv = s["servers"][0]
                if srv["state"] == "dropped":
                    raise RuntimeError(srv["last_error"] or "dropped")
                return s["synced_version"] == v and srv["ready"] and srv["version"] == str(v)
            try:
                wait_until(f"version {v} over {transport}", done, 300, procs)
            except RuntimeError as e:
                out["error"] = str(e).splitlines()[0][:300]
                break
            last = httpx.get(f"{ws_url}/status", timeout=10).json()["last_update"]
            if v > 1:
                out["update_s"].append(last["duration_s"])
                out["send_s"].append(last["broadcast_s"])
            out["bytes"] = last["bytes"]
    finally:
        pub.close()
        for p in reversed(procs):
            p.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="qwen2.5-0.5b,qwen2.5-1.5b", help="comma-separated model shapes: " + ", ".join(SHAPES))
    ap.add_argument("--repeats", type=int, default=3, help="timed updates after the cold one")
    ap.add_argument("--append", type=Path, default=None, help="append the result rows to this markdown file")
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny shape, one timed update (proves it runs)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    sizes = ["smoke"] if args.smoke else args.sizes.split(",")
    repeats = 1 if args.smoke else args.repeats
    dev_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()})"
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix=f"wu-{size}-") as tmp:
            work = Path(tmp)
            tdtype = getattr(torch, dtype)
            model_dir = build_qwen2(work / "model", size, dtype, device)
            weights = named_weights(model_dir, tdtype)
            transports = ["tensor", "distributed"] if cuda else ["tensor"]
            for transport in transports:
                r = run_transport(model_dir, weights, transport, device, dtype, repeats, work)
                if r["error"] or not r["update_s"]:
                    label = "CUDA IPC" if transport == "tensor" and cuda else transport
                    rows.append(f"| {size} | {label} | {r['bytes'] / 1e9:.3f} | - | - | - | - | failed: "
                                f"{(r['error'] or 'no timed update').replace('|', '/')} |")
                    print(rows[-1], flush=True)
                    continue
                base = bare_copy_s(r["bytes"], device, repeats)
                upd, send = min(r["update_s"]), min(r["send_s"])
                label = {"tensor": "CUDA IPC" if cuda else "shared memory", "distributed": "NCCL broadcast"}[transport]
                rows.append(f"| {size} | {label} | {r['bytes'] / 1e9:.3f} | {upd:.3f} | {send:.3f} | {base:.3f} | "
                            f"{upd / base:.2f} | |")
                print(rows[-1], flush=True)
    cmd = "python benchmarks/gpu/weight_update.py " + " ".join(sys.argv[1:])
    text = (f"\n## weight update, service vs bare copy ({dt.date.today()}, {dev_name}, torch {torch.__version__}, {dtype})\n\n"
            f"Command: `{cmd}`. update = pause .. continue as weight-sync reports it; send = its buckets alone; bare = "
            "host->GPU plus GPU->GPU copy of the same bytes in one process (two memcpys on CPU); ratio = update / bare.\n\n"
            "| model | transport | GB | update s | send s | bare s | ratio | note |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    append_markdown(args.append, text)
    # NCCL refusing two ranks on one GPU is a finding, not a failure; the tensor transport must work
    return 1 if any("failed" in r and "NCCL" not in r and "distributed" not in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
