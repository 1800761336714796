"""Advantage estimators: one reward per completion in, one advantage per completion out.

Rewards arrive as a ``[n_groups, G]`` tensor (G completions of the same prompt per row). Each estimator is one
small pure function ``fn(rewards, norm) -> advantages`` registered by name in :data:`ADV_ESTIMATORS`
(``actor.adv_estimator``); the trainer broadcasts the result over a completion's tokens.

Conventions that the anchors leave implicit, fixed here:

* A population of ONE element has no spread estimate, so its std is defined as 1 (verl's convention for a group of
  one), whether the std is biased or unbiased. With a group-level mean such a group gets advantage 0; with no
  centering it gets ``r / (1 + eps)``.
* All-equal rewards give std 0 and a centred numerator 0, so ``0 / (0 + eps) = 0``: never NaN.
* Leave-one-out mean of a group of one is the element itself (there are no "others"), so its advantage is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from asyncgrpo.core.registry import Registry

NORM_LEVELS = ("group", "batch", "none")


@dataclass(frozen=True)
class AdvNorm:
    """The normalisation knobs (``actor.adv_norm``); ``grpo`` uses them all, REINFORCE++ only ``std_unbiased`` and
    ``eps``, the others none (they fix their own normalisation)."""

    mean_level: str
    std_level: str
    mean_leave1out: bool
    std_unbiased: bool
    eps: float

    def __post_init__(self) -> None:
        _check_level("mean_level", self.mean_level)
        _check_level("std_level", self.std_level)
        if self.eps < 0:
            raise ValueError(f"eps={self.eps} must be >= 0 (it keeps all-equal rewards from dividing by zero)")


AdvEstimator = Callable[[Tensor, AdvNorm], Tensor]
ADV_ESTIMATORS: Registry[AdvEstimator] = Registry("advantage estimator", "actor.adv_estimator")


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
    AdvNorm(mean_level, std_level, mean_leave1out, std_unbiased, eps)  # validates
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


def whiten(x: Tensor, unbiased: bool, eps: float) -> Tensor:
    """``(x - mean) / (std + eps)`` over every element (the batch): REINFORCE++'s global normalisation."""
    return (x - _mean(x, None, leave1out=False)) / (_std(x, None, unbiased) + eps)


@ADV_ESTIMATORS.register("grpo")
def grpo_estimator(rewards: Tensor, norm: AdvNorm) -> Tensor:
    """GRPO with every ``actor.adv_norm`` knob; the defaults (group mean, group std) are DeepSeekMath's."""
    return group_advantages(rewards, norm.mean_level, norm.std_level, norm.mean_leave1out, norm.std_unbiased, norm.eps)


@ADV_ESTIMATORS.register("dr_grpo")
def dr_grpo_estimator(rewards: Tensor, norm: AdvNorm) -> Tensor:
    return dr_grpo_advantages(rewards)


@ADV_ESTIMATORS.register("rloo")
def rloo_estimator(rewards: Tensor, norm: AdvNorm) -> Tensor:
    return rloo_advantages(rewards)


@ADV_ESTIMATORS.register("reinforce_plus_plus")
def reinforce_plus_plus_estimator(rewards: Tensor, norm: AdvNorm) -> Tensor:
    """REINFORCE++ (Hu 2025) for outcome rewards: no per-prompt baseline, the rewards whitened over the whole batch.

    Whitened over completions (each counts once), not over tokens as verl's masked_whiten does: a long completion
    carries no more information about its prompt's reward than a short one.
    """
    return whiten(_as_float_rewards(rewards), norm.std_unbiased, norm.eps)


@ADV_ESTIMATORS.register("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_estimator(rewards: Tensor, norm: AdvNorm) -> Tensor:
    """REINFORCE++-baseline: the group mean as baseline, then whitened over the batch (the std of the batch, not the
    group's, so a group with a small spread is not blown up as GRPO's group std does)."""
    r = _as_float_rewards(rewards)
    return whiten(r - _mean(r, 1, leave1out=False), norm.std_unbiased, norm.eps)
