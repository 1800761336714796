"""Reward shaping applied before advantages are computed."""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(rewards: Tensor, lengths: Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment; returns new rewards, the input is not modified.

    Completions longer than ``max_len - buffer_len`` tokens lose ``(len - (max_len - buffer_len)) / buffer_len *
    factor``: a linear ramp from 0 at the start of the buffer to ``factor`` at ``max_len`` (and beyond, the ramp
    continues; the generator never produces more than ``max_len`` tokens). ``lengths`` broadcasts to ``rewards``.
    """
    if max_len <= 0:
        raise ValueError(f"overlong_penalty.max_len={max_len} must be > 0")
    if buffer_len <= 0:
        raise ValueError(f"overlong_penalty.buffer_len={buffer_len} must be > 0")
    if buffer_len > max_len:
        raise ValueError(f"overlong_penalty.buffer_len={buffer_len} must be <= max_len={max_len}; shorten the buffer")
    if factor < 0:
        raise ValueError(f"overlong_penalty.factor={factor} must be >= 0 (it is subtracted from the reward)")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
    expected = max_len - buffer_len
    excess = lengths.to(r.dtype) - expected
    penalty = torch.clamp(-excess / buffer_len * factor, max=0.0)
    return r + penalty
