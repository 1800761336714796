"""GRPO math as pure tensor functions: advantages, KL, policy loss, aggregation, reward shaping, filters, stats.

No I/O and no config objects: the trainer reads ``RunConfig.actor`` and passes plain arguments.
"""

from asyncgrpo.core.advantages import (
    ESTIMATORS,
    NORM_LEVELS,
    compute_advantages,
    dr_grpo_advantages,
    group_advantages,
    rloo_advantages,
)
from asyncgrpo.core.aggregation import LOSS_AGG_MODES, aggregate_loss, count_seqs, count_tokens
from asyncgrpo.core.filters import zero_variance_mask
from asyncgrpo.core.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, kl_penalty
from asyncgrpo.core.policy_loss import (
    BEHAV_WEIGHT_MODES,
    behaviour_weight,
    decoupled_ppo_loss,
    grpo_loss,
    ppo_clip_loss,
)
from asyncgrpo.core.reward_shaping import overlong_penalty
from asyncgrpo.core.stats import loss_stats, masked_mean, masked_std, masked_sum

__all__ = [
    "BEHAV_WEIGHT_MODES",
    "ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "NORM_LEVELS",
    "aggregate_loss",
    "behaviour_weight",
    "compute_advantages",
    "count_seqs",
    "count_tokens",
    "decoupled_ppo_loss",
    "dr_grpo_advantages",
    "group_advantages",
    "grpo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "loss_stats",
    "masked_mean",
    "masked_std",
    "masked_sum",
    "overlong_penalty",
    "ppo_clip_loss",
    "rloo_advantages",
    "zero_variance_mask",
]
