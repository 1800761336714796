"""Policy losses by name, and the objective that wraps any of them: importance weight, aggregation, KL, statistics.

Three policies appear (notation of /work/shared/notes/grpo-math.md):

* ``logp``   log pi_theta of the sampled tokens, the only input with gradient;
* ``prox``   log pi_prox, recomputed by the trainer with the weights at the start of the step (the PPO anchor);
* ``behav``  log pi_behave, returned by the generation server that sampled the tokens (possibly stale).

A policy loss is one function registered in :data:`POLICY_LOSSES` (``actor.policy_loss``): the per-token
surrogate ``L_t`` of the ratio ``pi_theta / pi_prox`` and its per-token flags. :func:`policy_objective` does the
rest for every loss alike: the behaviour weight ``w_t`` (core.importance, detached, capped) that corrects for
staleness and the engine's mismatch, ``aggregate(w_t * L_t)`` (core.aggregation), the KL to the reference in the
loss, and the statistics. When the tokens were sampled by the current weights (``behav == prox``) ``w = 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from asyncgrpo.core.aggregation import LOSS_AGG_MODES, aggregate_loss
from asyncgrpo.core.importance import BEHAV_WEIGHT_LEVELS, BEHAV_WEIGHT_MODES, behaviour_weight
from asyncgrpo.core.kl import KL_ESTIMATORS, kl_penalty
from asyncgrpo.core.registry import Registry
from asyncgrpo.core.stats import Stat, loss_stats

# verl clamps the log-ratio so that exp() stays finite in fp32 whatever the log-probs are.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class LossParams:
    """Every setting of the loss, built once from the config (trainer) and validated here."""

    policy_loss: str
    eps_clip: float
    eps_clip_higher: float | None  # None: eps_clip
    c_clip: float | None
    behav_imp_weight_cap: float | None
    behav_imp_weight_mode: str
    behav_imp_weight_level: str
    loss_agg_mode: str
    loss_agg_norm_len: float | None  # seq-mean-token-sum-norm's constant length
    kl_ctl: float  # weight of the KL to the reference IN THE LOSS (0 when the KL goes into the reward)
    kl_estimator: str
    kl_clamp: float | None = 10.0  # not a config knob: AReaL's bound on logp - ref before the estimator
    behav_imp_weight_floor: float | None = None  # mask mode: drop what has w < floor too

    def __post_init__(self) -> None:
        POLICY_LOSSES.get(self.policy_loss)
        if not 0 < self.eps_clip < 1:
            raise ValueError(f"eps_clip={self.eps_clip} must be in (0, 1): the ratio is clipped to [1 - eps_clip, 1 + eps_clip_higher]")
        if self.eps_clip_higher is not None and self.eps_clip_higher <= 0:
            raise ValueError(f"eps_clip_higher={self.eps_clip_higher} must be > 0 or None (None means eps_clip)")
        if self.c_clip is not None and not self.c_clip > 1:
            raise ValueError(f"c_clip={self.c_clip} must be > 1 (dual clip bounds the loss of A<0 tokens at c*|A|); use None to disable")
        if self.behav_imp_weight_mode not in BEHAV_WEIGHT_MODES:
            raise ValueError(f"behav_imp_weight_mode {self.behav_imp_weight_mode!r}: choose one of {list(BEHAV_WEIGHT_MODES)}")
        if self.behav_imp_weight_level not in BEHAV_WEIGHT_LEVELS:
            raise ValueError(f"behav_imp_weight_level {self.behav_imp_weight_level!r}: choose one of {list(BEHAV_WEIGHT_LEVELS)}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode {self.loss_agg_mode!r}: choose one of {list(LOSS_AGG_MODES)}")
        if self.kl_ctl < 0:
            raise ValueError(f"kl_ctl={self.kl_ctl} must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator {self.kl_estimator!r}: choose one of {list(KL_ESTIMATORS)}")

    @property
    def eps_high(self) -> float:
        return self.eps_clip if self.eps_clip_higher is None else self.eps_clip_higher


# fn(logp, prox_logp, advantages [B, T], mask, params) -> (per-token loss to minimise, per-token flags); the flags
# 'ratio' (float), 'clipped' and 'dual_clipped' (bool) feed the statistics.
PolicyLoss = Callable[[Tensor, Tensor, Tensor, Tensor, LossParams], tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss", "actor.policy_loss")


def broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """Per-sequence advantages ``[B]`` become ``[B, 1]``; anything broadcastable is expanded to ``like``'s shape."""
    adv = advantages.detach()
    if adv.dim() == like.dim() - 1 and adv.shape == like.shape[:-1]:
        adv = adv.unsqueeze(-1)
    try:
        return torch.broadcast_to(adv, like.shape).to(like.dtype)
    except RuntimeError as e:
        raise ValueError(
            f"advantages of shape {tuple(advantages.shape)} do not broadcast to the log-probs' shape {tuple(like.shape)}; "
            "give one per sequence [B] or one per token [B, T]"
        ) from e


