"""bf16 training (megatron Float16Module, fp32 master weights) against fp32 on the same weights and batch.

Tolerances are argued from bf16's precision. bf16 keeps 8 significant bits: round-to-nearest puts every stored
number within a relative u = 2**-8 = 3.9e-3 of the real one (fp32: 2**-24). In the bf16 trainer every weight is
stored rounded once, and every activation tensor the forward pass hands to the next op is rounded once (GEMMs
accumulate in fp32 inside the kernel, the attention softmax runs in fp32, then the result is stored in bf16).
Counted along the path from the token ids to one logit of the tiny model (2 layers):
    per layer 14 activation roundings (input norm, QKV GEMM + bias, RoPE, scores, softmax, probs x V, output
    projection, residual add, pre-MLP norm, fc1 GEMM, SiLU, gate x up, fc2 GEMM, residual add) + 6 stored
    weights (qkv, proj, fc1, fc2 and the two norms) = 20, x 2 layers = 40; + embedding, final norm weight,
    final norm output, output GEMM = K = 44 roundings.
Each is a relative perturbation of at most u of a tensor, with a sign that is random across elements (round to
nearest), so the perturbations of a logit z_i = <w_i, h> add in quadrature: |dz_i| ~ sqrt(K) u s, where s is the
scale sqrt(sum_j (w_ij h_j)^2) of the terms of the dot product. For this random-init model s is the logit's own
scale: rms(z) typically, max|z| at worst (the same weights give both; the K linear worst case, 44 u = 0.17
relative, is what the random signs make implausible). A log-prob at temperature T, log p_t = z_t/T - lse(z/T),
moves by (dz_t - E_p[dz]) / T, so
    max over tokens |d log p| <= 2 sqrt(K) u max|z| / T     (the token's logit and the lse, each at worst)
    mean over tokens |d log p| <= sqrt(K) u rms(z) / T
with z the fp32 logits of the batch (measured in the test). Here (max|z| 1.28, rms 0.17, T 0.8) that is 0.083 and
5.5e-3; observed 2.0e-3 and 7.4e-4. A real fault (a weight mapped wrongly, the master weights not copied back)
moves log-probs by O(0.1-1) on this model (the log-probs spread over 0.9). These bounds do not tell bf16 from
fp16 (whose rounding is 8x finer); the parameter-dtype checks of the update test do.

The backward pass rounds as many tensors again (the gradient of every rounded activation is itself stored in
bf16), so a gradient carries ~2K random-signed roundings: ||g_bf16 - g_fp32|| / ||g_fp32|| <= 2 sqrt(2K) u = 0.073
(observed 0.006). A lost micro-batch, a factor-2 normaliser or a loss-scale error is O(1).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asyncgrpo.trainer.train_step import Batch, GRPOTrainer, Sample, pack
from trainer import numerics
from trainer.workers import capture_grads, make_batch, make_config

pytestmark = pytest.mark.usefixtures("megatron_world1")

U_BF16 = 2.0**-8  # bf16 unit roundoff (8 significant bits)
K_FWD = 44  # bf16 roundings on the path from the ids to a logit (module docstring)
GRAD_RTOL_BF16 = 2 * math.sqrt(2 * K_FWD) * U_BF16  # 0.073: norm-wise relative gradient error


def logp_bounds(z: torch.Tensor, temperature: float) -> tuple[float, float]:
    """(max, mean) bound on |bf16 log p - fp32 log p| from the fp32 logits z (module docstring)."""
    s = math.sqrt(K_FWD) * U_BF16
    return 2 * s * float(z.abs().max()) / temperature, s * float(z.pow(2).mean().sqrt()) / temperature


def bf16_config(model_dir: Path, **kw):
    cfg = make_config(model_dir, **kw)
    cfg.trainer.dtype = "bfloat16"
    return cfg


def master_params(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    """megatron name -> the optimizer's fp32 master copy of that bf16 parameter (Float16OptimizerWithFloat16Params)."""
    from asyncgrpo.trainer.model import unwrap

    names = {id(p): n for n, p in unwrap(trainer.model).named_parameters()}
    out = {}
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            for p, main in zip(model_group, main_group):
                out[names[id(p)]] = main
    return out


