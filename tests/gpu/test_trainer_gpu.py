"""The megatron trainer on CUDA: a bf16 step, and the trainer's log-probs against the genserver's on the GPU.

Skipped where torch.cuda.is_available() is False (CI, the CPU machines) and where megatron-core is missing. On a
GPU the trainer places the model on the current CUDA device, uses NCCL, passes no explicit attention mask
(megatron's causal default / TE's causal kernels) and keeps every per-token tensor of a step on the device;
megatron_compat's CPU shims are never installed there (checked first).

Tolerances are the bf16 arguments of tests/trainer/test_bf16.py (u = 2**-8, K = 44 roundings from the ids to a
logit, random-signed, so a bf16 logit is within sqrt(K) u s of the exact one, s ~ max|z| for the tiny random-init
model): on a GPU the GEMMs (cuBLAS) also accumulate in fp32 and store bf16, so the same count holds.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU trainer tests need one"),
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed"),
]

U_BF16 = 2.0**-8
U_TF32 = 2.0**-11  # should fp32 GEMMs run as TF32 (10 explicit mantissa bits), the fp32 floor is this, not 2**-24
K_FWD = 44


@pytest.fixture(scope="module")
def world1() -> Iterator[None]:
    from asyncgrpo.trainer.model import destroy_parallel, init_parallel

    init_parallel(1, seed=0)
    yield
    destroy_parallel()


def _config(model_dir: Path, dtype: str):
    from trainer.workers import make_config

    cfg = make_config(model_dir)
    cfg.trainer.dtype = dtype
    return cfg


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].double().flatten().cpu() for k in sorted(d)])


def test_cuda_shims_stay_off_and_nccl_is_used(world1: None) -> None:
    import torch.distributed as dist

    from asyncgrpo.trainer import megatron_compat
    from asyncgrpo.trainer.model import compute_device

    assert not megatron_compat.cpu_only() and not megatron_compat._installed
    assert isinstance(torch.cuda.current_device(), int)  # not the CPU-device shim
    assert dist.get_backend() == "nccl"
    assert compute_device().type == "cuda"


def test_bf16_step_on_cuda(tiny_model_dir: Path, world1: None) -> None:
    """One bf16 step on the GPU against one fp32 step on the GPU, as test_bf16's (b) on the CPU: bf16 params on
    cuda, fp32 masters on cuda, param == master rounded to bf16 after the step; gradient within 2 sqrt(2K) u
    (0.073) of fp32's norm-wise; update cosine > 0.9."""
    from asyncgrpo.trainer.train_step import GRPOTrainer
    from trainer.test_bf16 import GRAD_RTOL_BF16, behav_from, master_params, model_params
    from trainer.workers import capture_grads, make_batch

    tr32 = GRPOTrainer(_config(tiny_model_dir, "float32"))
    tr16 = GRPOTrainer(_config(tiny_model_dir, "bfloat16"))
    batch = behav_from(tr32, make_batch(7))
    runs = {}
    for name, tr, weights in (("fp32", tr32, model_params), ("bf16", tr16, master_params)):
        before = {k: v.detach().float().clone() for k, v in weights(tr).items()}
        grads = capture_grads(tr)
        stats = tr.train_step(batch)
        after = {k: v.detach().float().clone() for k, v in weights(tr).items()}
        runs[name] = dict(before=before, after=after, grads=dict(grads), stats=stats)
    params, masters = model_params(tr16), master_params(tr16)
    for n, p in params.items():
        assert p.is_cuda and p.dtype == torch.bfloat16, (n, p.device, p.dtype)
        m = masters[n]
        assert m.is_cuda and m.dtype == torch.float32, (n, m.device, m.dtype)
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16)), n
    s16 = runs["bf16"]["stats"]
    assert s16["update_ok"] == 1.0 and math.isfinite(s16["loss"]) and math.isfinite(s16["grad_norm"]), s16
    g16, g32 = _flat(runs["bf16"]["grads"]), _flat(runs["fp32"]["grads"])
    g_rel = float((g16 - g32).norm() / g32.norm())
    u16 = _flat(runs["bf16"]["after"]) - _flat(runs["bf16"]["before"])
    u32 = _flat(runs["fp32"]["after"]) - _flat(runs["fp32"]["before"])
    cos = float(u16 @ u32 / (u16.norm() * u32.norm()))
    msg = f"CUDA bf16 vs fp32 step: gradient ||d||/||g|| {g_rel:.3e} (bound {GRAD_RTOL_BF16:.3f}), update cosine {cos:.4f}"
    print(f"[gpu] {msg}")
    assert g_rel <= GRAD_RTOL_BF16 and cos > 0.9, msg


def _load_benchmark():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "logprob_mismatch.py"
    spec = importlib.util.spec_from_file_location("logprob_mismatch", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trainer_vs_genserver_logprobs_on_cuda(tiny_model_dir: Path, world1: None) -> None:
    """The genserver (HF model on cuda, continuous batch, KV cache) samples 16 completions; the trainer on cuda
    recomputes their log-probs. In bf16 each side's logit is within sqrt(K) u max|z| of the exact value, so

        max |trainer - genserver| <= 2 * 2 sqrt(K) u max|z| / T     (two bf16 sides, token logit and lse each)

    with max|z| the fp32 trainer's logits on those tokens (~1.3 for the tiny model: bound ~0.17 at T = 1).
    fp32 on both sides: the same argument with u = 2**-11 (TF32 GEMMs, should they be enabled; 2**-24 otherwise),
    bound ~0.02. A wrong weight layout, a position offset or a missing temperature is O(0.1-1) here."""
    bench = _load_benchmark()
    from argparse import Namespace

    from asyncgrpo.trainer.logprobs import forward_logits
    from asyncgrpo.trainer.train_step import GRPOTrainer, Sample, pack

    a = Namespace(max_new_tokens=16, temperature=1.0, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(4, 20, (16,), generator=g)]
    results = {}
    for dt, u in (("bfloat16", U_BF16), ("float32", U_TF32)):
        gen = bench.generate(tiny_model_dir, dt, "cuda", prompts, a)
        seqs = [(p, c) for p, (c, _) in zip(prompts, gen)]
        tr_lp = bench.trainer_logprobs(tiny_model_dir, dt, seqs, a.temperature)
        d = torch.tensor([abs(x - y) for tl, (_, gl) in zip(tr_lp, gen) for x, y in zip(tl, gl)], dtype=torch.float64)
        results[dt] = (float(d.max()), float(d.mean()), u)
    ref = GRPOTrainer(_config(tiny_model_dir, "float32"))
    samples = [Sample(p, c, [0.0] * len(c), [0] * len(c), 0.0, f"g{i}") for i, (p, c) in enumerate(seqs)]
    with torch.no_grad():
        zmax = float(forward_logits(ref.model, pack(samples, 0)["input_ids"]).float().abs().max())
    lines = []
    ok = True
    for dt, (mx, mn, u) in results.items():
        bound = 4 * math.sqrt(K_FWD) * u * zmax / a.temperature
        ok &= mx <= bound
        lines.append(f"{dt}: max|d| {mx:.3e} (bound {bound:.3e}), mean|d| {mn:.3e}")
    msg = f"CUDA trainer vs genserver log-probs (max|z| {zmax:.3f}): " + "; ".join(lines)
    print(f"[gpu] {msg}")
    assert ok, msg
