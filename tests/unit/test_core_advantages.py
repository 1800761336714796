"""Advantage estimators (and their registry) against numbers worked out by hand.

Shared fixture batch (two groups of G=4):
  g1 = [1, 0, 0, 1]: mean 0.5, deviations +-0.5, sum sq 1 -> unbiased var 1/3, std 0.5773503; biased std 0.5
  g2 = [0, 0, 0, 4]: mean 1, deviations [-1,-1,-1,3], sum sq 12 -> unbiased var 4, std 2; biased std sqrt(3)
  batch (8 values) sum 6, mean 0.75, deviations [.25,-.75,-.75,.25,-.75,-.75,-.75,3.25],
    sum sq = 2*.0625 + 5*.5625 + 10.5625 = 13.5 -> unbiased std sqrt(13.5/7) = 1.3887301, biased sqrt(13.5/8) = 1.2990381
"""

from __future__ import annotations

import pytest
import torch

from asyncgrpo.core import (
    ADV_ESTIMATORS,
    AdvNorm,
    dr_grpo_advantages,
    group_advantages,
    rloo_advantages,
)

R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 4.0]])
TOL = dict(atol=1e-5, rtol=1e-5)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), **TOL)


def test_grpo_group_unbiased_default() -> None:
    # g1: +-0.5 / 0.5773503 = +-0.8660254 ; g2: [-1,-1,-1,3] / 2
    close(group_advantages(R), [[0.8660254, -0.8660254, -0.8660254, 0.8660254], [-0.5, -0.5, -0.5, 1.5]])


def test_grpo_group_biased_std() -> None:
    # g1: +-0.5 / 0.5 = +-1 ; g2: [-1,-1,-1,3] / sqrt(3) = [-0.5773503, ..., 1.7320508]
    close(
        group_advantages(R, std_unbiased=False),
        [[1.0, -1.0, -1.0, 1.0], [-0.5773503, -0.5773503, -0.5773503, 1.7320508]],
    )


def test_grpo_batch_mean_batch_std() -> None:
    # deviations from 0.75 / 1.3887301: .25 -> 0.1800206, -.75 -> -0.5400617, 3.25 -> 2.3402675
    a, b, c = 0.1800206, -0.5400617, 2.3402675
    close(group_advantages(R, mean_level="batch", std_level="batch"), [[a, b, b, a], [b, b, b, c]])
    # biased batch std 1.2990381: .25 -> 0.1924501, -.75 -> -0.5773503, 3.25 -> 2.5018512
    a, b, c = 0.1924501, -0.5773503, 2.5018512
    close(group_advantages(R, mean_level="batch", std_level="batch", std_unbiased=False), [[a, b, b, a], [b, b, b, c]])


def test_grpo_group_mean_batch_std() -> None:
    # TRL's scale_rewards="batch": g1 +-0.5 / 1.3887301 = +-0.3600411 ; g2 [-1, 3] / 1.3887301 = -0.7200823, 2.1602469
    p, q, s = 0.3600411, -0.7200823, 2.1602469
    close(group_advantages(R, mean_level="group", std_level="batch"), [[p, -p, -p, p], [q, q, q, s]])


def test_grpo_batch_mean_group_std() -> None:
    # g1 [.25,-.75,-.75,.25] / 0.5773503 = [0.4330127, -1.2990381, ...]; g2 [-.75,-.75,-.75,3.25] / 2
    close(
        group_advantages(R, mean_level="batch", std_level="group"),
        [[0.4330127, -1.2990381, -1.2990381, 0.4330127], [-0.375, -0.375, -0.375, 1.625]],
    )


def test_grpo_none_levels() -> None:
    # no centering, group std: g1 [1,0,0,1] / 0.5773503 ; g2 [0,0,0,4] / 2
    close(group_advantages(R, mean_level="none"), [[1.7320508, 0.0, 0.0, 1.7320508], [0.0, 0.0, 0.0, 2.0]])
    # centering only (Dr.GRPO-like)
    close(group_advantages(R, std_level="none"), [[0.5, -0.5, -0.5, 0.5], [-1.0, -1.0, -1.0, 3.0]])
    # neither: the rewards themselves
    close(group_advantages(R, mean_level="none", std_level="none"), R.tolist())


