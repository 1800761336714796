"""GSPO, sequence-level truncated / masked importance sampling and KL in the reward, hand-worked.

As in test_core_loss: prox = 0 and logp = log(ratio), so the numbers in the tables are ratios.
"""

from __future__ import annotations

import math

import pytest
import torch

from asyncgrpo.core import LossParams, behaviour_weight, kl_in_reward, policy_objective

TOL = dict(atol=1e-5, rtol=1e-5)
BASE = dict(policy_loss="gspo", eps_clip=0.2, eps_clip_higher=None, c_clip=None, behav_imp_weight_cap=None,
            behav_imp_weight_mode="clamp", behav_imp_weight_level="token", loss_agg_mode="seq-mean-token-mean",
            loss_agg_norm_len=None, kl_ctl=0.0, kl_estimator="k3")


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(actual.detach().float(), torch.tensor(expected, dtype=torch.float32), **TOL)


def logp_of(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([[math.log(r) for r in row] for row in rows], requires_grad=True)


def run(logp: torch.Tensor, adv: list[float], mask: torch.Tensor | None = None, behav: torch.Tensor | None = None,
        **over: object) -> tuple[torch.Tensor, dict[str, float]]:
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    prox = torch.zeros_like(logp)
    loss, stats = policy_objective(logp, prox, prox if behav is None else behav, torch.tensor(adv), mask,
                                   LossParams(**{**BASE, **over}))
    return loss, {k: float(v.value) for k, v in stats.items()}


# ------------------------------------------------------------------------------------------------------- GSPO

def test_gspo_uses_the_length_normalised_sequence_ratio() -> None:
    # token ratios [1.5, 0.5]: s = exp(mean(log 1.5, log 0.5)) = sqrt(0.75) = 0.8660254, inside [0.8, 1.2];
    # A = +1: L_t = -s on both tokens, seq-mean-token-mean -> -0.8660254; dL/dlogp_t = -s / 2 = -0.4330127 on BOTH
    # tokens (PPO per token would give 0 for the clipped 1.5 and -0.25 for 0.5)
    logp = logp_of([[1.5, 0.5]])
    loss, s = run(logp, [1.0])
    close(loss, -0.8660254)
    loss.backward()
    close(logp.grad, [[-0.4330127, -0.4330127]])
    assert s["ratio_mean"] == pytest.approx(0.8660254, rel=1e-5) and s["clip_frac"] == 0.0


def test_gspo_clips_whole_sequences() -> None:
    # row 0: ratios [2, 2] -> s = 2; A = +1: clipped to 1.2, L = -1.2, no gradient
    # row 1: ratios [2, 2] -> s = 2; A = -1: max(2, 1.2) = 2 unclipped, gradient +s/2 = 1 per token
    # loss = mean(-1.2, 2) = 0.4; row 1's gradient is halved again by the mean over the 2 sequences
    logp = logp_of([[2.0, 2.0], [2.0, 2.0]])
    loss, s = run(logp, [1.0, -1.0])
    close(loss, 0.4)
    loss.backward()
    close(logp.grad, [[0.0, 0.0], [0.5, 0.5]])
    assert s["clip_frac"] == pytest.approx(0.5)  # 2 of 4 tokens: the whole first sequence


def test_gspo_clip_range_is_its_own_small_one() -> None:
    # mean log-ratio 1e-3 -> s = 1.0010005: above GSPO's 1 + 4e-4, so with A > 0 it is clipped (eps 0.2 would not)
    logp = torch.full((1, 3), 1e-3, requires_grad=True)
    loss, _ = run(logp, [1.0], eps_clip=3e-4, eps_clip_higher=4e-4)
    close(loss, -1.0004)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 3))
    logp2 = torch.full((1, 3), 1e-3, requires_grad=True)
    close(run(logp2, [1.0])[0], -math.exp(1e-3))


