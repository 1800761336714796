"""The behaviour importance weight: correcting for tokens that another policy sampled.

``w = pi_prox / pi_behave``, where ``pi_behave`` is the generation engine's probability of the sampled token and
``pi_prox`` the trainer's at the start of the step. It corrects two mismatches at once, which is why there is one
weight and not two: staleness (the sample came from an older policy version, AReaL's decoupled PPO) and the
train/inference mismatch (the engine's kernels, sampling precision and batching differ from the trainer's even at
the same weights). Neither carries gradient.

Level (``behav_imp_weight_level``):

* ``token``      ``w_t = exp(prox_t - behav_t)``                          (AReaL; per-token TIS/MIS)
* ``sequence``   ``w_i = exp(sum_t (prox_t - behav_t))`` on every token    (the exact sequence likelihood ratio)
* ``geometric``  ``w_i = exp(mean_t (prox_t - behav_t))`` on every token   (length-normalised, as GSPO's ratio)

Mode (``behav_imp_weight_mode``) when ``w > cap``: ``clamp`` truncates it to the cap (truncated IS, TIS) and
keeps the token; ``mask`` drops the token, or at a sequence level the whole sequence (masked IS, MIS). In mask
mode a ``floor`` drops what has ``w < floor`` too: a sample the engine found far likelier than the trainer does
(IcePop's and verl's lower threshold), whose tiny weight would otherwise only shrink it. The log-weight is clamped
to +-20 so the weight is always finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BEHAV_WEIGHT_MODES = ("clamp", "mask")
BEHAV_WEIGHT_LEVELS = ("token", "sequence", "geometric")
LOG_WEIGHT_CLAMP = 20.0


def behaviour_weight(
    prox_logp: Tensor,
    behav_logp: Tensor,
    mask: Tensor,
    cap: float | None,
    mode: str = "clamp",
    level: str = "token",
    floor: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight, keep, capped)``, each ``[B, T]``: the detached weight (0 where dropped), False where the cap or the
    floor drops a token (``mask`` mode; the caller ands ``keep`` with its loss mask), and True where either acted.
    ``cap`` / ``floor`` None: none. ``mask`` marks the completion tokens, the ones a sequence-level weight is taken
    over."""
    if prox_logp.shape != behav_logp.shape or prox_logp.shape != mask.shape:
        raise ValueError(f"prox_logp {tuple(prox_logp.shape)}, behav_logp {tuple(behav_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    if mode not in BEHAV_WEIGHT_MODES:
        raise ValueError(f"behav_imp_weight_mode {mode!r} is not known; choose one of {list(BEHAV_WEIGHT_MODES)}")
    if level not in BEHAV_WEIGHT_LEVELS:
        raise ValueError(f"behav_imp_weight_level {level!r} is not known; choose one of {list(BEHAV_WEIGHT_LEVELS)}")
    if cap is not None and not cap > 0:
        raise ValueError(f"behav_imp_weight_cap={cap} must be > 0 (typically > 1, AReaL uses 5) or None")
    if floor is not None and (mode != "mask" or not 0 < floor < (cap if cap is not None else math.inf)):
        raise ValueError(f"behav_imp_weight_floor={floor} needs behav_imp_weight_mode=mask and 0 < floor < cap "
                         f"({cap}); e.g. 0.5 with cap 2")
    with torch.no_grad():
        diff = prox_logp.detach().float() - behav_logp.detach().float()
        if level != "token":
            m = mask.to(diff.dtype)
            diff = torch.where(mask.bool(), diff, torch.zeros_like(diff))
            per_seq = diff.sum(dim=-1, keepdim=True)
            if level == "geometric":
                per_seq = per_seq / m.sum(dim=-1, keepdim=True).clamp_min(1.0)
            diff = per_seq.expand_as(diff)
        w = torch.exp(diff.clamp(-LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP)).to(prox_logp.dtype)
        if cap is None and floor is None:
            capped = torch.zeros_like(w, dtype=torch.bool)
            keep = torch.ones_like(capped)
        else:
            capped = (w > cap) if cap is not None else torch.zeros_like(w, dtype=torch.bool)
            if floor is not None:
                capped = capped | (w < floor)
            if mode == "clamp":
                keep = torch.ones_like(capped)
                w = w.clamp(max=cap)  # floor is None here (mask mode only)
            else:
                keep = ~capped
                w = torch.where(keep, w, torch.zeros_like(w))
    return w, keep, capped