def _clipped_surrogate(ratio: Tensor, adv: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """``max(-A r, -A clip(r, 1 - low, 1 + high))`` and where the clipped term won strictly (no gradient there)."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@POLICY_LOSSES.register("ppo")
def ppo_clip_loss(logp: Tensor, prox_logp: Tensor, adv: Tensor, mask: Tensor, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped surrogate of ``r_t = exp(logp_t - prox_t)`` (log-ratio clamped to +-20), with DAPO's
    clip-higher (``eps_clip_higher``) and the dual clip for A < 0: ``L = min(L, c_clip * |A|)`` (``c_clip``).

    Flags: ``clipped`` (the clipped term won strictly: verl's pg_clipfrac), ``dual_clipped`` (A < 0 and the dual
    bound was strictly lower: verl's pg_clipfrac_lower)."""
    ratio = torch.exp((logp - prox_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss, clipped = _clipped_surrogate(ratio, adv, p.eps_clip, p.eps_high)
    if p.c_clip is not None:
        bound = -adv * p.c_clip  # = c |A| where A < 0
        dual_clipped = (adv < 0) & (bound < loss)
        loss = torch.where(dual_clipped, bound, loss)
    else:
        dual_clipped = torch.zeros_like(clipped)
    return loss, {"ratio": ratio.detach(), "clipped": clipped, "dual_clipped": dual_clipped}


@POLICY_LOSSES.register("gspo")
def gspo_loss(logp: Tensor, prox_logp: Tensor, adv: Tensor, mask: Tensor, p: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): the clipped surrogate of the length-normalised SEQUENCE ratio
    ``s_i = exp(mean_t (logp_t - prox_t))``, the same for every token of a sequence.

    Per token the value is ``s_i`` and the gradient is ``s_i * grad logp_t`` (GSPO-token's
    ``sg[s_i] * pi_t / sg[pi_t]``), so ``seq-mean-token-mean`` aggregation gives GSPO's gradient
    ``-A_i s_i mean_t grad logp_t`` exactly. The sequence ratio moves ~1e-3 per step, hence GSPO's clip range of
    3e-4 / 4e-4 (set eps_clip / eps_clip_higher); a whole sequence is clipped or not."""
    m = mask.to(logp.dtype)
    delta = torch.where(mask.bool(), logp - prox_logp.detach(), torch.zeros_like(logp))
    seq = delta.sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True).clamp_min(1.0)
    log_s = (seq.detach() + logp - logp.detach()).clamp(max=LOG_RATIO_CLAMP)
    ratio = torch.exp(log_s)
    loss, clipped = _clipped_surrogate(ratio, adv, p.eps_clip, p.eps_high)
    return loss, {"ratio": ratio.detach(), "clipped": clipped, "dual_clipped": torch.zeros_like(clipped)}


def effective_mask(prox_logp: Tensor, behav_logp: Tensor, loss_mask: Tensor, p: LossParams) -> Tensor:
    """The tokens that enter the loss: the loss mask less the tokens (sequences) the behaviour cap drops. Count
    these for the global normalisers."""
    _, keep, _ = behaviour_weight(prox_logp, behav_logp, loss_mask, p.behav_imp_weight_cap, p.behav_imp_weight_mode,
                                  p.behav_imp_weight_level, p.behav_imp_weight_floor)
    return loss_mask.bool() & keep


def policy_objective(
    logp: Tensor,
    prox_logp: Tensor,
    behav_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    p: LossParams,
    *,
    global_token_count: float | Tensor | None = None,
    global_seq_count: float | Tensor | None = None,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Stat]]:
    """``aggregate(w_t * L_t) + kl_ctl * aggregate(KL(pi_theta || pi_ref))`` over the tokens the loss keeps.

    ``L_t`` is ``p.policy_loss``'s surrogate, ``w_t`` the behaviour weight (core.importance). Tokens the cap drops in
    ``mask`` mode leave the loss and its normalisers, so global counts must count :func:`effective_mask`. With
    global counts the loss is this micro-batch's share (sum the shares over micro-batches). ``ref_logp`` is
    required when ``kl_ctl > 0``; given with ``kl_ctl == 0`` the KL is reported (``kl_ref``) and adds nothing.
    Returns ``(loss, stats)``: every statistic says how it is reduced (core.stats.Stat).
    """
    if loss_mask.shape != logp.shape or prox_logp.shape != logp.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} and prox_logp {tuple(prox_logp.shape)} must have the "
                         f"log-probs' shape {tuple(logp.shape)}")
    if p.kl_ctl > 0 and ref_logp is None:
        raise ValueError("kl_ctl > 0 needs ref_logp (log-probs of the reference policy); pass it or set actor.kl_ctl=0")
    base = loss_mask.bool()
    w, keep, capped = behaviour_weight(prox_logp, behav_logp, base, p.behav_imp_weight_cap, p.behav_imp_weight_mode,
                                       p.behav_imp_weight_level, p.behav_imp_weight_floor)
    mask = base & keep
    adv = broadcast_advantages(advantages, logp)
    per_token, flags = POLICY_LOSSES.get(p.policy_loss)(logp, prox_logp, adv, mask, p)

    def agg(x: Tensor) -> Tensor:
        return aggregate_loss(x, mask, p.loss_agg_mode, p.loss_agg_norm_len, global_token_count, global_seq_count)

    policy = agg(w.to(per_token.dtype) * per_token)
    total = policy
    stats = loss_stats(mask, logp=logp, prox_logp=prox_logp, ratio=flags["ratio"], clipped=flags["clipped"],
                       dual_clipped=flags["dual_clipped"], behav_weight=w, capped=capped, cap_mask=base, entropy=entropy)
    stats["policy_loss"] = Stat.total(policy)
    if ref_logp is not None:
        kl = agg(kl_penalty(logp, ref_logp, p.kl_estimator, p.kl_clamp))
        stats["kl_ref"] = Stat.total(kl)
        if p.kl_ctl > 0:
            total = policy + p.kl_ctl * kl
            stats["kl_loss"] = Stat.total(p.kl_ctl * kl)
    stats["loss"] = Stat.total(total)
    return total, stats

