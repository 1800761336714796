"""Reported statistics of a loss computation: masked, detached 0-dim tensors (no host sync until logged).

All token statistics are over the given mask of one micro-batch; ``n_tokens`` / ``n_seqs`` are included so that a
caller can combine micro-batches with token-weighted means. Stds here are population (biased) stds: they describe
the numbers at hand, they do not estimate anything.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncgrpo.core.kl import kl_k3


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``x`` over ``mask`` (NaN/inf outside the mask are ignored)."""
    m = mask.to(x.dtype) if x.is_floating_point() else mask.to(torch.float32)
    xf = x.to(m.dtype)
    return torch.where(m != 0, xf * m, torch.zeros_like(xf)).sum()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask``; 0 (not NaN) when the mask is empty."""
    x, mask = torch.broadcast_tensors(x, mask)
    total = masked_sum(x, mask)
    count = mask.to(total.dtype).sum()
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def masked_std(x: Tensor, mask: Tensor) -> Tensor:
    """Population std of ``x`` over ``mask``; 0 when the mask is empty."""
    x, mask = torch.broadcast_tensors(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x.to(mean.dtype) - mean).square(), mask)
    return var.clamp_min(0).sqrt()


def _masked_extreme(x: Tensor, mask: Tensor, largest: bool) -> Tensor:
    sel = x[mask.bool()]
    if sel.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return (sel.max() if largest else sel.min()).to(torch.float32)


@torch.no_grad()
def loss_stats(
    mask: Tensor,
    *,
    logp: Tensor | None = None,
    prox_logp: Tensor | None = None,
    ratio: Tensor | None = None,
    clipped: Tensor | None = None,
    dual_clipped: Tensor | None = None,
    behav_weight: Tensor | None = None,
    capped: Tensor | None = None,
    cap_mask: Tensor | None = None,
    advantages: Tensor | None = None,
    entropy: Tensor | None = None,
    rewards: Tensor | None = None,
) -> dict[str, Tensor]:
    """Statistics over the tokens in ``mask`` (the tokens that enter the loss); only the given inputs are reported.

    Keys: ``n_tokens``, ``n_seqs``, ``clip_frac``, ``dual_clip_frac``, ``ratio_mean``, ``approx_kl`` (k3 of
    ``logp`` vs ``prox_logp``), ``behav_weight_mean``, ``behav_cap_frac`` (over ``cap_mask``, default ``mask``: the
    tokens before cap masking removed any), ``adv_mean/std/min/max`` (per token), ``entropy_mean``,
    ``reward_mean/std`` (over the given per-sequence rewards).
    """
    mask = mask.bool()
    out: dict[str, Tensor] = {
        "n_tokens": mask.sum().to(torch.float32),
        "n_seqs": (mask.sum(dim=-1) > 0).sum().to(torch.float32) if mask.dim() > 0 else mask.to(torch.float32),
    }
    if clipped is not None:
        out["clip_frac"] = masked_mean(clipped.float(), mask)
    if dual_clipped is not None:
        out["dual_clip_frac"] = masked_mean(dual_clipped.float(), mask)
    if ratio is not None:
        out["ratio_mean"] = masked_mean(ratio.detach().float(), mask)
    if logp is not None and prox_logp is not None:
        out["approx_kl"] = masked_mean(kl_k3((logp.detach() - prox_logp.detach()).float()), mask)
    if behav_weight is not None:
        out["behav_weight_mean"] = masked_mean(behav_weight.detach().float(), mask)
    if capped is not None:
        out["behav_cap_frac"] = masked_mean(capped.float(), mask if cap_mask is None else cap_mask.bool())
    if advantages is not None:
        adv = torch.broadcast_to(advantages.detach().float(), mask.shape)
        out["adv_mean"] = masked_mean(adv, mask)
        out["adv_std"] = masked_std(adv, mask)
        out["adv_min"] = _masked_extreme(adv, mask, largest=False)
        out["adv_max"] = _masked_extreme(adv, mask, largest=True)
    if entropy is not None:
        out["entropy_mean"] = masked_mean(entropy.detach().float(), mask)
    if rewards is not None:
        r = rewards.detach().float().reshape(-1)
        out["reward_mean"] = r.mean() if r.numel() else torch.zeros((), device=r.device)
        out["reward_std"] = r.std(correction=0) if r.numel() else torch.zeros((), device=r.device)
    return {k: v.detach() for k, v in out.items()}
