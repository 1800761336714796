"""Reported statistics of a loss computation: masked, detached 0-dim tensors (no host sync until logged).

Each statistic of one micro-batch is a :class:`Stat` that says how it combines with the same statistic of the other
micro-batches and ranks of a step: summed (a loss share, a count) or a mean weighted by the tokens it is a mean over.
The trainer reduces every statistic the same way (:func:`reduce_stats`), whatever loss produced it. Stds here are
population (biased) stds: they describe the numbers at hand, they do not estimate anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from asyncgrpo.core.kl import kl_k3


@dataclass(frozen=True)
class Stat:
    """One micro-batch's value; ``weight`` None: summed across micro-batches and ranks, else the step's value is
    ``sum(value * weight) / sum(weight)`` (a mean over ``weight`` tokens or sequences)."""

    value: Tensor
    weight: Tensor | None = None

    @staticmethod
    def total(value: Tensor) -> "Stat":
        return Stat(value.detach().float().reshape(()), None)

    @staticmethod
    def mean(value: Tensor, over: Tensor) -> "Stat":
        return Stat(value.detach().float().reshape(()), over.detach().float().reshape(()))


def stat_sums(stats: Iterable[Mapping[str, Stat]]) -> dict[str, Tensor]:
    """Per key, ``[numerator, denominator]`` in float64 summed over micro-batches (denominator -1 marks a sum): add
    these across ranks (all-reduce SUM) and finish with :func:`finish_stats`."""
    out: dict[str, Tensor] = {}
    for st in stats:
        for k, s in st.items():
            acc = out.setdefault(k, torch.zeros(2, dtype=torch.float64))
            if s.weight is None:
                acc[0] += s.value.double()
                acc[1] = -1.0
            else:
                acc[0] += s.value.double() * s.weight.double()
                acc[1] += s.weight.double()
    return out


def finish_stats(sums: Mapping[str, Tensor]) -> dict[str, float]:
    """Scalars from :func:`stat_sums`, after they were added across ranks (a sum's denominator is then -ranks)."""
    out = {}
    for k, (num, den) in sums.items():
        num, den = float(num), float(den)
        out[k] = num if den < 0 else (num / den if den > 0 else 0.0)
    return out


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
    entropy: Tensor | None = None,
) -> dict[str, Stat]:
    """Statistics over the tokens in ``mask`` (the tokens that enter the loss); only the given inputs are reported.

    Keys: ``n_tokens``, ``n_seqs`` (sums), and means over the kept tokens: ``clip_frac``, ``dual_clip_frac``,
    ``ratio_mean``, ``approx_kl`` (k3 of ``logp`` vs ``prox_logp``), ``behav_weight_mean``, ``entropy``; and
    ``behav_cap_frac``, a mean over ``cap_mask`` (default ``mask``: the tokens before cap masking removed any).
    """
    mask = mask.bool()
    n = mask.sum().float()
    out: dict[str, Stat] = {
        "n_tokens": Stat.total(n),
        "n_seqs": Stat.total((mask.sum(dim=-1) > 0).sum().float() if mask.dim() > 0 else mask.float()),
    }

    def kept_mean(name: str, x: Tensor | None) -> None:
        if x is not None:
            out[name] = Stat.mean(masked_mean(x.detach().float(), mask), n)

    kept_mean("clip_frac", clipped)
    kept_mean("dual_clip_frac", dual_clipped)
    kept_mean("ratio_mean", ratio)
    if logp is not None and prox_logp is not None:
        kept_mean("approx_kl", kl_k3((logp.detach() - prox_logp.detach()).float()))
    kept_mean("behav_weight_mean", behav_weight)
    kept_mean("entropy", entropy)
    if capped is not None:
        cm = mask if cap_mask is None else cap_mask.bool()
        out["behav_cap_frac"] = Stat.mean(masked_mean(capped.float(), cm), cm.sum().float())
    return out
