"""The clipped surrogate policy loss, AReaL's decoupled (off-policy corrected) form, and the full GRPO loss.

Three policies appear (notation of /work/shared/notes/grpo-math.md):

* ``logp``   log pi_theta of the sampled tokens, the only input with gradient;
* ``prox``   log pi_prox, recomputed by the trainer with the weights at the start of the step (the PPO anchor);
* ``behav``  log pi_behave, returned by the generation server that sampled the tokens (possibly stale).

The decoupled loss per token is ``w_t * L_t`` with the behaviour weight ``w_t = pi_prox / pi_behave`` (detached,
capped) correcting for the staleness, and ``L_t`` the PPO clipped surrogate of ``pi_theta / pi_prox``. When the
tokens were sampled by the current weights (``behav == prox``) ``w = 1`` and this is plain PPO/GRPO.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncgrpo.core.aggregation import aggregate_loss
from asyncgrpo.core.kl import kl_penalty
from asyncgrpo.core.stats import loss_stats

BEHAV_WEIGHT_MODES = ("clamp", "mask")
# verl clamps the log-ratio so that exp() stays finite in fp32 whatever the log-probs are.
LOG_RATIO_CLAMP = 20.0


def _broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
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


def _check_clip(eps_clip: float, eps_clip_higher: float | None, c_clip: float | None) -> float:
    if not 0 < eps_clip < 1:
        raise ValueError(f"eps_clip={eps_clip} must be in (0, 1): the ratio is clipped to [1 - eps_clip, 1 + eps_clip_higher]")
    eps_high = eps_clip if eps_clip_higher is None else eps_clip_higher
    if eps_high <= 0:
        raise ValueError(f"eps_clip_higher={eps_clip_higher} must be > 0 or None (None means eps_clip)")
    if c_clip is not None and not c_clip > 1:
        raise ValueError(f"c_clip={c_clip} must be > 1 (dual clip bounds the loss of A<0 tokens at c*|A|); use None to disable")
    return eps_high


def ppo_clip_loss(
    logp: Tensor,
    prox_logp: Tensor,
    advantages: Tensor,
    eps_clip: float,
    eps_clip_higher: float | None = None,
    c_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped surrogate ``L = max(-A r, -A clip(r, 1 - eps_clip, 1 + eps_high))`` (to minimise).

    ``r = exp(logp - prox_logp)`` with the log-ratio clamped to +-20; ``prox_logp`` and ``advantages`` are
    detached. Dual clip (``c_clip``, for A < 0 only): ``L = min(L, c_clip * |A|)``.

    info: ``ratio`` (detached), ``clipped`` (bool: the max picked the clipped term strictly, i.e. the token gives no
    gradient through the PPO clip; verl's pg_clipfrac), ``dual_clipped`` (bool: A < 0 and the dual bound was
    strictly lower; verl's pg_clipfrac_lower).
    """
    if logp.shape != prox_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and prox_logp {tuple(prox_logp.shape)} must have the same shape")
    eps_high = _check_clip(eps_clip, eps_clip_higher, c_clip)
    adv = _broadcast_advantages(advantages, logp)

    log_ratio = (logp - prox_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_clip, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped

    if c_clip is not None:
        bound = -adv * c_clip  # = c |A| where A < 0
        dual_clipped = (adv < 0) & (bound < loss)
        loss = torch.where(dual_clipped, bound, loss)
    else:
        dual_clipped = torch.zeros_like(clipped)
    return loss, {"ratio": ratio.detach(), "clipped": clipped, "dual_clipped": dual_clipped}


def behaviour_weight(
    prox_logp: Tensor,
    behav_logp: Tensor,
    cap: float | None = None,
    mode: str = "clamp",
) -> tuple[Tensor, Tensor, Tensor]:
    """Importance weight ``w = exp(prox - behav)`` correcting for stale samples; never carries gradient.

    ``cap`` None: no cap. ``mode="clamp"``: ``w = min(w, cap)``, every token kept. ``mode="mask"``: tokens with
    ``w > cap`` are dropped (``keep_mask`` False, weight 0). Returns ``(weight, keep_mask, capped_mask)`` where
    ``capped_mask`` marks the tokens the cap acted on (in either mode). The log-difference is clamped to +-20 so
    the weight is finite.
    """
    if prox_logp.shape != behav_logp.shape:
        raise ValueError(f"prox_logp {tuple(prox_logp.shape)} and behav_logp {tuple(behav_logp.shape)} must have the same shape")
    if mode not in BEHAV_WEIGHT_MODES:
        raise ValueError(f"behav_imp_weight_mode {mode!r} is not known; choose one of {list(BEHAV_WEIGHT_MODES)}")
    if cap is not None and not cap > 0:
        raise ValueError(f"behav_imp_weight_cap={cap} must be > 0 (typically > 1, AReaL uses 5) or None")
    with torch.no_grad():
        w = torch.exp((prox_logp.detach() - behav_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        if cap is None:
            capped = torch.zeros_like(w, dtype=torch.bool)
            keep = torch.ones_like(w, dtype=torch.bool)
        else:
            capped = w > cap
            if mode == "clamp":
                keep = torch.ones_like(capped)
                w = w.clamp(max=cap)
            else:
                keep = ~capped
                w = torch.where(keep, w, torch.zeros_like(w))
    return w, keep, capped


def _policy_part(
    logp: Tensor,
    prox_logp: Tensor,
    behav_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    eps_clip: float,
    eps_clip_higher: float | None,
    c_clip: float | None,
    behav_imp_weight_cap: float | None,
    behav_imp_weight_mode: str,
    loss_agg_mode: str,
    loss_agg_norm_len: int | float | None,
    global_token_count: float | Tensor | None,
    global_seq_count: float | Tensor | None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Shared body of the decoupled and GRPO losses: returns (policy loss, effective mask, stats)."""
    if loss_mask.shape != logp.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the log-probs' shape {tuple(logp.shape)}")
    base_mask = loss_mask.bool()
    w, keep, capped = behaviour_weight(prox_logp, behav_logp, behav_imp_weight_cap, behav_imp_weight_mode)
    mask = base_mask & keep
    per_token, info = ppo_clip_loss(logp, prox_logp, advantages, eps_clip, eps_clip_higher, c_clip)
    policy = aggregate_loss(
        w.to(per_token.dtype) * per_token, mask, loss_agg_mode, loss_agg_norm_len, global_token_count, global_seq_count
    )
    stats = loss_stats(
        mask,
        logp=logp,
        prox_logp=prox_logp,
        ratio=info["ratio"],
        clipped=info["clipped"],
        dual_clipped=info["dual_clipped"],
        behav_weight=w,
        capped=capped,
        cap_mask=base_mask,
        advantages=_broadcast_advantages(advantages, logp),
    )
    stats["policy_loss"] = policy.detach()
    return policy, mask, stats


def decoupled_ppo_loss(
    logp: Tensor,
    prox_logp: Tensor,
    behav_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    eps_clip: float,
    eps_clip_higher: float | None = None,
    c_clip: float | None = None,
    behav_imp_weight_cap: float | None = None,
    behav_imp_weight_mode: str = "clamp",
    loss_agg_mode: str = "token-mean",
    loss_agg_norm_len: int | float | None = None,
    global_token_count: float | Tensor | None = None,
    global_seq_count: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """AReaL's decoupled PPO loss: aggregate of ``w_t * L_t`` over the loss mask.

    Tokens dropped by the cap in ``mask`` mode leave the loss mask, so they do not count in the local
    normalisers; callers using global counts must count ``loss_mask & keep_mask`` (from :func:`behaviour_weight`)
    to match. Returns ``(loss, stats)`` with stats from :func:`asyncgrpo.core.stats.loss_stats` plus
    ``policy_loss`` and ``loss``. With global counts, ``loss``/``policy_loss`` are this micro-batch's share (sum
    them over micro-batches); the other stats are means over this micro-batch's tokens (weight by ``n_tokens``).
    """
    policy, _, stats = _policy_part(
        logp, prox_logp, behav_logp, advantages, loss_mask,
        eps_clip=eps_clip, eps_clip_higher=eps_clip_higher, c_clip=c_clip,
        behav_imp_weight_cap=behav_imp_weight_cap, behav_imp_weight_mode=behav_imp_weight_mode,
        loss_agg_mode=loss_agg_mode, loss_agg_norm_len=loss_agg_norm_len,
        global_token_count=global_token_count, global_seq_count=global_seq_count,
    )
    stats["loss"] = policy.detach()
    return policy, stats


def grpo_loss(
    logp: Tensor,
    prox_logp: Tensor,
    behav_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    eps_clip: float,
    eps_clip_higher: float | None = None,
    c_clip: float | None = None,
    behav_imp_weight_cap: float | None = None,
    behav_imp_weight_mode: str = "clamp",
    loss_agg_mode: str = "token-mean",
    loss_agg_norm_len: int | float | None = None,
    global_token_count: float | Tensor | None = None,
    global_seq_count: float | Tensor | None = None,
    ref_logp: Tensor | None = None,
    kl_ctl: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float | None = 10.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled PPO loss plus ``kl_ctl * aggregate(KL(pi_theta || pi_ref))``, aggregated the same way.

    The KL term uses the same effective mask (loss mask minus cap-masked tokens) and the same normalisers as the
    policy term, so global counts stay consistent. ``ref_logp`` is required when ``kl_ctl > 0``; when given with
    ``kl_ctl == 0`` the KL is still reported (``kl_ref``) but adds nothing.
    """
    if kl_ctl < 0:
        raise ValueError(f"kl_ctl={kl_ctl} must be >= 0")
    if kl_ctl > 0 and ref_logp is None:
        raise ValueError("kl_ctl > 0 needs ref_logp (log-probs of the reference policy); pass it or set actor.kl_ctl=0")
    policy, mask, stats = _policy_part(
        logp, prox_logp, behav_logp, advantages, loss_mask,
        eps_clip=eps_clip, eps_clip_higher=eps_clip_higher, c_clip=c_clip,
        behav_imp_weight_cap=behav_imp_weight_cap, behav_imp_weight_mode=behav_imp_weight_mode,
        loss_agg_mode=loss_agg_mode, loss_agg_norm_len=loss_agg_norm_len,
        global_token_count=global_token_count, global_seq_count=global_seq_count,
    )
    total = policy
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator, kl_clamp)
        kl_agg = aggregate_loss(kl, mask, loss_agg_mode, loss_agg_norm_len, global_token_count, global_seq_count)
        stats["kl_ref"] = kl_agg.detach()
        if kl_ctl > 0:
            total = policy + kl_ctl * kl_agg
            stats["kl_loss"] = (kl_ctl * kl_agg).detach()
    stats["loss"] = total.detach()
    return total, stats
