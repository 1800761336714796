"""PPO clip, dual clip, behaviour weight, the policy objective (decoupled PPO + KL) and its statistics, hand-worked.

Log-probs are built as prox = 0 and logp = log(ratio), so ratio = exp(logp - prox) is the number in the table.
d L / d logp = d L / d ratio * ratio, so an unclipped token has gradient -A * ratio and a clipped one 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from asyncgrpo.core import (
    LossParams,
    Stat,
    aggregate_loss,
    behaviour_weight,
    broadcast_advantages,
    count_seqs,
    count_tokens,
    effective_mask,
    finish_stats,
    loss_stats,
    masked_mean,
    policy_objective,
    ppo_clip_loss,
    stat_sums,
)

TOL = dict(atol=1e-5, rtol=1e-5)
BASE = dict(policy_loss="ppo", eps_clip=0.2, eps_clip_higher=None, c_clip=None, behav_imp_weight_cap=None,
            behav_imp_weight_mode="clamp", behav_imp_weight_level="token", loss_agg_mode="token-mean",
            loss_agg_norm_len=None, kl_ctl=0.0, kl_estimator="k3")


def P(**over: object) -> LossParams:
    return LossParams(**{**BASE, **over})


def ppo(logp: torch.Tensor, prox: torch.Tensor, adv: torch.Tensor, **over: object):
    return ppo_clip_loss(logp, prox, broadcast_advantages(adv, logp), torch.ones_like(logp, dtype=torch.bool), P(**over))


def objective(logp, prox, behav, adv, mask, *, ref_logp=None, global_token_count=None, global_seq_count=None, **over):
    loss, stats = policy_objective(logp, prox, behav, adv, mask, P(**over), ref_logp=ref_logp,
                                   global_token_count=global_token_count, global_seq_count=global_seq_count)
    return loss, {k: v.value for k, v in stats.items()}


def _logp(ratios: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(actual.detach().float(), torch.tensor(expected, dtype=torch.float32), **TOL)


# ---------------------------------------------------------------------------------------------- ppo_clip_loss

# eps_clip 0.2, eps_clip_higher 0.28 -> ratio clipped to [0.8, 1.28]; L = max(-A r, -A clip(r))
#  (A, r)       -A r    -A clip(r)   L       clipped  dL/dlogp
#  (+1, 1.5)   -1.5    -1.28        -1.28   yes      0
#  (+1, 1.25)  -1.25   -1.25        -1.25   no       -1.25   (symmetric 0.2 would clip at 1.2 -> -1.2)
#  (+1, 0.5)   -0.5    -0.8         -0.5    no       -0.5
#  (-1, 0.5)    0.5     0.8          0.8    yes      0
#  (-1, 0.75)   0.75    0.8          0.8    yes      0       (lower side uses eps_clip, not eps_clip_higher)
#  (-1, 1.5)    1.5     1.28         1.5    no       1.5
#  (+2, 1.0)   -2      -2           -2      no       -2
ADV = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 2.0]
RATIOS = [1.5, 1.25, 0.5, 0.5, 0.75, 1.5, 1.0]


def test_ppo_clip_asymmetric_values_flags_and_grads() -> None:
    logp = _logp(RATIOS)
    loss, info = ppo(logp, torch.zeros_like(logp), torch.tensor([ADV]), eps_clip_higher=0.28)
    close(loss, [[-1.28, -1.25, -0.5, 0.8, 0.8, 1.5, -2.0]])
    assert info["clipped"].tolist() == [[True, False, False, True, True, False, False]]
    assert not info["dual_clipped"].any()
    close(info["ratio"], [RATIOS])
    assert not info["ratio"].requires_grad
    loss.sum().backward()
    close(logp.grad, [[0.0, -1.25, -0.5, 0.0, 0.0, 1.5, -2.0]])


def test_ppo_clip_symmetric_default() -> None:
    # eps_clip_higher None -> 0.2 both sides: (+1, 1.25) is now clipped to 1.2 -> L = -1.2, gradient 0
    logp = _logp([1.25, 0.75])
    loss, info = ppo(logp, torch.zeros_like(logp), torch.tensor([[1.0, -1.0]]))
    close(loss, [[-1.2, 0.8]])
    assert info["clipped"].tolist() == [[True, True]]
    loss.sum().backward()
    close(logp.grad, [[0.0, 0.0]])


def test_ppo_dual_clip() -> None:
    # c = 3, clip range [0.8, 1.28]
    #  (-1, 5): max(5, 1.28) = 5 -> min(5, 3*1) = 3, dual-clipped, gradient 0
    #  (-2, 2): max(4, 2.56) = 4 -> bound 6 not active, gradient -A r = 4
    #  (+1, 5): max(-5, -1.28) = -1.28, clipped; dual clip never applies to A > 0 (it would give -3)
    #  (-1, 0.5): 0.8 (lower clip), bound 3 not active
    ratios, adv = [5.0, 2.0, 5.0, 0.5], torch.tensor([[-1.0, -2.0, 1.0, -1.0]])
    logp = _logp(ratios)
    loss, info = ppo(logp, torch.zeros_like(logp), adv, eps_clip_higher=0.28, c_clip=3.0)
    close(loss, [[3.0, 4.0, -1.28, 0.8]])
    assert info["dual_clipped"].tolist() == [[True, False, False, False]]
    assert info["clipped"].tolist() == [[False, False, True, True]]
    loss.sum().backward()
    close(logp.grad, [[0.0, 4.0, 0.0, 0.0]])
    # without the dual clip the first token is unbounded: 5, gradient 5
    logp2 = _logp(ratios)
    loss2, _ = ppo(logp2, torch.zeros_like(logp2), adv, eps_clip_higher=0.28)
    close(loss2[0, 0], 5.0)


def test_ppo_clip_per_sequence_advantages_broadcast() -> None:
    # advantages [B] -> per token; ratio 1 -> L = -A on every token
    logp = torch.zeros(2, 3)
    for adv in (torch.tensor([1.0, -2.0]), torch.tensor([[1.0], [-2.0]])):
        loss, _ = ppo(logp, logp, adv)
        close(loss, [[-1.0, -1.0, -1.0], [2.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="broadcast"):
        broadcast_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), logp)


def test_loss_params_validation() -> None:
    with pytest.raises(ValueError, match="c_clip=1.0 must be > 1"):
        P(c_clip=1.0)
    with pytest.raises(ValueError, match="c_clip"):
        P(c_clip=0.5)
    with pytest.raises(ValueError, match="eps_clip"):
        P(eps_clip=1.0)
    with pytest.raises(ValueError, match=r"actor.policy_loss='trpo' is not a registered policy loss; choose one of \['gspo', 'ppo'"):
        P(policy_loss="trpo")
    with pytest.raises(ValueError, match="behav_imp_weight_level"):
        P(behav_imp_weight_level="tokens")
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="shape"):
        policy_objective(x, torch.zeros(1, 3), x, x, x.bool(), P())


# ------------------------------------------------------------------------------------------- behaviour_weight

# prox = 0, behav = [0, -log 2, -log 10, log 2] -> w = exp(prox - behav) = [1, 2, 10, 0.5]
BEHAV = [0.0, -math.log(2.0), -math.log(10.0), math.log(2.0)]
ALL4 = torch.ones(1, 4, dtype=torch.bool)


def test_behaviour_weight_modes() -> None:
    prox = torch.zeros(1, 4, requires_grad=True)
    behav = torch.tensor([BEHAV], requires_grad=True)
    w, keep, capped = behaviour_weight(prox, behav, ALL4, None)
    close(w, [[1.0, 2.0, 10.0, 0.5]])
    assert keep.all() and not capped.any()
    assert not w.requires_grad  # never carries gradient

    w, keep, capped = behaviour_weight(prox, behav, ALL4, cap=5.0, mode="clamp")
    close(w, [[1.0, 2.0, 5.0, 0.5]])
    assert keep.tolist() == [[True] * 4] and capped.tolist() == [[False, False, True, False]]

    w, keep, capped = behaviour_weight(prox, behav, ALL4, cap=5.0, mode="mask")
    close(w, [[1.0, 2.0, 0.0, 0.5]])
    assert keep.tolist() == [[True, True, False, True]] and capped.tolist() == [[False, False, True, False]]

    # the cap is exclusive: w == cap is neither capped nor dropped (w = exp(0) = 1 exactly, cap 1)
    w, keep, capped = behaviour_weight(torch.zeros(1, 2), torch.tensor([[0.0, -0.1]]), torch.ones(1, 2, dtype=torch.bool), cap=1.0, mode="mask")
    assert keep.tolist() == [[True, False]] and capped.tolist() == [[False, True]]
    close(w, [[1.0, 0.0]])

    with pytest.raises(ValueError, match=r"'drop'.*clamp"):
        behaviour_weight(prox, behav, ALL4, cap=5.0, mode="drop")
    with pytest.raises(ValueError, match="behav_imp_weight_cap"):
        behaviour_weight(prox, behav, ALL4, cap=0.0)


# ------------------------------------------------------------------------------------ policy_objective (decoupled)


def test_on_policy_gradient_is_minus_advantage_over_count() -> None:
    # B=2, T=2, mask [[1,1],[1,0]], A = [1, -0.5], logp = prox = behav (ratio 1, w 1)
    # per token L = -A: [[-1, -1], [0.5, -]]; token-mean (-1 - 1 + 0.5) / 3 = -0.5
    # d loss / d logp = -A / 3 = [[-1/3, -1/3], [1/6, 0]]
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5])
    logp = torch.zeros(2, 2, requires_grad=True)
    # prox and behav passed as the very tensor being optimised: they must act as constants anyway
    loss, stats = objective(logp, logp, logp, adv, mask)
    close(loss, -0.5)
    loss.backward()
    close(logp.grad, [[-1 / 3, -1 / 3], [1 / 6, 0.0]])
    close(stats["loss"], -0.5)

    # seq-mean-token-mean: mean(-1, 0.5) = -0.25; row 0 tokens -1/(2 seqs * 2 tokens), row 1 0.5/(2 * 1)
    logp = torch.zeros(2, 2, requires_grad=True)
    loss, _ = objective(logp, logp, logp, adv, mask, loss_agg_mode="seq-mean-token-mean")
    close(loss, -0.25)
    loss.backward()
    close(logp.grad, [[-0.25, -0.25], [0.25, 0.0]])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_decoupled_with_behav_equal_prox_is_plain_ppo(mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    logp = (torch.randn(3, 5, generator=gen) * 0.3).requires_grad_()
    prox = torch.randn(3, 5, generator=gen) * 0.3
    adv = torch.randn(3, generator=gen)
    mask = torch.arange(5)[None, :] < torch.tensor([[5], [2], [4]])
    loss, _ = objective(
        logp, prox, prox.clone(), adv, mask, eps_clip_higher=0.28, c_clip=3.0,
        behav_imp_weight_cap=5.0, behav_imp_weight_mode="mask", loss_agg_mode=mode, loss_agg_norm_len=5,
    )
    (g,) = torch.autograd.grad(loss, logp)
    per_token, _ = ppo(logp, prox, adv, eps_clip_higher=0.28, c_clip=3.0)
    plain = aggregate_loss(per_token, mask, mode, norm_len=5)
    (g_plain,) = torch.autograd.grad(plain, logp)
    assert torch.equal(loss, plain)
    assert torch.equal(g, g_plain)


def test_decoupled_weight_scales_loss_and_gets_no_gradient() -> None:
    # prox = 0, behav = [-log 2, log 2] -> w = [2, 0.5]; A = 1 on one sequence of 2 tokens
    #  token 0: logp = log 1.5 (ratio vs PROX 1.5) -> clipped at 1.28: L = -1.28, w L = -2.56, grad 0
    #  token 1: logp = 0 (ratio 1): L = -1, w L = -0.5, grad w * (-A r) / 2 = -0.25
    #  token-mean = (-2.56 - 0.5) / 2 = -1.53
    # (clipping against behav instead would give token 1 ratio 2 -> clipped; a missing detach gives behav a grad)
    logp = torch.tensor([[math.log(1.5), 0.0]], requires_grad=True)
    prox = torch.zeros(1, 2, requires_grad=True)
    behav = torch.tensor([[-math.log(2.0), math.log(2.0)]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = objective(logp, prox, behav, torch.tensor([1.0]), mask, eps_clip_higher=0.28, behav_imp_weight_cap=5.0)
    close(loss, -1.53)
    loss.backward()
    close(logp.grad, [[0.0, -0.25]])
    assert prox.grad is None and behav.grad is None
    close(stats["behav_weight_mean"], 1.25)  # (2 + 0.5) / 2


@pytest.mark.parametrize(
    ("cap", "mode", "loss", "grad", "n_tokens"),
    [
        # w = [1, 2, 10], A = 1, ratio 1 -> w L = [-1, -2, -10]
        (None, "clamp", -13 / 3, [-1 / 3, -2 / 3, -10 / 3], 3.0),
        # clamp at 5: [-1, -2, -5] / 3 tokens
        (5.0, "clamp", -8 / 3, [-1 / 3, -2 / 3, -5 / 3], 3.0),
        # mask at 5: the third token leaves the loss and the count: [-1, -2] / 2
        (5.0, "mask", -1.5, [-0.5, -1.0, 0.0], 2.0),
    ],
)
def test_decoupled_cap_modes(cap: float | None, mode: str, loss: float, grad: list, n_tokens: float) -> None:
    logp = torch.zeros(1, 3, requires_grad=True)
    behav = torch.tensor([BEHAV[:3]])
    out, stats = objective(logp, torch.zeros(1, 3), behav, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool),
                           behav_imp_weight_cap=cap, behav_imp_weight_mode=mode)
    close(out, loss)
    out.backward()
    close(logp.grad, [grad])
    close(stats["n_tokens"], n_tokens)
    # the cap fraction is over the tokens before masking: 1 of 3 capped (0 without a cap)
    close(stats["behav_cap_frac"], 0.0 if cap is None else 1 / 3)


def test_decoupled_stats() -> None:
    # tokens (A, r): (+1, 1.5) (+1, 1.25) (-1, 0.5) (-1, 5) and a masked 5th (+1, 1.5); clip [0.8, 1.28], c = 3
    #  L = [-1.28, -1.25, 0.8, 3]; loss = 1.27 / 4 = 0.3175
    #  clipped over the mask: tokens 0, 2 -> 2/4 (the masked clipped token must not count: 3/5 = 0.6)
    #  dual clipped: token 3 -> 1/4; ratio mean (1.5 + 1.25 + 0.5 + 5) / 4 = 2.0625
    #  approx KL k3(log r) = 1/r - 1 + log r: 0.0721318, 0.0231436, 0.3068528, 0.8094379 -> mean 0.3028915
    logp = _logp([1.5, 1.25, 0.5, 5.0, 1.5])
    prox = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, s = objective(logp, prox, prox, adv, mask, eps_clip_higher=0.28, c_clip=3.0, behav_imp_weight_cap=5.0)
    close(loss, 0.3175)
    expected = {
        "clip_frac": 0.5, "dual_clip_frac": 0.25, "ratio_mean": 2.0625, "approx_kl": 0.3028915,
        "behav_weight_mean": 1.0, "behav_cap_frac": 0.0, "n_tokens": 4.0, "n_seqs": 1.0,
        "policy_loss": 0.3175, "loss": 0.3175,
    }
    for key, value in expected.items():
        close(s[key], value)
    assert all(not v.requires_grad and v.dim() == 0 for v in s.values())


def test_stats_reduce_by_their_own_rule_across_micro_batches() -> None:
    # two micro-batches: 3 kept tokens with clip_frac 1/3, then 1 token with clip_frac 1 -> step value 2/4 = 0.5
    # (the mean of the two means would be 2/3); loss shares add: 0.25 + 0.5 = 0.75
    a = {"clip_frac": Stat.mean(torch.tensor(1 / 3), torch.tensor(3.0)), "loss": Stat.total(torch.tensor(0.25))}
    b = {"clip_frac": Stat.mean(torch.tensor(1.0), torch.tensor(1.0)), "loss": Stat.total(torch.tensor(0.5))}
    sums = stat_sums([a, b])
    out = finish_stats(sums)
    assert out == pytest.approx({"clip_frac": 0.5, "loss": 0.75}), out
    # two ranks (all-reduce SUM of the same sums): means unchanged, totals doubled
    out2 = finish_stats({k: v * 2 for k, v in sums.items()})
    assert out2 == pytest.approx({"clip_frac": 0.5, "loss": 1.5}), out2


def test_loss_stats_entropy_and_empty_mask() -> None:
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    s = loss_stats(mask, entropy=torch.tensor([[1.0, 2.0, 30.0]]))
    close(s["entropy"].value, 1.5)  # (1 + 2) / 2, the masked 30 excluded
    close(s["entropy"].weight, 2.0)  # a mean over the 2 kept tokens
    empty = torch.zeros(1, 3, dtype=torch.bool)
    s = loss_stats(empty, ratio=torch.ones(1, 3), clipped=torch.ones(1, 3, dtype=torch.bool))
    assert all(torch.isfinite(v.value) and v.value.item() == 0.0 for v in s.values())
    close(masked_mean(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([True, False, True])), 2.0)


# ------------------------------------------------------------------------------------ policy_objective (KL)


def test_grpo_loss_kl_weighted_by_kl_ctl() -> None:
    # ratio 1, A = 0 -> policy 0. ref = [-1, 0] -> delta [1, 0]; k3 = [e^-1 = 0.3678794, 0]
    #  token-mean KL 0.1839397; kl_ctl 0.1 -> 0.0183940; d/dlogp = 0.1 (1 - e^-1) / 2 = 0.0316060, 0
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[-1.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    zero_adv = torch.tensor([0.0])
    kw = dict(ref_logp=ref, kl_ctl=0.1)
    loss, s = objective(logp, logp, logp, zero_adv, mask, **kw)
    close(loss, 0.0183940)
    close(s["kl_ref"], 0.1839397)
    close(s["kl_loss"], 0.0183940)
    loss.backward()
    close(logp.grad, [[0.0316060, 0.0]])
    # k1: mean [1, 0] = 0.5 -> 0.05
    close(objective(logp, logp, logp, zero_adv, mask, kl_estimator="k1", **kw)[0], 0.05)
    # same aggregation as the policy term: seq-mean-token-sum -> 0.1 * 0.3678794
    close(objective(logp, logp, logp, zero_adv, mask, loss_agg_mode="seq-mean-token-sum", **kw)[0], 0.0367879)
    # with A = 1: policy -1 (token-mean), total -1 + 0.0183940
    loss, s = objective(logp, logp, logp, torch.tensor([1.0]), mask, **kw)
    close(loss, -0.981606)
    close(s["policy_loss"], -1.0)
    # kl_ctl 0: reported, not added
    loss, s = objective(logp, logp, logp, torch.tensor([1.0]), mask, ref_logp=ref, kl_ctl=0.0)
    close(loss, -1.0)
    close(s["kl_ref"], 0.1839397)
    with pytest.raises(ValueError, match="ref_logp"):
        objective(logp, logp, logp, zero_adv, mask, kl_ctl=0.1)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_loss_micro_batches_with_global_counts(mode: str) -> None:
    # mask-mode capping changes the counts: global counts must be taken over loss_mask & keep_mask
    gen = torch.Generator().manual_seed(2)
    B, T = 6, 5
    base = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    prox = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    behav = prox - torch.randn(B, T, generator=gen, dtype=torch.float64)  # some weights above the cap 2
    ref = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor([[5], [1], [3], [0], [4], [2]])
    kw = dict(eps_clip_higher=0.28, c_clip=3.0, behav_imp_weight_cap=2.0, behav_imp_weight_mode="mask",
              loss_agg_mode=mode, loss_agg_norm_len=T, kl_ctl=0.05)

    _, keep, capped = behaviour_weight(prox, behav, mask, cap=2.0, mode="mask")
    assert capped[mask].any() and (mask & keep).any()
    eff = effective_mask(prox, behav, mask, P(**kw))
    assert torch.equal(eff, mask & keep)
    n_tok, n_seq = count_tokens(eff), count_seqs(eff)

    full_v = base.clone().requires_grad_()
    full, _ = objective(full_v, prox, behav, adv, mask, ref_logp=ref, **kw)
    full.backward()
    micro_v = base.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for rows in ([0, 1], [2, 3, 4], [5]):
        part, _ = objective(micro_v[rows], prox[rows], behav[rows], adv[rows], mask[rows], ref_logp=ref[rows],
                            global_token_count=n_tok, global_seq_count=n_seq, **kw)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(micro_v.grad, full_v.grad)
