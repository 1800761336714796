"""Advantage estimators: one reward per completion in, one advantage per completion out.

Rewards arrive as a ``[n_groups, G]`` tensor (G completions of the same prompt per row). Each estimator is a small
pure function; ``compute_advantages`` dispatches by name. The trainer broadcasts the result over a completion's
tokens.

Conventions that the anchors leave implicit, fixed here:

* A population of ONE element has no spread estimate, so its std is defined as 1 (verl's convention for a group of
  one), whether the std is biased or unbiased. With a group-level mean such a group gets advantage 0; with no
  centering it gets ``r / (1 + eps)``.
* All-equal rewards give std 0 and a centred numerator 0, so ``0 / (0 + eps) = 0``: never NaN.
* Leave-one-out mean of a group of one is the element itself (there are no "others"), so its advantage is 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NORM_LEVELS = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo", "dr_grpo")
_NORM_KWARGS = frozenset({"mean_level", "std_level", "mean_leave1out", "std_unbiased", "eps"})


def _as_float_rewards(rewards: Tensor) -> Tensor:
    """Validate the ``[n_groups, G]`` layout and return a floating tensor without grad history."""
    if not isinstance(rewards, Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be a 2-D tensor [n_groups, group_size], got shape {tuple(rewards.shape)}; "
            "reshape with rewards.view(n_groups, group_size)"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    return rewards.detach()


def _check_level(name: str, value: str) -> None:
    if value not in NORM_LEVELS:
        raise ValueError(f"{name}={value!r} is not a valid normalisation level; choose one of {list(NORM_LEVELS)}")


def _mean(x: Tensor, dim: int | None, leave1out: bool) -> Tensor:
    """Mean over ``dim`` (None = all elements), broadcastable to ``x``; leave-one-out excludes each element itself."""
    n = x.shape[dim] if dim is not None else x.numel()
    total = x.sum(dim=dim, keepdim=True) if dim is not None else x.sum()
    if not leave1out:
        return total / n
    if n <= 1:
        # No "others" to compare with: the element is its own baseline, advantage 0.
        return x.clone()
    return (total - x) / (n - 1)


def _std(x: Tensor, dim: int | None, unbiased: bool) -> Tensor:
    """Std over ``dim`` (None = all elements), broadcastable to ``x``; a population of one has std 1 (see module doc)."""
    n = x.shape[dim] if dim is not None else x.numel()
    if n <= 1:
        return torch.ones((), dtype=x.dtype, device=x.device)
    correction = 1 if unbiased else 0
    if dim is None:
        return x.std(correction=correction)
    return x.std(dim=dim, correction=correction, keepdim=True)


def group_advantages(
    rewards: Tensor,
    mean_level: str = "group",
    std_level: str = "group",
    mean_leave1out: bool = False,
    std_unbiased: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO advantage ``(r - mean) / (std + eps)`` with AReaL's independent mean/std levels.

    ``mean_level`` / ``std_level``: ``group`` (over each row), ``batch`` (over all ``n_groups * G`` rewards) or
    ``none`` (no centering / no division). ``mean_leave1out`` replaces each mean with the mean of the other
    elements of the same population, ``(sum - r_i) / (n - 1)``. ``std_unbiased`` picks the ``n - 1`` denominator
    (verl, torch.std) over ``n``. The std is always of the raw rewards at ``std_level``, independent of centering.
    """
    _check_level("mean_level", mean_level)
    _check_level("std_level", std_level)
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0 (it keeps all-equal rewards from dividing by zero)")
    r = _as_float_rewards(rewards)
    if r.numel() == 0:
        return r.clone()

    if mean_level == "none":
        centred = r
    else:
        centred = r - _mean(r, 1 if mean_level == "group" else None, mean_leave1out)

    if std_level == "none":
        return centred
    std = _std(r, 1 if std_level == "group" else None, std_unbiased)
    return centred / (std + eps)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO: ``r_i`` minus the mean of the other completions of its group, ``= G/(G-1) * (r_i - mean)``; G=1 gives 0."""
    r = _as_float_rewards(rewards)
    return r - _mean(r, 1, leave1out=True)


def dr_grpo_advantages(rewards: Tensor) -> Tensor:
    """Dr.GRPO: ``r - group mean`` with no std division (pair with the seq-mean-token-sum-norm aggregation)."""
    r = _as_float_rewards(rewards)
    return r - _mean(r, 1, leave1out=False)


def compute_advantages(rewards: Tensor, estimator: str = "grpo", **norm_kwargs: Any) -> Tensor:
    """Dispatch by estimator name.

    ``norm_kwargs`` are :func:`group_advantages`'s normalisation knobs (mean_level, std_level, mean_leave1out,
    std_unbiased, eps). They apply to ``grpo`` only: ``rloo`` and ``dr_grpo`` fix their own normalisation, so the
    knobs are accepted (the trainer passes the config section as is) and ignored for them.
    """
    unknown = set(norm_kwargs) - _NORM_KWARGS
    if unknown:
        raise TypeError(f"compute_advantages got unknown keyword(s) {sorted(unknown)}; valid: {sorted(_NORM_KWARGS)}")
    if estimator == "grpo":
        return group_advantages(rewards, **norm_kwargs)
    if estimator == "rloo":
        return rloo_advantages(rewards)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(rewards)
    raise ValueError(f"advantage estimator {estimator!r} is not known; choose one of {list(ESTIMATORS)}")
