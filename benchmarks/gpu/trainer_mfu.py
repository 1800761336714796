"""Trainer MFU: bf16 forward + backward of the project's megatron-core policy at Qwen2.5-0.5B and -1.5B shapes.

    python benchmarks/gpu/trainer_mfu.py [--shapes qwen2.5-0.5b,qwen2.5-1.5b] [--seq-lens 2048,4096]
        [--micro-batches 1,2,4,8] [--steps 3] [--peak-tflops X] [--append docs/benchmarks.md] [--smoke]

The model is the trainer's own: `asyncgrpo.trainer.model.build_gpt_model` (megatron GPTModel, TE layer spec
where Transformer Engine imports, the local spec otherwise; the row says which) in bf16 parameters, built from
the HF config shape with random weights (normal(0, 0.02), norms at 1; nothing is downloaded). One step is
what the trainer does per micro-batch: `asyncgrpo.trainer.logprobs.token_logprobs` (forward, fp32 log-softmax
of the logits via megatron's vocab-parallel cross entropy) of random tokens, a scalar loss (-mean log-prob),
backward. No optimizer step (it is memory-bound and the same for every sequence length); TP = 1, one GPU.
Each (shape, sequence length, micro-batch) runs one warm-up step and --steps timed steps; an OOM is
recorded as such and the sweep goes on.

FLOPs (model FLOPs, the PaLM / Megatron-LM convention; no activation recomputation counted):

    FLOPs per step = 6 * N * T  +  12 * L * (n_heads * head_dim) * S * T

    T = micro_batch * S tokens per step, S the sequence length, L layers;
    N = the parameters that multiply activations: per layer q, k, v, o projections
        (h*h + 2*h*kv_heads*head_dim + h*h) and the SwiGLU MLP (3*h*ffn), plus the LM head (V*h; counted even
        when tied to the input embedding, whose lookup is not a matmul). Norms and biases are left out.
    6 = 2 (multiply-add) * 3 (forward + backward: the backward is two matmuls per forward matmul).
    The attention term is QK^T and attention x V, 2 * 2 * S * (n_heads * head_dim) per token per layer forward,
    times 3 for forward + backward, counted over the full S x S score matrix as PaLM and Megatron-LM do (a
    causal count of only the lower triangle would halve this term).

MFU = FLOPs per step / step seconds / peak, the peak being the device's dense bf16 tensor-core throughput:
H100 SXM 989 TFLOPS, H200 the same (same GH100 compute), H100 PCIe 756, A100 312, B200 2250 (by device
name; `--peak-tflops` overrides, and a device not in the table gets no MFU unless given one).

--smoke: tiny shapes, sequence length 32, micro-batches 1 and 2, one step, on CPU when there is no GPU (fp32
there unless bf16 works), so that CI runs this script and it cannot rot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_models import SHAPES, append_markdown  # noqa: E402

# dense bf16 tensor-core peak, TFLOPS (no sparsity), matched on torch.cuda.get_device_name(); first match wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0)]


def peak_for(name: str) -> float | None:
    return next((p for key, p in PEAK_TFLOPS if key in name), None)


def matmul_params(arch) -> int:  # noqa: ANN001 - asyncgrpo.trainer.hf_mapping.ModelArch
    h, kv = arch.hidden_size, arch.num_kv_heads * arch.head_dim
    q = arch.num_heads * arch.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * arch.ffn_hidden_size
    return arch.num_layers * per_layer + arch.vocab_size * h


def step_flops(arch, seq: int, mb: int) -> float:  # noqa: ANN001
    tokens = mb * seq
    return 6.0 * matmul_params(arch) * tokens + 12.0 * arch.num_layers * arch.num_heads * arch.head_dim * seq * tokens


def init_weights(model: torch.nn.Module) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layer_norm" in name):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--seq-lens", default="2048,4096")
    ap.add_argument("--micro-batches", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per point (after one warm-up)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: the table)")
    ap.add_argument("--append", default=None, help="append the table to this markdown file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step (CPU CI)")
    args = ap.parse_args()
    if args.smoke:
        args.shapes, args.seq_lens, args.micro_batches, args.steps = "smoke", "32", "1,2", 1
        if not torch.cuda.is_available():
            torch.set_num_threads(1)

    from asyncgrpo.trainer.hf_mapping import ModelArch
    from asyncgrpo.trainer.logprobs import token_logprobs
    from asyncgrpo.trainer.model import build_gpt_model, destroy_parallel, init_parallel, is_te_model

    dtype = getattr(torch, args.dtype)
    cuda = torch.cuda.is_available()
    peak = args.peak_tflops or (peak_for(device_name()) if cuda else None)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    init_parallel(tp_size=1, seed=0)
    rows, spec_name = [], "?"
    try:
        for shape in args.shapes.split(","):
            arch = ModelArch.from_hf_config(SHAPES[shape])
            seqs = [int(s) for s in args.seq_lens.split(",")]
            arch = replace(arch, max_position_embeddings=max(arch.max_position_embeddings, max(seqs)))
            t = time.perf_counter()
            model = build_gpt_model(arch, 1, dtype)
            init_weights(model)
            model.train()
            spec_name = "TE spec" if is_te_model(model) else "local spec"
            device = next(model.parameters()).device
            print(f"{shape}: N = {matmul_params(arch) / 1e6:.0f}M matmul params, built on {device} in "
                  f"{time.perf_counter() - t:.1f}s ({spec_name}, {args.dtype})", flush=True)
            gen = torch.Generator(device=device).manual_seed(0)
            for seq in seqs:
                for mb in [int(m) for m in args.micro_batches.split(",")]:
                    ids = torch.randint(0, arch.vocab_size, (mb, seq), device=device, generator=gen)
                    try:
                        times = []
                        for i in range(1 + args.steps):
                            sync()
                            t0 = time.perf_counter()
                            lp, _ = token_logprobs(model, ids, 1.0, arch.vocab_size)
                            (-lp[:, 1:].mean()).backward()
                            sync()
                            if i:
                                times.append(time.perf_counter() - t0)
                            model.zero_grad(set_to_none=True)
                            del lp
                        step_s = sum(times) / len(times)
                        flops = step_flops(arch, seq, mb)
                        tflops = flops / step_s / 1e12
                        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
                        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "-"
                        rows.append((shape, seq, mb, mb * seq, step_s, mb * seq / step_s, flops / 1e12, tflops, mfu, mem))
                        print(f"  seq {seq} mb {mb}: {step_s * 1e3:.1f} ms/step, {mb * seq / step_s:,.0f} tokens/s, "
                              f"{tflops:.1f} TFLOPS, MFU {mfu}, peak mem {mem} GiB", flush=True)
                    except torch.OutOfMemoryError:
                        model.zero_grad(set_to_none=True)
                        rows.append((shape, seq, mb, mb * seq, None, None, step_flops(arch, seq, mb) / 1e12, None, "OOM", "-"))
                        print(f"  seq {seq} mb {mb}: OOM", flush=True)
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
            del model
    finally:
        destroy_parallel()

    def fmt(x: float | None, f: str) -> str:
        return "-" if x is None else format(x, f)

    cmd = "python benchmarks/gpu/trainer_mfu.py " + shlex.join(sys.argv[1:])
    by = f" (run by `{os.environ['ASYNCGRPO_RUN_ALL']}`)" if os.environ.get("ASYNCGRPO_RUN_ALL") else ""
    peak_s = f"{peak:.0f} TFLOPS dense bf16" if peak else "no peak known for this device"
    lines = [
        f"\n## trainer MFU ({dt.date.today().isoformat()}, {device_name()}, {args.dtype}, megatron-core {spec_name}, "
        f"TP 1{', smoke' if args.smoke else ''})\n",
        "| shape | seq len | micro-batch | tokens/step | step s (fwd+bwd) | tokens/s | model TFLOP/step | TFLOPS | MFU "
        "| peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {s} | {q} | {m} | {t} | {fmt(st, '.3f')} | {fmt(tps, ',.0f')} | {fl:.1f} | {fmt(tf, '.1f')} | {mfu} | {mem} |"
          for s, q, m, t, st, tps, fl, tf, mfu, mem in rows],
        f"\n`{cmd}`{by}. FLOPs/step = 6·N·T + 12·L·(heads·head_dim)·S·T (PaLM/Megatron convention: full S×S attention; "
        f"N = matmul params incl. the LM head, T = micro-batch·S tokens); MFU against {peak_s}. One step = the "
        "trainer's token_logprobs forward + backward of -mean log-prob, no optimizer step; random weights and tokens.\n",
    ]
    append_markdown(args.append, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
