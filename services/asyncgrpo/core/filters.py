"""Group filters (DAPO dynamic sampling)."""

from __future__ import annotations

from torch import Tensor


def zero_variance_mask(rewards: Tensor, atol: float = 0.0) -> Tensor:
    """``bool[n_groups]``: True where a group's rewards differ by more than ``atol`` (keep it).

    A group whose rewards are all equal has zero advantage everywhere under GRPO, so it only dilutes the batch.
    A group of one has no variance and is dropped too.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [n_groups, group_size], got shape {tuple(rewards.shape)}")
    if atol < 0:
        raise ValueError(f"atol={atol} must be >= 0")
    if rewards.shape[1] == 0:
        return rewards.new_zeros(rewards.shape[0], dtype=bool)
    spread = rewards.amax(dim=1) - rewards.amin(dim=1)
    return spread > atol