def model_params(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    from asyncgrpo.trainer.model import unwrap

    return dict(unwrap(trainer.model).named_parameters())


def behav_from(trainer: GRPOTrainer, batch: Batch) -> Batch:
    """The batch with behaviour log-probs = this (fp32) trainer's own: plain on-policy GRPO for fp32, and for bf16
    exactly the train/inference mismatch of an fp32 sampler."""
    packed = pack(batch.samples, 0)
    with torch.no_grad():
        prox = trainer._logp(trainer.model, packed["input_ids"])[0].cpu()
    out = []
    for i, s in enumerate(batch.samples):
        p = len(s.prompt_ids)
        out.append(Sample(s.prompt_ids, s.completion_ids, prox[i, p : p + len(s.completion_ids)].tolist(), s.token_versions,
                          s.reward, s.group_id))
    return Batch(out)


@pytest.fixture(scope="module")
def one_step(tiny_model_dir: Path, megatron_world1: None) -> dict:
    """An fp32 and a bf16 trainer from the same HF weights: log-probs of a fixed batch, then one step each."""
    from asyncgrpo.trainer.logprobs import forward_logits

    tr32, tr16 = GRPOTrainer(make_config(tiny_model_dir)), GRPOTrainer(bf16_config(tiny_model_dir))
    batch = behav_from(tr32, make_batch(7))
    packed = pack(batch.samples, 0)
    T = tr32.cfg.actor.temperature
    with torch.no_grad():
        z = forward_logits(tr32.model, packed["input_ids"]).float().cpu()
        lp32 = tr32._logp(tr32.model, packed["input_ids"])[0].cpu()
        lp16 = tr16._logp(tr16.model, packed["input_ids"])[0].cpu()
    out: dict = {"z": z, "T": T, "mask": packed["loss_mask"], "lp32": lp32, "lp16": lp16}
    for name, tr, weights in (("fp32", tr32, model_params), ("bf16", tr16, master_params)):
        before = {k: v.detach().float().clone() for k, v in weights(tr).items()}
        grads = capture_grads(tr)
        stats = tr.train_step(batch)
        after = {k: v.detach().float().clone() for k, v in weights(tr).items()}
        out[name] = {"trainer": tr, "before": before, "after": after, "grads": dict(grads), "stats": stats}
    return out


def test_bf16_logprobs_match_fp32(one_step: dict) -> None:
    """(a) The bf16 trainer's log-probs of a fixed batch vs the fp32 trainer's from the same weights, over the
    completion tokens: max and mean |delta| within the bounds of the module docstring, and not 0 (the bf16 model
    really computes in bf16: an fp32 pair differs by <= numerics.LOGP_ATOL = 3e-5)."""
    m = one_step["mask"]
    d = (one_step["lp16"] - one_step["lp32"]).abs()[m]
    max_bound, mean_bound = logp_bounds(one_step["z"], one_step["T"])
    msg = (f"bf16 vs fp32 log-probs over {int(m.sum())} completion tokens: max|d| {float(d.max()):.3e} (bound {max_bound:.3e}), "
           f"mean|d| {float(d.mean()):.3e} (bound {mean_bound:.3e}); fp32 max|z| {float(one_step['z'].abs().max()):.3f}, "
           f"rms(z) {float(one_step['z'].pow(2).mean().sqrt()):.3f}, T {one_step['T']}")
    print(f"[bf16] {msg}")
    assert float(d.max()) <= max_bound and float(d.mean()) <= mean_bound, msg
    assert float(d.max()) > numerics.LOGP_ATOL, f"bf16 log-probs equal fp32's to fp32 precision: not computed in bf16? {msg}"


def test_bf16_step_keeps_fp32_master_weights_and_moves_like_fp32(one_step: dict) -> None:
    """(b) One bf16 step: the model's parameters are bf16, the optimizer's master copies fp32 (one per parameter,
    same shape); after the step each bf16 parameter is exactly its master rounded to bf16 (megatron copies main ->
    model by a cast). The gradient is fp32's within GRAD_RTOL_BF16 norm-wise (module docstring). The update goes
    the same way: Adam's first step is ~ -lr sign(g) per entry, so cos(update_bf16, update_fp32) = 1 - 2f with f
    the fraction of entries whose gradient sign bf16 flips; a flip needs |g_i| below the bf16 gradient error
    (<= 7% of the norm), i.e. an entry within a few % of zero, and such entries are a few % of the weights:
    cos > 0.9 (observed 0.99). A sign error or a step on stale weights gives cos <= 0."""
    tr16 = one_step["bf16"]["trainer"]
    params, masters = model_params(tr16), master_params(tr16)
    assert {p.dtype for p in params.values()} == {torch.bfloat16}, {n: p.dtype for n, p in params.items()}
    assert set(masters) == set(params), sorted(set(masters) ^ set(params))
    for n, main in masters.items():
        assert main.dtype == torch.float32 and main.shape == params[n].shape, (n, main.dtype, main.shape)
        assert torch.equal(params[n].detach(), main.detach().to(torch.bfloat16)), f"{n}: bf16 param != its master rounded to bf16"
    r16, r32 = one_step["bf16"], one_step["fp32"]
    assert r16["stats"]["update_ok"] == 1.0 and math.isfinite(r16["stats"]["loss"])
    # the masters moved by Adam's ~lr per entry, in fp32 (a bf16 master would move in steps of ulp_bf16(w))
    numerics.assert_moved(r16["before"], r16["after"], r16["stats"]["lr"], "bf16 masters")

    def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([d[k].double().flatten() for k in sorted(d)])

    g16, g32 = flat(r16["grads"]), flat(r32["grads"])
    g_rel = float((g16 - g32).norm() / g32.norm())
    u16 = flat(r16["after"]) - flat(r16["before"])
    u32 = flat(r32["after"]) - flat(r32["before"])
    cos = float(u16 @ u32 / (u16.norm() * u32.norm()))
    gn16, gn32 = r16["stats"]["grad_norm"], r32["stats"]["grad_norm"]
    msg = (f"bf16 vs fp32 step: gradient ||d||/||g|| {g_rel:.3e} (bound {GRAD_RTOL_BF16:.3f}), update cosine {cos:.4f} "
           f"(bound 0.9), grad norm {gn16:.5f} vs {gn32:.5f}")
    print(f"[bf16] {msg}")
    assert g_rel <= GRAD_RTOL_BF16, msg
    assert abs(gn16 - gn32) <= GRAD_RTOL_BF16 * gn32, msg  # |(||a|| - ||b||)| <= ||a - b||
    assert cos > 0.9, msg


def test_bf16_training_reduces_the_loss_like_fp32(tiny_model_dir: Path) -> None:
    """(c) Five steps on one fixed batch: the loss (-objective) falls at every step in bf16 as in fp32, and bf16's
    total decrease is within 20% of fp32's. Each step moves every weight by ~lr sign(g) and the signs agree on
    (1 + cos) / 2 >= 95% of the entries (test above), so the bf16 step makes ~cos >= 0.9 of fp32's progress per
    step; 20% leaves room for that and for the log-prob mismatch in the behaviour weights (<= 0.08, exp(0.08) - 1
    = 8% of a token's weight at worst). Observed: within 1%. A bf16 run that does not learn (masters not stepped,
    updates lost in bf16 rounding) decreases by ~0."""
    losses = {}
    base = GRPOTrainer(make_config(tiny_model_dir))
    batch = behav_from(base, make_batch(7))
    for name, cfg in (("fp32", make_config(tiny_model_dir)), ("bf16", bf16_config(tiny_model_dir))):
        tr = GRPOTrainer(cfg)
        losses[name] = [tr.train_step(batch)["loss"] for _ in range(5)]
    d32 = losses["fp32"][0] - losses["fp32"][-1]
    d16 = losses["bf16"][0] - losses["bf16"][-1]
    msg = f"losses over 5 steps: fp32 {[round(x, 5) for x in losses['fp32']]}, bf16 {[round(x, 5) for x in losses['bf16']]}"
    print(f"[bf16] {msg}")
    for name, ls in losses.items():
        assert all(b < a for a, b in zip(ls, ls[1:])), f"{name} loss did not fall at every step: {msg}"
    assert d32 > 0.1, msg  # the check is not vacuous: the fp32 objective improves by O(1)
    assert abs(d16 - d32) <= 0.2 * d32, f"bf16 decrease {d16:.4f} vs fp32 {d32:.4f}: {msg}"


def test_bf16_export_hf_loads_and_matches(tiny_model_dir: Path, tmp_path: Path) -> None:
    """(d) export_hf of a bf16 trainer. Before any step it is the HF checkpoint rounded to bf16, bit for bit (the
    mapping only permutes and concatenates). After a step it is the fp32 masters rounded to bf16, bit for bit,
    in HF layout. The saved checkpoint loads in transformers: in fp32 (the bf16 values are exact in fp32) its
    logits are the bf16 trainer's weights evaluated in fp32, equal to an fp32 megatron model loaded from the same
    directory within numerics.LOGIT_ATOL (fp32 rounding only); in bf16 (HF's kernels vs megatron's, both bf16)
    its logits differ from the bf16 trainer's by at most 2 sqrt(K) u max|z| (each side within sqrt(K) u max|z| of
    the exact value, module docstring)."""
    from transformers import AutoModelForCausalLM

    from asyncgrpo.trainer.hf_mapping import ModelArch, megatron_param_to_hf
    from asyncgrpo.trainer.logprobs import forward_logits
    from asyncgrpo.trainer.model import build_gpt_model, load_hf_weights, save_hf_checkpoint

    hf = load_file(str(tiny_model_dir / "model.safetensors"))
    tr = GRPOTrainer(bf16_config(tiny_model_dir))
    exported = dict(tr.export_hf())
    assert set(exported) == set(hf)
    for k, v in exported.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, hf[k].to(torch.bfloat16)), k
    tr.train_step(behav_from(GRPOTrainer(make_config(tiny_model_dir)), make_batch(4)))
    exported = dict(tr.export_hf())
    from_masters = {h: t for n, m in master_params(tr).items() for h, t in megatron_param_to_hf(n, [m.detach().cpu()], tr.arch)}
    moved = 0
    for k, v in exported.items():
        assert torch.equal(v, from_masters[k].to(torch.bfloat16)), f"{k}: export != masters rounded to bf16"
        moved += int((v.float() != hf[k].to(torch.bfloat16).float()).sum())
    assert moved > 0.5 * sum(v.numel() for v in hf.values()), "the step did not move the exported weights"

    out = save_hf_checkpoint(tr.model, tr.arch, tiny_model_dir, tmp_path / "hf")
    assert out is not None
    ids = torch.randint(0, 384, (3, 10), generator=torch.Generator().manual_seed(3))
    arch = ModelArch.from_dir(out)
    ref32 = build_gpt_model(arch, 1)
    load_hf_weights(ref32, out, arch)
    with torch.no_grad():
        hf32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")(ids).logits
        hf16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, attn_implementation="eager")(ids).logits.float()
        z32 = forward_logits(ref32, ids).float()
        z16 = forward_logits(tr.model, ids).float()
    d32 = float((hf32 - z32).abs().max())
    d16 = float((hf16 - z16).abs().max())
    bound16 = 2 * math.sqrt(K_FWD) * U_BF16 * float(z32.abs().max())
    msg = (f"saved bf16 checkpoint: HF fp32 vs megatron fp32 logits max|d| {d32:.3e} (tol {numerics.LOGIT_ATOL:g}); "
           f"HF bf16 vs the bf16 trainer max|d| {d16:.3e} (bound {bound16:.3e}, max|z| {float(z32.abs().max()):.3f})")
    print(f"[bf16] {msg}")
    assert d32 < numerics.LOGIT_ATOL and d16 <= bound16, msg


