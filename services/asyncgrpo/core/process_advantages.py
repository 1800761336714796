"""Process supervision (DeepSeekMath 4.1.3): step rewards in, one advantage per token out.

A completion is split into steps; a process reward model scores each step. Over one group (the G completions of a
prompt) all step rewards are pooled and normalised, ``r~ = (r - mean(R)) / (std(R) + eps)``, and a token's advantage
is the sum of the normalised rewards of the steps from its own to the last, ``A_t = sum_{j: end_j > t} r~_j``: a
token is credited with everything that follows from it, not with the steps before it.

Conventions (as for the outcome estimators, advantages.py):

* Step ``j`` covers tokens ``[end_{j-1}, end_j)`` (``end_{-1} = 0``); the ends are non-decreasing and the last is
  the completion's length, so the steps tile the completion. Two steps completed by one token share an end: the
  earlier has no tokens of its own, and its reward still counts in the pool and in the sums of the tokens before it.
* A completion with an outcome reward only is one step that ends at its last token: with every completion so, this is
  GRPO's group normalisation exactly.
* A pooled population of one has std 1 (so its advantage is 0 after centring); all-equal rewards give 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from asyncgrpo.core.advantages import ADV_ESTIMATORS, AdvNorm, _std


@dataclass(frozen=True)
class Steps:
    """One completion's step rewards ``[K]`` and the exclusive token index where each step ends ``[K]``."""

    rewards: Tensor
    ends: Tensor

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1 or self.ends.dim() != 1 or self.rewards.numel() != self.ends.numel():
            raise ValueError(f"steps: {tuple(self.rewards.shape)} rewards for {tuple(self.ends.shape)} ends; give one "
                             "end per step reward (1-D each)")
        if self.ends.numel() and (int(self.ends[0]) < 0 or bool((self.ends[1:] < self.ends[:-1]).any())):
            raise ValueError(f"step ends {self.ends.tolist()} must be non-negative and non-decreasing")

    @property
    def n_tokens(self) -> int:
        return int(self.ends[-1]) if self.ends.numel() else 0

    @classmethod
    def outcome(cls, reward: float, n_tokens: int) -> "Steps":
        """An outcome reward as one step over the whole completion (an empty one's step has no tokens, but its reward
        still counts in the group's mean and std, as in GRPO)."""
        return cls(torch.tensor([float(reward)]), torch.tensor([n_tokens]))


def token_advantages(normalised: Tensor, ends: Tensor) -> Tensor:
    """Per-token advantages ``[ends[-1]]`` of one completion from its normalised step rewards: each token gets the
    sum of its own step's and every later step's reward."""
    if ends.numel() == 0:
        return normalised.new_zeros(0)
    suffix = normalised.flip(0).cumsum(0).flip(0)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    return suffix.repeat_interleave(ends - starts)


def process_group_advantages(group: Sequence[Steps], std_unbiased: bool = True, eps: float = 1e-6) -> list[Tensor]:
    """DeepSeekMath's process-supervision advantages of one group: per-token tensors, one per completion."""
    pooled = torch.cat([s.rewards.float() for s in group]) if group else torch.zeros(0)
    if pooled.numel() == 0:
        return [torch.zeros(0) for _ in group]
    mean = pooled.mean()
    std = _std(pooled, None, std_unbiased)
    return [token_advantages((s.rewards.float() - mean) / (std + eps), s.ends) for s in group]


@ADV_ESTIMATORS.register("grpo_process", per_token=True)
def grpo_process_estimator(groups: Sequence[Sequence[Steps]], norm: AdvNorm) -> list[Tensor]:
    """GRPO with process supervision: step rewards normalised over each group, a token's advantage the sum from its
    step to the last. Takes ``[n_groups][G]`` Steps, returns the per-token advantages of every completion in order."""
    return [a for g in groups for a in process_group_advantages(g, norm.std_unbiased, norm.eps)]
