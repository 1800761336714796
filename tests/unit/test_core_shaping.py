"""DAPO overlong penalty, hand-worked.

max_len 10, buffer 4 -> the ramp starts after max_len - buffer = 6 tokens:
  len 5 -> 0; len 6 -> 0; len 7 -> -(1/4) = -0.25; len 8 -> -0.5; len 10 -> -(4/4) = -1 (times factor)
"""

from __future__ import annotations

import pytest
import torch

from asyncgrpo.core import overlong_penalty


def test_overlong_penalty_ramp() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    lengths = torch.tensor([5, 6, 7, 10, 8])
    out = overlong_penalty(rewards, lengths, max_len=10, buffer_len=4, factor=1.0)
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 0.75, 0.0, -0.5]))
    assert rewards.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # input untouched


def test_overlong_penalty_factor_and_group_shape() -> None:
    # factor 2: len 8 -> -(2/4)*2 = -1 ; len 10 -> -(4/4)*2 = -2 ; len 3 -> 0
    rewards = torch.tensor([[1.0, 1.0], [1.0, 0.5]])
    lengths = torch.tensor([[8, 10], [3, 6]])
    out = overlong_penalty(rewards, lengths, max_len=10, buffer_len=4, factor=2.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.0], [1.0, 0.5]]))
    # factor 0 disables it
    assert torch.equal(overlong_penalty(rewards, lengths, 10, 4, 0.0), rewards)


def test_overlong_penalty_whole_length_buffer() -> None:
    # buffer == max_len: the ramp starts at 0 tokens; len 5 of 10 -> -0.5
    out = overlong_penalty(torch.tensor([0.0]), torch.tensor([5]), max_len=10, buffer_len=10, factor=1.0)
    torch.testing.assert_close(out, torch.tensor([-0.5]))


def test_overlong_penalty_validation() -> None:
    r, n = torch.tensor([1.0]), torch.tensor([5])
    with pytest.raises(ValueError, match="buffer_len=11 must be <= max_len=10"):
        overlong_penalty(r, n, max_len=10, buffer_len=11, factor=1.0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(r, n, max_len=10, buffer_len=0, factor=1.0)
    with pytest.raises(ValueError, match="factor"):
        overlong_penalty(r, n, max_len=10, buffer_len=4, factor=-1.0)
