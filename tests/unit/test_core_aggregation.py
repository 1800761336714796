"""Loss aggregation modes and global normalisation, hand-worked.

values = [[1, 2, 3, 4],      mask = [[1, 1, 1, 0],    row 0: 3 tokens, sum 6, token mean 2
          [5, 6, 0, 0],              [1, 0, 0, 0],    row 1: 1 token,  sum 5, token mean 5
          [9, 9, 9, 9]]              [0, 0, 0, 0]]    row 2: padding only -> not a sequence
  token-mean               = (6 + 5) / 4                = 2.75
  seq-mean-token-mean      = (2 + 5) / 2                = 3.5
  seq-mean-token-sum       = (6 + 5) / 2                = 5.5
  seq-mean-token-sum-norm  = (6 + 5) / norm_len 4 / 2   = 1.375
Gradients d/d values (masked positions):
  token-mean 1/4; seq-mean-token-mean row0 1/(2*3) = 1/6, row1 1/2; seq-mean-token-sum 1/2; sum-norm 1/(4*2) = 1/8
"""

from __future__ import annotations

import pytest
import torch

from asyncgrpo.core import LOSS_AGG_MODES, aggregate_loss, count_seqs, count_tokens

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


def _values() -> torch.Tensor:
    return torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]], requires_grad=True)


@pytest.mark.parametrize(
    ("mode", "expected", "grad_row0", "grad_row1"),
    [
        ("token-mean", 2.75, 1 / 4, 1 / 4),
        ("seq-mean-token-mean", 3.5, 1 / 6, 1 / 2),
        ("seq-mean-token-sum", 5.5, 1 / 2, 1 / 2),
        ("seq-mean-token-sum-norm", 1.375, 1 / 8, 1 / 8),
    ],
)
def test_modes_values_and_grads(mode: str, expected: float, grad_row0: float, grad_row1: float) -> None:
    v = _values()
    out = aggregate_loss(v, MASK, mode, norm_len=4)
    assert out.dim() == 0
    torch.testing.assert_close(out, torch.tensor(expected))
    out.backward()
    g0, g1 = grad_row0, grad_row1
    want = torch.tensor([[g0, g0, g0, 0.0], [g1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(v.grad, want)


def test_float_mask_same_as_bool() -> None:
    torch.testing.assert_close(aggregate_loss(_values(), MASK.float(), "seq-mean-token-mean"), torch.tensor(3.5))


def test_padding_nan_and_inf_do_not_leak() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0, float("inf")], [5.0, float("nan"), 0.0, 0.0], [float("nan")] * 4], requires_grad=True)
    for mode, expected in [("token-mean", 2.75), ("seq-mean-token-mean", 3.5), ("seq-mean-token-sum", 5.5)]:
        out = aggregate_loss(v, MASK, mode)
        torch.testing.assert_close(out, torch.tensor(expected))
        (g,) = torch.autograd.grad(out, v)
        assert torch.isfinite(g).all() and g[2].abs().sum() == 0


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_empty_mask_gives_zero_not_nan(mode: str) -> None:
    v = torch.ones(2, 3, requires_grad=True)
    out = aggregate_loss(v, torch.zeros(2, 3, dtype=torch.bool), mode, norm_len=3)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(v.grad, torch.zeros(2, 3))


def test_global_counts_replace_local_ones() -> None:
    v = _values()
    # token-mean with 8 tokens in the global batch: 11 / 8 = 1.375
    torch.testing.assert_close(aggregate_loss(v, MASK, "token-mean", global_token_count=8), torch.tensor(1.375))
    # seq-mean-token-mean with 4 global sequences: (2 + 5) / 4 = 1.75 (the token count is irrelevant here)
    torch.testing.assert_close(
        aggregate_loss(v, MASK, "seq-mean-token-mean", global_token_count=999, global_seq_count=4), torch.tensor(1.75)
    )
    # seq-mean-token-sum: 11 / 4 ; sum-norm: 11 / 4 / 4
    torch.testing.assert_close(aggregate_loss(v, MASK, "seq-mean-token-sum", global_seq_count=4), torch.tensor(2.75))
    torch.testing.assert_close(
        aggregate_loss(v, MASK, "seq-mean-token-sum-norm", norm_len=4, global_seq_count=torch.tensor(4.0)),
        torch.tensor(0.6875),
    )


def test_local_normalisation_of_micro_batches_is_wrong_global_is_right() -> None:
    # micro-batch A = row 0 (3 tokens, sum 6), B = row 1 (1 token, sum 5). Full token-mean = 11/4 = 2.75.
    # Averaging local means gives (2 + 5)/2 = 3.5 (the bug); global count: 6/4 + 5/4 = 2.75.
    v = _values()
    local = [aggregate_loss(v[i : i + 1], MASK[i : i + 1], "token-mean") for i in (0, 1)]
    torch.testing.assert_close((local[0] + local[1]) / 2, torch.tensor(3.5))
    glob = [aggregate_loss(v[i : i + 1], MASK[i : i + 1], "token-mean", global_token_count=4) for i in (0, 1)]
    torch.testing.assert_close(glob[0] + glob[1], torch.tensor(2.75))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batch_sum_equals_full_batch_with_grads(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    B, T = 7, 6
    base = torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 4, 0, 3, 6, 2])  # uneven, one all-padding row
    mask = torch.arange(T)[None, :] < lengths[:, None]

    full_v = base.clone().requires_grad_()
    full = aggregate_loss(full_v, mask, mode, norm_len=6)
    full.backward()

    micro_v = base.clone().requires_grad_()
    n_tok, n_seq = count_tokens(mask), count_seqs(mask)
    assert n_tok.item() == 22 and n_seq.item() == 6
    total = torch.zeros((), dtype=torch.float64)
    for rows in ([0, 1, 2], [3, 4], [5, 6]):  # e.g. three micro-batches, or three DP ranks
        part = aggregate_loss(
            micro_v[rows], mask[rows], mode, norm_len=6, global_token_count=n_tok, global_seq_count=n_seq
        )
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(micro_v.grad, full_v.grad)


def test_bad_arguments() -> None:
    v = _values()
    with pytest.raises(ValueError, match="norm_len"):
        aggregate_loss(v, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"'seq-mean'.*token-mean"):
        aggregate_loss(v, MASK, "seq-mean")
    with pytest.raises(ValueError, match="same shape"):
        aggregate_loss(v, MASK[:, :2], "token-mean")
    with pytest.raises(ValueError, match="global_token_count"):
        aggregate_loss(v, MASK, "token-mean", global_token_count=-1)