def test_gspo_sequence_ratio_ignores_masked_tokens() -> None:
    # the third token is padding with an absurd ratio 100: s = exp(mean(log 1.5, log 0.5)) still
    logp = logp_of([[1.5, 0.5, 100.0]])
    mask = torch.tensor([[True, True, False]])
    loss, _ = run(logp, [1.0], mask=mask)
    close(loss, -0.8660254)
    loss.backward()
    close(logp.grad, [[-0.4330127, -0.4330127, 0.0]])


# ---------------------------------------------------------------------------- sequence-level TIS / MIS weights

# row 0: prox - behav = [log 2, log 10] -> token w [2, 10], sequence w 20, geometric sqrt(20) = 4.4721360
# row 1: prox - behav = [log 2, log 0.5] and a padding token whose difference (log 1000) must not count:
#        token w [2, 0.5], sequence w 1, geometric 1
PROX = torch.zeros(2, 3)
BEHAV = -torch.tensor([[math.log(2.0), math.log(10.0), 0.0], [math.log(2.0), math.log(0.5), math.log(1000.0)]])
MASK = torch.tensor([[True, True, False], [True, True, False]])


@pytest.mark.parametrize(("level", "row0", "row1"), [
    ("token", [2.0, 10.0], [2.0, 0.5]),
    ("sequence", [20.0, 20.0], [1.0, 1.0]),
    ("geometric", [4.4721360, 4.4721360], [1.0, 1.0]),
])
def test_behaviour_weight_levels(level: str, row0: list[float], row1: list[float]) -> None:
    w, keep, capped = behaviour_weight(PROX, BEHAV, MASK, None, "clamp", level)
    close(w[:, :2], [row0, row1])
    assert keep.all() and not capped.any()


def test_sequence_level_truncation_and_masking() -> None:
    # cap 5, sequence level: row 0's w = 20 is truncated to 5 on every token (TIS) or drops the whole row (MIS)
    w, keep, capped = behaviour_weight(PROX, BEHAV, MASK, 5.0, "clamp", "sequence")
    close(w[:, :2], [[5.0, 5.0], [1.0, 1.0]])
    assert capped[MASK].tolist() == [True, True, False, False]
    w, keep, capped = behaviour_weight(PROX, BEHAV, MASK, 5.0, "mask", "sequence")
    close(w[:, :2], [[0.0, 0.0], [1.0, 1.0]])
    assert keep[MASK].tolist() == [False, False, True, True]
    # geometric: sqrt(20) = 4.47 < 5 is kept; token level drops only row 0's second token (w 10)
    assert behaviour_weight(PROX, BEHAV, MASK, 5.0, "mask", "geometric")[1][MASK].all()
    assert behaviour_weight(PROX, BEHAV, MASK, 5.0, "mask", "token")[1][MASK].tolist() == [True, False, True, True]


def test_mis_floor_drops_weights_below_it() -> None:
    # token level, cap 5, floor 0.6: row 0's w [2, 10] -> 10 > cap dropped; row 1's w [2, 0.5] -> 0.5 < floor dropped
    w, keep, capped = behaviour_weight(PROX, BEHAV, MASK, 5.0, "mask", "token", floor=0.6)
    assert keep[MASK].tolist() == [True, False, True, False] and capped[MASK].tolist() == [False, True, False, True]
    close(w[:, :2], [[2.0, 0.0], [2.0, 0.0]])
    # geometric level, floor 0.6 with no cap: row 0 (4.47) and row 1 (1.0) are both kept; floor 1.5 drops row 1
    assert behaviour_weight(PROX, BEHAV, MASK, None, "mask", "geometric", floor=0.6)[1][MASK].all()
    assert behaviour_weight(PROX, BEHAV, MASK, None, "mask", "geometric", floor=1.5)[1][MASK].tolist() == [True, True, False, False]
    # a floor needs mask mode and floor < cap
    with pytest.raises(ValueError, match="needs behav_imp_weight_mode=mask"):
        behaviour_weight(PROX, BEHAV, MASK, 5.0, "clamp", "token", floor=0.5)
    with pytest.raises(ValueError, match="0 < floor < cap"):
        behaviour_weight(PROX, BEHAV, MASK, 2.0, "mask", "token", floor=3.0)


