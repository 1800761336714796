"""Per-token losses ``[B, T]`` -> one scalar, verl's ``loss_agg_mode`` vocabulary.

Modes (``m`` the loss mask, ``L`` the per-token loss, sums over the tokens of a sequence):

* ``token-mean``               sum(m L) / sum(m)                                     (every token weighs the same)
* ``seq-mean-token-mean``      mean over sequences of sum_t(m L) / sum_t(m)          (GRPO paper)
* ``seq-mean-token-sum``       mean over sequences of sum_t(m L)
* ``seq-mean-token-sum-norm``  sum(m L) / norm_len / n_seqs                          (Dr.GRPO; norm_len constant)

A "sequence" is a row with at least one mask token: all-padding rows contribute 0 and are not counted.

Global normalisation. With gradient accumulation and data parallelism one optimiser step sees many micro-batches;
normalising each by its own counts and averaging the results weighs tokens unequally (a known bug in the anchors'
trackers). Pass ``global_token_count`` / ``global_seq_count`` (totals over every micro-batch on every rank of the
step, see :func:`count_tokens` / :func:`count_seqs`) and each micro-batch's loss is divided by the global count, so
that SUMMING the micro-batch losses (and the gradients, as DDP's all-reduce-sum does) gives exactly the full-batch
value. Sequences must not be split across micro-batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def count_tokens(mask: Tensor) -> Tensor:
    """Number (sum of weights) of loss tokens in ``mask``: the local contribution to ``global_token_count``."""
    return mask.to(torch.float32).sum()


def count_seqs(mask: Tensor) -> Tensor:
    """Number of rows with at least one loss token: the local contribution to ``global_seq_count``."""
    return (mask.to(torch.float32).sum(dim=-1) > 0).sum().to(torch.float32)


def _safe_div(num: Tensor, den: Tensor | float) -> Tensor:
    """``num / den``, 0 where ``den`` is 0 (an empty micro-batch contributes nothing, not NaN)."""
    den_t = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    safe = torch.where(den_t > 0, den_t, torch.ones_like(den_t))
    return torch.where(den_t > 0, num / safe, torch.zeros_like(num))


def _check_global(name: str, value: float | Tensor | None) -> None:
    if value is not None and float(value) < 0:
        raise ValueError(f"{name}={float(value)} must be >= 0 (a total over all micro-batches and ranks)")


def aggregate_loss(
    values: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    norm_len: int | float | None = None,
    global_token_count: float | Tensor | None = None,
    global_seq_count: float | Tensor | None = None,
) -> Tensor:
    """Aggregate per-token ``values[B, T]`` under ``mask[B, T]`` (bool or 0/1 weights) to a 0-dim tensor."""
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if values.dim() != 2:
        raise ValueError(f"values must be [batch, tokens], got shape {tuple(values.shape)}")
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode {mode!r} is not known; choose one of {list(LOSS_AGG_MODES)}")
    _check_global("global_token_count", global_token_count)
    _check_global("global_seq_count", global_seq_count)

    m = mask.to(values.dtype)
    # where() rather than multiply: a NaN/inf loss on a padding token must not leak into the sum (0 * inf = NaN).
    masked = torch.where(m != 0, values * m, torch.zeros_like(values))

    if mode == "token-mean":
        den = count_tokens(mask) if global_token_count is None else global_token_count
        return _safe_div(masked.sum(), den)

    seq_tokens = m.sum(dim=-1)
    seq_sums = masked.sum(dim=-1)
    n_seqs = count_seqs(mask) if global_seq_count is None else global_seq_count
    if mode == "seq-mean-token-mean":
        per_seq = _safe_div(seq_sums, seq_tokens)
        return _safe_div(per_seq.sum(), n_seqs)
    if mode == "seq-mean-token-sum":
        return _safe_div(seq_sums.sum(), n_seqs)
    # seq-mean-token-sum-norm
    if norm_len is None or norm_len <= 0:
        raise ValueError(
            f"loss_agg_mode 'seq-mean-token-sum-norm' needs a positive norm_len (got {norm_len}); "
            "set actor.loss_agg_norm_len or rollout.max_new_tokens"
        )
    return _safe_div(seq_sums.sum() / norm_len, n_seqs)