def test_grpo_leave_one_out_group() -> None:
    # g1 sum 2: r=1 -> others' mean 1/3, r - mean = 2/3; r=0 -> 2/3, -2/3; / 0.5773503 -> +-1.1547005
    # g2 sum 4: r=0 -> 4/3, -4/3 / 2 = -0.6666667; r=4 -> 0, 4 / 2 = 2
    close(
        group_advantages(R, mean_leave1out=True),
        [[1.1547005, -1.1547005, -1.1547005, 1.1547005], [-0.6666667, -0.6666667, -0.6666667, 2.0]],
    )


def test_grpo_leave_one_out_batch() -> None:
    # total 6, N 8: mean_i = (6 - r_i)/7; r=1 -> 5/7, A = 2/7; r=0 -> 6/7, A = -6/7; r=4 -> 2/7, A = 26/7
    a, b, c = 2 / 7, -6 / 7, 26 / 7
    close(group_advantages(R, mean_level="batch", mean_leave1out=True, std_level="none"), [[a, b, b, a], [b, b, b, c]])


def test_grpo_eps_added_to_std_not_variance() -> None:
    # [1, 0]: mean .5, unbiased std sqrt(.5) = 0.7071068; eps=1: 0.5 / 1.7071068 = 0.2928932
    close(group_advantages(torch.tensor([[1.0, 0.0]]), eps=1.0), [[0.2928932, -0.2928932]])


def test_grpo_all_equal_rewards_give_zero_not_nan() -> None:
    r = torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    for unbiased in (True, False):
        for loo in (True, False):
            a = group_advantages(r, std_unbiased=unbiased, mean_leave1out=loo)
            assert torch.equal(a, torch.zeros(2, 3))


def test_grpo_groups_of_one() -> None:
    r = torch.tensor([[3.0], [5.0]])
    # group mean: the completion is its own mean -> 0 (not NaN from the unbiased std of one element)
    for loo in (True, False):
        for unbiased in (True, False):
            assert torch.equal(group_advantages(r, mean_leave1out=loo, std_unbiased=unbiased), torch.zeros(2, 1))
    # no centering: a population of one has std 1 by definition -> r / (1 + eps)
    close(group_advantages(r, mean_level="none", eps=1e-6), [[3.0 / (1 + 1e-6)], [5.0 / (1 + 1e-6)]])
    # batch level still works across groups of one: mean 4, unbiased std sqrt(2) -> -+1/sqrt(2)
    close(group_advantages(r, mean_level="batch", std_level="batch"), [[-0.7071068], [0.7071068]])
    # a batch of a single reward
    assert torch.equal(group_advantages(torch.tensor([[7.0]]), mean_level="batch", std_level="batch"), torch.zeros(1, 1))


def test_grpo_accepts_int_rewards_and_rejects_bad_shapes_and_levels() -> None:
    close(group_advantages(torch.tensor([[1, 0, 0, 1]])), [[0.8660254, -0.8660254, -0.8660254, 0.8660254]])
    with pytest.raises(ValueError, match="n_groups, group_size"):
        group_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="mean_level='prompt'.*group"):
        group_advantages(R, mean_level="prompt")
    with pytest.raises(ValueError, match="std_level"):
        group_advantages(R, std_level="global")


def test_rloo() -> None:
    # r_i - mean of the others: g1 r=1 -> 1 - 1/3 = 2/3, r=0 -> 0 - 2/3; g2 r=0 -> 0 - 4/3, r=4 -> 4 - 0
    # (= G/(G-1) (r - mean): 4/3 * 0.5 = 2/3; 4/3 * (-1) = -4/3; 4/3 * 3 = 4)
    close(rloo_advantages(R), [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [-4 / 3, -4 / 3, -4 / 3, 4.0]])
    assert torch.equal(rloo_advantages(torch.tensor([[3.0], [5.0]])), torch.zeros(2, 1))


