"""Per-token KL estimators between the policy and the frozen reference (Schulman's k1/k2/k3).

With ``delta = logp - ref_logp`` for tokens sampled from the policy:

* k1 = delta                         (unbiased, high variance, can be negative)
* k2 = 0.5 * delta^2                 (biased, low variance, >= 0)
* k3 = exp(-delta) - 1 + delta       (unbiased, low variance, >= 0; = exp(ref - logp) - (ref - logp) - 1)

``delta`` is clamped to ``+-clamp`` first (AReaL uses 10) so that one token the reference finds absurd cannot
blow up k3's exponential. Gradients flow through ``logp`` only; the reference is detached.

The KL can regularise the policy in two places: as a term of the loss (core.policy_loss, ``actor.kl_ctl``) or,
with ``actor.use_kl_in_reward``, subtracted from each completion's reward before the advantages
(:func:`kl_in_reward`, verl's apply_kl_penalty for outcome rewards).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_k1(delta: Tensor) -> Tensor:
    """k1 = logp - ref."""
    return delta


def kl_k2(delta: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - ref)^2."""
    return 0.5 * delta.square()


def kl_k3(delta: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1 = exp(-delta) - 1 + delta."""
    return torch.exp(-delta) - 1.0 + delta


_KL_FNS: dict[str, Callable[[Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", clamp: float | None = 10.0) -> Tensor:
    """Per-token KL estimate, same shape as ``logp``; ``clamp=None`` disables the clamp of ``logp - ref_logp``."""
    fn = _KL_FNS.get(estimator)
    if fn is None:
        raise ValueError(f"kl_estimator {estimator!r} is not known; choose one of {list(KL_ESTIMATORS)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must have the same shape")
    delta = logp - ref_logp.detach()
    if clamp is not None:
        if clamp <= 0:
            raise ValueError(f"kl clamp={clamp} must be > 0 or None")
        delta = delta.clamp(-clamp, clamp)
    return fn(delta)


def kl_in_reward(
    rewards: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_ctl: float, estimator: str = "k1",
    clamp: float | None = 10.0,
) -> tuple[Tensor, Tensor]:
    """``(r_i - kl_ctl * KL_i, KL_i)`` with ``KL_i = sum over the completion's tokens of the per-token estimate``.

    The per-token penalty ``-kl_ctl * KL_t`` of verl's token-level rewards, summed as an outcome reward is; no
    gradient (``logp`` is the sampling-side policy, the trainer's pi_prox). ``rewards`` ``[B]``, the rest ``[B, T]``.
    """
    if kl_ctl < 0:
        raise ValueError(f"kl_ctl={kl_ctl} must be >= 0")
    if rewards.shape != logp.shape[:-1] or mask.shape != logp.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be [B] and mask {tuple(mask.shape)} [B, T] for log-probs "
                         f"{tuple(logp.shape)}")
    with torch.no_grad():
        kl = kl_penalty(logp.detach(), ref_logp, estimator, clamp)
        seq = torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum(dim=-1)
    return rewards - kl_ctl * seq.to(rewards.dtype), seq