def test_mis_floor_in_the_objective() -> None:
    # ppo, A = [1, 1], ratio 1: L_t = -w_t; token MIS with floor 0.6 and cap 5 keeps row 0 token 0 (w 2) and row 1
    # token 0 (w 2): token-mean over the 2 kept tokens = -(2 + 2) / 2 = -2
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, s = run(logp, [1.0, 1.0], mask=MASK, behav=BEHAV, policy_loss="ppo", loss_agg_mode="token-mean",
                  behav_imp_weight_cap=5.0, behav_imp_weight_mode="mask", behav_imp_weight_floor=0.6)
    close(loss, -2.0)
    assert s["n_tokens"] == 2.0 and s["behav_cap_frac"] == pytest.approx(0.5)


def test_sequence_mis_in_the_objective_drops_the_sequence_from_loss_and_counts() -> None:
    # ppo, A = [1, 1], ratio 1 everywhere: L_t = -1; row 0 dropped by MIS, row 1 weight 1 -> token-mean over
    # row 1's 2 tokens = -1; gradient only on row 1: -1/2 per token
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, s = run(logp, [1.0, 1.0], mask=MASK, behav=BEHAV, policy_loss="ppo", loss_agg_mode="token-mean",
                  behav_imp_weight_cap=5.0, behav_imp_weight_mode="mask", behav_imp_weight_level="sequence")
    close(loss, -1.0)
    loss.backward()
    close(logp.grad, [[0.0, 0.0, 0.0], [-0.5, -0.5, 0.0]])
    assert s["n_tokens"] == 2.0 and s["behav_cap_frac"] == pytest.approx(0.5)  # 2 of the 4 completion tokens


# ---------------------------------------------------------------------------------------------- KL in reward

def test_kl_in_reward_subtracts_the_summed_kl() -> None:
    # logp 0; ref [[-1, 0], [-0.5, (pad) 9]] -> delta = logp - ref = [[1, 0], [0.5, -]]
    # k1: KL = [1 + 0, 0.5] -> rewards [1, 0] - 0.1 KL = [0.9, -0.05]
    # k3: exp(-d) - 1 + d: d=1 -> 0.3678794, d=0.5 -> 0.1065307 -> [0.9632121, -0.0106531]
    rewards = torch.tensor([1.0, 0.0])
    logp = torch.zeros(2, 2)
    ref = torch.tensor([[-1.0, 0.0], [-0.5, 9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    shaped, kl = kl_in_reward(rewards, logp, ref, mask, 0.1, "k1")
    close(shaped, [0.9, -0.05])
    close(kl, [1.0, 0.5])
    shaped, kl = kl_in_reward(rewards, logp, ref, mask, 0.1, "k3")
    close(shaped, [0.9632121, -0.0106531])
    close(kl, [0.3678794, 0.1065307])
    # the sign: a policy that drifted from the reference earns LESS
    assert (kl_in_reward(rewards, logp, ref, mask, 0.5, "k3")[0] < rewards).all()
    with pytest.raises(ValueError, match="rewards"):
        kl_in_reward(torch.ones(3), logp, ref, mask, 0.1)


def test_kl_in_reward_changes_advantages_not_the_loss() -> None:
    # with the KL in the reward the loss has no KL term: LossParams.kl_ctl is 0 and only kl_ref is reported
    logp = torch.zeros(1, 2, requires_grad=True)
    p = LossParams(**{**BASE, "policy_loss": "ppo", "kl_ctl": 0.0})
    loss, s = policy_objective(logp, logp, logp, torch.tensor([0.0]), torch.ones(1, 2, dtype=torch.bool), p,
                               ref_logp=torch.tensor([[-1.0, 0.0]]))
    close(loss, 0.0)
    assert "kl_loss" not in s and float(s["kl_ref"].value) > 0