def test_bf16_reference_model_and_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bf16 end to end: (1) the reference model (kl_ctl > 0) is bf16 like the policy, norms included (Float16Module),
    so at the first step policy and reference run the same bf16 weights through the same kernels and the KL is
    0 (observed exactly; it would carry the bf16 rounding of the norm weights, ~u, were the reference's norms left
    in fp32);
    after one step it is > 1e-5 (one Adam step at lr 1e-3 gives ~6e-4). (2) A checkpoint restores the fp32 master
    weights themselves, not their bf16 roundings: after a resume the masters are bit-identical to the saved
    trainer's and the next step is bit-identical too (same computation, same process)."""
    from asyncgrpo.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from asyncgrpo.trainer.model import unwrap

    tr = GRPOTrainer(bf16_config(tiny_model_dir, kl_ctl=0.1))
    assert tr.ref is not None and {p.dtype for p in unwrap(tr.ref).parameters()} == {torch.bfloat16}
    first, second = tr.train_step(make_batch(2)), tr.train_step(make_batch(3))
    # observed exactly 0; 1e-6 as in test_trainer's fp32 check (k3 of a log-prob difference at kernel noise)
    assert abs(first["kl_ref"]) <= 1e-6, f"bf16 kl_ref at the first step {first['kl_ref']!r}"
    assert second["kl_ref"] > 1e-5, f"bf16 kl_ref after one step {second['kl_ref']!r}"

    a = GRPOTrainer(bf16_config(tiny_model_dir))
    a.train_step(make_batch(1))
    save_checkpoint(a, tmp_path)
    saved_masters = {k: v.detach().clone() for k, v in master_params(a).items()}
    want = a.train_step(make_batch(2))
    want_w = dict(a.export_hf())
    b = GRPOTrainer(bf16_config(tiny_model_dir))
    step_dir = latest_checkpoint(tmp_path)
    assert step_dir is not None
    load_checkpoint(b, step_dir)
    for k, v in master_params(b).items():
        assert torch.equal(v, saved_masters[k]), f"{k}: resumed master != saved master (max|d| {float((v - saved_masters[k]).abs().max()):.3e})"
    got = b.train_step(make_batch(2))
    assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"]), (got, want)
    for k, v in b.export_hf():
        assert torch.equal(v, want_w[k]), k
