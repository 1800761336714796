"""KL estimators, hand-worked.

logp = [0, -1, -2], ref = [-1, -1, -0.5] -> delta = logp - ref = [1, 0, -1.5]
  k1 = [1, 0, -1.5]
  k2 = 0.5 delta^2 = [0.5, 0, 1.125]
  k3 = exp(-delta) - 1 + delta = [e^-1 = 0.3678794, 0, e^1.5 - 2.5 = 4.4816891 - 2.5 = 1.9816891]
  d/dlogp: k1 -> 1; k2 -> delta; k3 -> 1 - exp(-delta) = [0.6321206, 0, 1 - 4.4816891 = -3.4816891]
"""

from __future__ import annotations

import pytest
import torch

from asyncgrpo.core import kl_penalty

TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.tensor([0.0, -1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -0.5], requires_grad=True)
    return logp, ref


@pytest.mark.parametrize(
    ("estimator", "value", "grad"),
    [
        ("k1", [1.0, 0.0, -1.5], [1.0, 1.0, 1.0]),
        ("k2", [0.5, 0.0, 1.125], [1.0, 0.0, -1.5]),
        ("k3", [0.3678794, 0.0, 1.9816891], [0.6321206, 0.0, -3.4816891]),
    ],
)
def test_kl_estimators_values_and_grads(estimator: str, value: list, grad: list) -> None:
    logp, ref = _inputs()
    kl = kl_penalty(logp, ref, estimator)
    torch.testing.assert_close(kl, torch.tensor(value), **TOL)
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor(grad), **TOL)
    assert ref.grad is None  # the reference is frozen


def test_kl_default_is_k3() -> None:
    logp, ref = _inputs()
    torch.testing.assert_close(kl_penalty(logp, ref), torch.tensor([0.3678794, 0.0, 1.9816891]), **TOL)


def test_kl_clamp() -> None:
    logp = torch.tensor([30.0, -30.0], requires_grad=True)
    ref = torch.zeros(2)
    # delta clamped to +-10: k1 = [10, -10]; k3(10) = e^-10 + 9 = 9.0000454; k3(-10) = e^10 - 11 = 22015.4658
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([10.0, -10.0]))
    k3 = kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(k3, torch.tensor([9.0000454, 22015.4658]), **TOL)
    k3.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(2))  # clamped: no gradient through the saturated delta
    # a smaller clamp, and no clamp
    torch.testing.assert_close(kl_penalty(logp, ref, "k1", clamp=2.0), torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2", clamp=None), torch.tensor([450.0, 450.0]))


def test_kl_bad_inputs() -> None:
    logp, ref = _inputs()
    with pytest.raises(ValueError, match=r"'k4'.*k1"):
        kl_penalty(logp, ref, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_penalty(logp, ref[:2])
