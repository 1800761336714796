"""Per-token KL estimators between the policy and the frozen reference (Schulman's k1/k2/k3).

With ``delta = logp - ref_logp`` for tokens sampled from the policy:

* k1 = delta                         (unbiased, high variance, can be negative)
* k2 = 0.5 * delta^2                 (biased, low variance, >= 0)
* k3 = exp(-delta) - 1 + delta       (unbiased, low variance, >= 0; = exp(ref - logp) - (ref - logp) - 1)

``delta`` is clamped to ``+-clamp`` first (AReaL uses 10) so that one token the reference finds absurd cannot
blow up k3's exponential. Gradients flow through ``logp`` only; the reference is detached.
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
