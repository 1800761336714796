"""Comparisons of two fp32 training steps on what the step defines, with tolerances argued from fp32.

Two runs of the same step that differ only in how the arithmetic is laid out (TP shards, DP ranks,
micro-batch size, the CPU's matmul kernel, the thread count) compute the same real numbers with different
rounding: summation order over the hidden size, the vocabulary (split across TP ranks and then
all-reduced) and the tokens (split across micro-batches and DP ranks) differs. What the step defines is
therefore the loss, its statistics and the gradient, each up to fp32 rounding of those sums.

Weights after one Adam step are NOT defined to that precision: Adam's first step is
-lr * g / (|g| + eps), i.e. about -lr * sign(g), so an entry whose gradient is at the rounding noise moves
by +lr or -lr depending on the kernel (the reason the old `atol=2e-5` weight comparison failed on some
CPUs). So the update is checked per run against Adam's formula applied to that run's own gradient, and
across runs only where |g| is far above the gradient tolerance (there the sign, hence the update, agrees).

fp32 unit roundoff u = 2**-24 = 6.0e-8. Every number below is printed on failure with where it occurred.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

U = 2.0**-24  # fp32 unit roundoff

# fp32 logits (|z| <= ~1.3) of the same weights through other layers (megatron's vs HF's, TP shards): chains
# of ~10 reductions over <= 128 terms with random-signed roundings, ~10 * sqrt(128) * u = 6.8e-6 relative to
# |z|; 1e-5 absolute. Observed <= 2e-7 (exactly 0 where both sides run the same kernels). A wrong weight
# mapping, RoPE or vocab split is O(|z|).
LOGIT_ATOL = 1e-5
# log p = z/T - lse(z/T) ~ -6: the log of a sum of 384 exponentials is off by at most gamma_384 = 384 u =
# 2.3e-5 (worst case), plus a few ulp(6) = 4.8e-7. Observed <= 1e-6 (AVX2 or non-vectorised kernels).
LOGP_ATOL = 3e-5

# Gradient tolerance, relative to the largest |entry| of the compared tensor. A gradient entry is a sum over
# ~50-100 tokens of products of backpropagated chains through 2 layers, each step a dot product over at most
# n = 384 terms (vocab; 128 ffn, 64 hidden, <= 15 key positions). Rounding errors are bounded by about
# (chain length ~10) * n * u = 2.3e-4 relative to the magnitudes summed (worst case, all roundings aligned)
# and are ~ 10 * sqrt(n) * u = 1.2e-5 when they are random-signed, as they are. 1e-4 sits between the two;
# observed differences (TP=2, DP=2, micro-batch size, AVX2 / non-vectorised kernels, 1 or 2 threads) are
# <= 1e-6. A real parallelism bug (a shard's contribution lost or counted twice, a normaliser off by a DP
# factor, a missing all-reduce) is an O(1) relative error of the tensor.
GRAD_RTOL = 1e-4

# Loss: at the first step ratio = 1, so loss = -aggregate(A * w) with w = exp(prox_logp - behav_logp). The
# runs' log-probs (~ -6) differ by a few ulp(6) = 4.8e-7 (log-softmax over 384 logits / T); with |A| <= 1.5
# and w <= 2 on these batches that moves the loss by < 4e-6. 1e-5 is below the smallest plausible bug: one
# token miscounted in the normaliser changes the loss (~0.04) by ~1/50 of itself, 8e-4.
LOSS_ATOL = 1e-5
# Entropy ~ ln 384 = 5.95, per token and as a token-weighted mean (fp64 sums over tokens): lse(z) - E_p[z]
# over 384 logits, worst-case rounding 384 * u * 6 = 1.4e-4. Observed <= 3e-7 between parallel layouts and
# <= 2e-6 against HF's -(p * log p).sum() (another formula).
ENTROPY_ATOL = 1.4e-4
# Mean behaviour weight ~ 1: exp of a log-prob difference that carries the same few-ulp(6) error as above.
BEHAV_WEIGHT_ATOL = 1e-5
# Global grad norm ||g||: each entry within GRAD_RTOL of its tensor's scale moves the norm by at most about
# GRAD_RTOL relative; the fp32 sum of ~1e5 squares adds <= log2(1e5) * u = 1e-6.
GRAD_NORM_RTOL = 1e-4


def max_rel_diff(got: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, str, float]:
    """(max over tensors of max|got - ref| / max|ref|, that tensor, its max|diff|)."""
    worst = (0.0, "", 0.0)
    for k, r in ref.items():
        d = float((got[k] - r).abs().max())
        rel = d / max(float(r.abs().max()), torch.finfo(torch.float32).tiny)
        if rel >= worst[0]:
            worst = (rel, k, d)
    return worst


def assert_grads_close(got: dict[str, Tensor], ref: dict[str, Tensor], what: str) -> float:
    """Every gradient tensor within GRAD_RTOL * max|ref| of the reference; returns the worst relative diff."""
    assert set(got) == set(ref), f"{what}: gradient names differ: {sorted(set(got) ^ set(ref))[:5]}"
    assert ref and all(float(r.abs().max()) > 0 for r in ref.values()), f"{what}: a reference gradient is all zero"
    for k, r in ref.items():
        scale = float(r.abs().max())
        diff = (got[k] - r).abs()
        i = int(diff.argmax())
        assert float(diff.max()) <= GRAD_RTOL * scale, (
            f"{what}: grad {k}: max|diff| {float(diff.max()):.3e} at flat index {i} (ref {float(r.flatten()[i]):.6e}, "
            f"got {float(got[k].flatten()[i]):.6e}) > {GRAD_RTOL:g} * max|ref| {scale:.3e}"
        )
    return max_rel_diff(got, ref)[0]


def adam_first_step(grads: dict[str, Tensor], lr: float, eps: float, grad_norm: float, max_norm: float) -> dict[str, Tensor]:
    """The update of Adam's first step (AdamW, no weight decay) on gradients clipped to max_norm as megatron
    clips them: -lr * c g / (|c g| + eps) with c = min(1, max_norm / (||g|| + 1e-6)); in fp64."""
    c = min(1.0, max_norm / (grad_norm + 1e-6)) if max_norm > 0 else 1.0
    return {k: -lr * (c * g.double()) / ((c * g.double()).abs() + eps) for k, g in grads.items()}


def _update_tol(w: Tensor, lr: float) -> Tensor:
    """Elementwise rounding of an observed update w1 - w0: w1 = fl(w0 + d) is off by <= ulp(w)/2 <= u * 2|w|
    (|w1| <= |w0| + lr), the subtraction by as much again, and Adam's own fp32 ops (lerp, sqrt, divide,
    bias corrections: ~6 roundings) by 6u relative to lr; doubled for margin."""
    return 2 * (4 * U * (w.double().abs() + lr) + 6 * U * lr)


def assert_adam_update(before: dict[str, Tensor], after: dict[str, Tensor], grads: dict[str, Tensor], stats: dict,
                       eps: float, max_norm: float, what: str) -> None:
    """The weights moved by exactly Adam's first step on this run's own gradient (elementwise, rounding only)."""
    lr = stats["lr"]
    want = adam_first_step(grads, lr, eps, stats["grad_norm"], max_norm)
    for k, w0 in before.items():
        d = after[k].double() - w0.double()
        excess = (d - want[k]).abs() - _update_tol(w0, lr)
        i = int(excess.argmax())
        assert float(excess.max()) <= 0, (
            f"{what}: {k}: update {float(d.flatten()[i]):.6e} != Adam's {float(want[k].flatten()[i]):.6e} at flat index {i} "
            f"(grad {float(grads[k].flatten()[i]):.3e}, |diff| {float((d - want[k]).abs().flatten()[i]):.3e} > tolerance "
            f"{float(_update_tol(w0, lr).flatten()[i]):.3e})"
        )


def assert_adam_updates_agree(got: dict, ref: dict, eps: float, max_norm: float, what: str) -> tuple[float, float]:
    """Where Adam's first step is defined robustly, two runs moved the weights the same way.

    f(g) = g / (|g| + e) (e = eps / c) has slope e / (|g| + e)^2, so where |g_ref| > 100 * atol (atol =
    GRAD_RTOL * max|g_ref| of the tensor, which bounds |g_got - g_ref| by assert_grads_close) both runs have
    the same sign and lr * |f(g_got) - f(g_ref)| <= lr * e * atol / (|g_ref| - atol)^2. Elsewhere the sign is
    the kernel's coin toss and the update is only bounded by lr. Returns (max|update diff| where defined,
    fraction of entries where defined)."""
    lr = ref["stats"]["lr"]
    c = min(1.0, max_norm / (ref["stats"]["grad_norm"] + 1e-6)) if max_norm > 0 else 1.0
    e = eps / c
    worst, n_def, n_all = 0.0, 0, 0
    for k, w0 in ref["exported"].items():
        g = ref["grads"][k].double().abs()
        atol = GRAD_RTOL * float(g.max())
        defined = g > 100 * atol
        d_ref = ref["updated"][k].double() - w0.double()
        d_got = got["updated"][k].double() - got["exported"][k].double()
        diff = (d_got - d_ref).abs()
        tol = lr * e * atol / (g - atol).clamp(min=atol) ** 2 + 2 * _update_tol(w0, lr)
        excess = torch.where(defined, diff - tol, torch.zeros_like(diff))
        i = int(excess.argmax())
        assert float(excess.max()) <= 0, (
            f"{what}: {k}: update differs from the reference by {float(diff.flatten()[i]):.3e} at flat index {i} where Adam "
            f"is defined (|g_ref| {float(g.flatten()[i]):.3e} > 100 * atol {100 * atol:.3e}); tolerance {float(tol.flatten()[i]):.3e}"
        )
        bound = lr * (1 + 1e-6) + _update_tol(w0, lr)
        assert bool((d_got.abs() <= bound).all()), f"{what}: {k}: an entry moved by {float(d_got.abs().max()):.3e} > lr {lr:g}"
        if defined.any():
            worst = max(worst, float(diff[defined].max()))
        n_def += int(defined.sum())
        n_all += defined.numel()
    return worst, n_def / n_all


def assert_moved(before: dict[str, Tensor], after: dict[str, Tensor], lr: float, what: str) -> float:
    """The step really moved the weights: Adam's first step moves an entry by ~lr unless |g| ~ eps, so most
    entries move by more than lr / 2. Returns that fraction."""
    moved = sum(int(((after[k] - w).abs() > lr / 2).sum()) for k, w in before.items())
    total = sum(w.numel() for w in before.values())
    frac = moved / total
    assert frac > 0.5, f"{what}: only {frac:.3f} of the weights moved by more than lr/2 = {lr / 2:g}"
    return frac


def assert_stats_close(got: dict, ref: dict, what: str, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Loss and statistics of two runs of the same step (less `skip`); returns the observed |diff| of each."""
    # Discrete quantities are exact: at the first step ratio = exp(logp - prox) is 1 up to rounding (~1e-6),
    # 0.2 away from either clip boundary, so no token is clipped in any run; n_tokens and n_seqs count the
    # batch's completion tokens and samples (integers, summed in fp64).
    for key in ("clip_frac", "n_tokens", "n_seqs"):
        assert got[key] == ref[key], f"{what}: {key} {got[key]} != {ref[key]}"
    assert ref["clip_frac"] == 0.0, f"{what}: clip_frac {ref['clip_frac']} at the first step"
    diffs = {}
    for key, atol in (("loss", LOSS_ATOL), ("entropy", ENTROPY_ATOL), ("behav_weight_mean", BEHAV_WEIGHT_ATOL),
                      ("grad_norm", GRAD_NORM_RTOL * abs(ref["grad_norm"]))):
        if key in skip:
            continue
        d = abs(got[key] - ref[key])
        diffs[key] = d
        assert math.isfinite(got[key]) and d <= atol, f"{what}: {key} {got[key]!r} vs {ref[key]!r}: |diff| {d:.3e} > {atol:.3e}"
    return diffs


def summary(what: str, diffs: dict[str, float], grad_rel: float, update_diff: float, defined: float) -> str:
    """One line of observed differences against their tolerances (shown with pytest -s)."""
    stats = " ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    return (f"[numerics] {what}: grad max|diff|/max|g| {grad_rel:.1e} (tol {GRAD_RTOL:g}); {stats}; "
            f"Adam update max|diff| where defined {update_diff:.1e} on {defined:.0%} of the weights")
