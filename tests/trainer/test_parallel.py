"""TP=1, TP=2 and DP=2 (gloo, spawned processes) give HF's logits and the same training step (with the KL to
another model in the rewards, which each DP rank computes for its own groups only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from service_procs import free_port
from trainer import numerics
from trainer.workers import make_config, step_worker

pytestmark = pytest.mark.slow

# (world size, TP, micro-batch size, process rewards): DP = world / TP. Micro-batch sizes differ on purpose: the
# step must not depend on them. The *_process runs train grpo_process on step rewards (per-token advantages).
CONFIGS = {"tp1": (1, 1, 3, False), "tp2": (2, 2, 8, False), "dp2": (2, 1, 2, False),
           "tp1_process": (1, 1, 3, True), "dp2_process": (2, 1, 2, True)}


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    from asyncgrpo.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("parallel_runs")
    ref = build_tiny_model(out / "ref", preset="tiny", arch="qwen2", seed=1)  # another random model: KL ~ 1 per token
    results = {}
    for name, (world, tp, mbs, process) in CONFIGS.items():
        path = out / f"{name}.pt"
        mp.spawn(step_worker, args=(world, tp, mbs, free_port(), str(tiny_model_dir), str(path), str(ref), process),
                 nprocs=world, join=True)
        results[name] = torch.load(path, weights_only=False)
    return results


@pytest.mark.parametrize("name", ["tp1", "tp2", "dp2"])
def test_logits_match_hf(runs: dict, name: str) -> None:
    # fp32 rounding only (numerics.LOGIT_ATOL); TP=2 sums attention / MLP outputs and the vocabulary in
    # another order, observed 1.8e-7.
    diff, scale = runs[name]["logit_diff"], runs[name]["logit_scale"]
    assert diff < numerics.LOGIT_ATOL, f"{name}: max|logits - HF logits| {diff:.3e} (max|logit| {scale:.3f}) >= {numerics.LOGIT_ATOL:g}"
    print(f"[numerics] {name}: logits max|diff| vs HF {diff:.1e} (tol {numerics.LOGIT_ATOL:g})")


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_export_round_trip_bit_exact(runs: dict, name: str, tiny_model_dir: Path) -> None:
    # Exact by construction: loading slices and concatenates tensors, export gathers and re-slices them.
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    exported = runs[name]["exported"]
    assert set(exported) == set(original)
    for k, v in original.items():
        assert torch.equal(exported[k], v), f"{name}: {k}: max|diff| {float((exported[k] - v).abs().max()):.3e}"


@pytest.mark.parametrize(("name", "base"), [("tp2", "tp1"), ("dp2", "tp1"), ("dp2_process", "tp1_process")])
def test_step_matches_tp1(runs: dict, name: str, base: str, tiny_model_dir: Path) -> None:
    """The same step as TP=1 on what it defines: loss, statistics and gradients within fp32 rounding
    (tolerances argued in trainer/numerics.py), and an Adam update that is Adam's of that gradient. dp2_process:
    per-token process advantages sliced over DP ranks and micro-batches give the DP=1 step."""
    ref, got = runs[base], runs[name]
    # the KL really shapes the rewards (k1 of two random models: |KL| ~ 1e-2 per completion, x kl_ctl 1)
    assert abs(ref["stats"]["kl_reward_mean"]) > 1e-3, ref["stats"]["kl_reward_mean"]
    # a completion's KL sums <= 8 token log-prob differences, each off by fp32 rounding across TP (~1e-6): 1e-5
    for key in ("kl_reward_mean", "adv_max", "adv_min"):
        d = abs(got["stats"][key] - ref["stats"][key])
        assert d <= 1e-5, f"{name}: {key} {got['stats'][key]!r} vs {base} {ref['stats'][key]!r}: |diff| {d:.2e}"
    diffs = numerics.assert_stats_close(got["stats"], ref["stats"], name)
    grad_rel = numerics.assert_grads_close(got["grads"], ref["grads"], name)
    opt = make_config(tiny_model_dir).optimizer
    for run_name, run in ((base, ref), (name, got)):
        numerics.assert_moved(run["exported"], run["updated"], run["stats"]["lr"], run_name)
        numerics.assert_adam_update(run["exported"], run["updated"], run["grads"], run["stats"], opt.eps, opt.gradient_clipping, run_name)
    update_diff, defined = numerics.assert_adam_updates_agree(got, ref, opt.eps, opt.gradient_clipping, name)
    assert defined > 0.5, f"{name}: Adam's update is defined robustly on only {defined:.3f} of the weights"
    print(numerics.summary(name, diffs, grad_rel, update_diff, defined))