def test_dr_grpo() -> None:
    close(dr_grpo_advantages(R), [[0.5, -0.5, -0.5, 0.5], [-1.0, -1.0, -1.0, 3.0]])


NORM = AdvNorm(mean_level="group", std_level="group", mean_leave1out=False, std_unbiased=True, eps=1e-6)


def by_name(name: str, rewards: torch.Tensor = R, norm: AdvNorm = NORM) -> torch.Tensor:
    return ADV_ESTIMATORS.get(name)(rewards, norm)


def test_reinforce_plus_plus_whitens_over_the_batch() -> None:
    # batch mean 0.75, unbiased std 1.3887301 (module doc): (r - 0.75) / 1.3887301
    close(by_name("reinforce_plus_plus"), [[0.1800206, -0.5400617, -0.5400617, 0.1800206],
                                           [-0.5400617, -0.5400617, -0.5400617, 2.3402674]])
    # baseline variant: centred by the group mean, g1 [.5,-.5,-.5,.5], g2 [-1,-1,-1,3]; batch mean 0,
    # sum sq 1 + 12 = 13 -> unbiased std sqrt(13/7) = 1.3627703 (GRPO would divide g1 by its own 0.577)
    close(by_name("reinforce_plus_plus_baseline"), [[0.3668997, -0.3668997, -0.3668997, 0.3668997],
                                                    [-0.7337994, -0.7337994, -0.7337994, 2.2013982]])
    # std_unbiased=False: biased batch std sqrt(13.5/8) = 1.2990381 -> 0.25 / 1.2990381 = 0.1924501
    biased = AdvNorm("group", "group", False, False, 1e-6)
    close(by_name("reinforce_plus_plus", norm=biased)[0, :1], [0.1924501])


def test_registered_estimators_match_their_functions() -> None:
    assert ADV_ESTIMATORS.names() == ["dr_grpo", "grpo", "grpo_process", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "rloo"]
    close(by_name("grpo", norm=AdvNorm("group", "group", False, False, 1e-6))[0], [1.0, -1.0, -1.0, 1.0])
    close(by_name("grpo", norm=AdvNorm("batch", "batch", False, True, 1e-6)), group_advantages(R, "batch", "batch").tolist())
    close(by_name("rloo")[1], [-4 / 3, -4 / 3, -4 / 3, 4.0])
    # the estimators that fix their own normalisation ignore the levels
    close(by_name("dr_grpo", norm=AdvNorm("batch", "batch", False, True, 1e-6))[1], [-1.0, -1.0, -1.0, 3.0])


def test_registry_rejects_unknown_and_duplicate_names() -> None:
    with pytest.raises(ValueError, match=r"actor.adv_estimator='ppo' is not a registered advantage estimator; "
                                         r"choose one of \['dr_grpo', 'grpo'"):
        ADV_ESTIMATORS.get("ppo")
    with pytest.raises(ValueError, match="registered twice"):
        ADV_ESTIMATORS.register("grpo")(lambda r, n: r)
    with pytest.raises(ValueError, match="mean_level='prompt'"):
        AdvNorm("prompt", "group", False, True, 1e-6)


def test_a_new_estimator_is_one_registered_function() -> None:
    @ADV_ESTIMATORS.register("test_sign")
    def sign_estimator(rewards: torch.Tensor, norm: AdvNorm) -> torch.Tensor:
        return torch.sign(rewards - rewards.mean(dim=1, keepdim=True))

    try:
        close(by_name("test_sign"), [[1.0, -1.0, -1.0, 1.0], [-1.0, -1.0, -1.0, 1.0]])
        from asyncgrpo.config import load_config

        assert load_config(overrides={"actor": {"adv_estimator": "test_sign"}}).actor.adv_estimator == "test_sign"
    finally:
        ADV_ESTIMATORS._fns.pop("test_sign")
