"""Process-supervision advantages (DeepSeekMath 4.1.3) against numbers worked by hand.

Tolerances: float32 arithmetic on O(1) values, a few ulps (1e-6) suffice; the numbers below are exact fractions
and square roots worked on paper."""

from __future__ import annotations

import math

import pytest
import torch

from asyncgrpo import core
from asyncgrpo.core import Steps, process_group_advantages, token_advantages

NORM = core.AdvNorm("group", "group", False, True, 0.0)


def _steps(rewards: list[float], ends: list[int]) -> Steps:
    return Steps(torch.tensor(rewards), torch.tensor(ends))


def _close(got: torch.Tensor, want: list[float]) -> None:
    w = torch.tensor(want)
    assert got.shape == w.shape, (got, want)
    diff = (got - w).abs().max().item() if w.numel() else 0.0
    assert diff < 1e-6, f"got {got.tolist()} want {want} (max diff {diff:.3g})"


def test_suffix_sum_over_steps() -> None:
    # steps [0,2) [2,3) [3,6) with normalised rewards 1, -2, 0.5: tokens of step 0 get 1 - 2 + 0.5 = -0.5,
    # the token of step 1 gets -2 + 0.5 = -1.5, tokens of step 2 get 0.5
    _close(token_advantages(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2, 3, 6])),
           [-0.5, -0.5, -1.5, 0.5, 0.5, 0.5])


def test_group_normalisation_pools_every_step_of_the_group() -> None:
    # completion 1: steps rewarded 1, 0 (ends 2, 3); completion 2: one step rewarded 1 (ends 2).
    # R = {1, 0, 1}: mean 2/3, unbiased std = sqrt(((1/3)^2 + (2/3)^2 + (1/3)^2) / 2) = sqrt(1/3).
    # normalised: 1 -> (1/3)/sqrt(1/3) = sqrt(1/3) = 0.57735; 0 -> -2 sqrt(1/3) = -1.1547.
    s = math.sqrt(1 / 3)
    a1, a2 = process_group_advantages([_steps([1, 0], [2, 3]), _steps([1], [2])], std_unbiased=True, eps=0.0)
    _close(a1, [s - 2 * s, s - 2 * s, -2 * s])  # a token of the first step also carries the wrong second step
    _close(a2, [s, s])


def test_biased_std_and_eps() -> None:
    # R = {1, 0, 1}: biased std = sqrt(2/9) = 0.4714; with eps 0.5 the divisor is 0.9714
    d = math.sqrt(2 / 9) + 0.5
    a1, _ = process_group_advantages([_steps([1, 0], [2, 3]), _steps([1], [2])], std_unbiased=False, eps=0.5)
    _close(a1, [(1 / 3 - 2 / 3) / d] * 2 + [(-2 / 3) / d])


def test_outcome_only_steps_are_grpo() -> None:
    # each completion one step of its outcome reward: every token carries GRPO's group-normalised reward
    rewards = [1.0, 0.0, 0.0, 1.0]
    lens = [3, 1, 2, 2]
    got = process_group_advantages([Steps.outcome(r, n) for r, n in zip(rewards, lens)], True, 1e-6)
    want = core.group_advantages(torch.tensor([rewards]), eps=1e-6)[0]
    for g, w, n in zip(got, want, lens):
        _close(g, [w.item()] * n)


def test_all_equal_and_single_step_give_zero_not_nan() -> None:
    a, b = process_group_advantages([_steps([0.5, 0.5], [1, 2]), _steps([0.5], [3])], True, 1e-6)
    _close(a, [0.0, 0.0])
    _close(b, [0.0, 0.0, 0.0])
    (only,) = process_group_advantages([_steps([0.7], [2])], True, 1e-6)  # a population of one: std 1, centred 0
    _close(only, [0.0, 0.0])


def test_empty_completion_counts_in_the_pool_without_tokens() -> None:
    # an empty completion's outcome reward 1 still counts, as in GRPO: R = {1, 0, 1}, mean 2/3, std s = sqrt(1/3),
    # 0 -> -2s, 1 -> s; the second completion's tokens: step 0 gets -2s + s = -s, step 1 gets s
    s = math.sqrt(1 / 3)
    a, b = process_group_advantages([Steps.outcome(1.0, 0), _steps([0.0, 1.0], [1, 2])], True, 0.0)
    assert a.numel() == 0
    _close(b, [-s, s])


def test_two_steps_ending_at_one_token_both_count() -> None:
    # one token completed two steps (ends 1, 1): the earlier has no tokens, but its reward stays in the pool and in
    # the sum of every token before it. Completion 1: steps 0, 1 ending at tokens 1, 1; completion 2: 1, 1 ending at
    # 1, 2. R = {0, 1, 1, 1}: mean 3/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2; 0 -> -3/2, 1 -> 1/2.
    a1, a2 = process_group_advantages([_steps([0.0, 1.0], [1, 1]), _steps([1.0, 1.0], [1, 2])], True, 0.0)
    _close(a1, [-1.5 + 0.5])
    _close(a2, [1.0, 0.5])
    _close(token_advantages(torch.tensor([1.0, 10.0, 100.0]), torch.tensor([1, 1, 2])), [111.0, 100.0])


def test_registered_estimator_flattens_groups_in_order() -> None:
    assert core.ADV_ESTIMATORS.trait("grpo_process", "per_token") is True
    assert not core.ADV_ESTIMATORS.trait("grpo", "per_token")
    fn = core.ADV_ESTIMATORS.get("grpo_process")
    out = fn([[_steps([1], [1]), _steps([0], [2])], [_steps([1, 1], [1, 2]), _steps([0], [1])]], NORM)
    assert [t.numel() for t in out] == [1, 2, 2, 1]
    h = 0.5 / math.sqrt(0.5)
    _close(out[0], [h])
    _close(out[1], [-h, -h])
    # group 2: R = {1, 1, 0}: mean 2/3, std sqrt(1/3): 1 -> sqrt(1/3), 0 -> -2 sqrt(1/3)
    s = math.sqrt(1 / 3)
    _close(out[2], [2 * s, s])
    _close(out[3], [-2 * s])


@pytest.mark.parametrize("rewards,ends", [([1.0], [-1]), ([1.0, 2.0], [2, 1]), ([1.0], [1, 2])])
def test_bad_steps_are_rejected(rewards: list[float], ends: list[int]) -> None:
    with pytest.raises(ValueError, match="step"):
        _steps(rewards, ends)


def test_earlier_steps_are_not_credited_with_later_ones() -> None:
    # DeepSeekMath sums from a token's own step to the last: with normalised rewards 1 then -2, the first step's
    # tokens carry -1 and the second's -2. A prefix sum (the wrong direction) would give 1 and -1.
    assert token_advantages(torch.tensor([1.0, -2.0]), torch.tensor([1, 2])).tolist() == [-1.0, -2.0]
