"""Per-token log-probs (and entropy) of given sequences under the megatron policy at a temperature.

Sequences are right-padded: megatron's RoPE ignores position_ids, so a left pad would shift every
position. Causality alone keeps real tokens from seeing the right padding, and an explicit boolean mask
is always passed (megatron builds its default mask on "cuda"). Log-probs are of logits / T, as the
generation server samples, computed with megatron's vocab-parallel cross entropy so TP never gathers
the vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def causal_mask(batch: int, seq: int, device: torch.device) -> Tensor:
    """[B, 1, S, S] boolean, True = masked (future positions)."""
    m = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)
    return m.view(1, 1, seq, seq).expand(batch, 1, seq, seq)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward_logits(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """[B, S, V / tp] vocab-parallel logits of right-padded input_ids (moved to the model's device).

    On the CPU the causal mask is passed explicitly (megatron would build its default on "cuda"); on a GPU the
    mask is None, so megatron's attention uses its own causal mask (the local spec builds the same [S, S] upper
    triangle on the device) and Transformer Engine's attention its causal mask type (fused / flash kernels,
    which take no arbitrary mask). Both are the same mask: causality alone, right padding needs nothing more."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    b, s = input_ids.shape
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    mask = None if device.type == "cuda" else causal_mask(b, s, device)
    return model(input_ids, pos, mask)


def _mask_padded_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Padded vocabulary rows (TP padding) must carry no probability mass."""
    from megatron.core import parallel_state

    part = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * part
    if start + part <= vocab_size:
        return logits
    ids = torch.arange(start, start + part, device=logits.device)
    # A large finite value, not -inf, so p * log p stays 0 instead of NaN in the entropy.
    return logits.masked_fill(ids >= vocab_size, torch.finfo(logits.dtype).min / 2)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    temperature: float,
    vocab_size: int,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log p(x_t | x_<t) at temperature T for every position t >= 1 ([B, S], position 0 is 0), and
    optionally the entropy of the predictive distribution for x_t (no grad; same layout)."""
    from megatron.core import tensor_parallel

    logits = forward_logits(model, input_ids)[:, :-1].float() / temperature
    logits = _mask_padded_vocab(logits, vocab_size)
    target = input_ids[:, 1:].to(logits.device)
    ent: Tensor | None = None
    if with_entropy:
        with torch.no_grad():
            ent = _vocab_parallel_entropy(logits.detach())
            ent = torch.nn.functional.pad(ent, (1, 0))
    # The megatron op works in place on its input; hand it a copy so `logits` stays usable for entropy.
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), target)
    logp = torch.nn.functional.pad(-nll, (1, 0))
    return logp, ent


def _vocab_parallel_entropy(logits: Tensor) -> Tensor:
    """Entropy over a vocabulary split across the TP group (logsumexp - E_p[z])."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    m = logits.max(dim=-1).values
    if tp > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z = logits - m.unsqueeze(-1)
    se = z.exp().sum(-1)
    if tp > 1:
        dist.all_reduce(se, group=group)
    lse = se.log()
    pz = ((z - lse.unsqueeze(-1)).exp() * z).sum(-1)
    if tp > 1:
        dist.all_reduce(pz, group=group)
    return lse - pz
