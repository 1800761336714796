"""GRPO math as pure tensor functions: advantages, importance weights, policy losses, KL, aggregation, reward
shaping, stats.

No I/O and no config objects: the trainer builds the frozen parameter objects (AdvNorm, LossParams) from
``RunConfig.actor`` once. Estimators and losses are registered by name (ADV_ESTIMATORS, POLICY_LOSSES); the config
takes its allowed values from the registries.
"""

from asyncgrpo.core.advantages import (
    ADV_ESTIMATORS,
    NORM_LEVELS,
    AdvNorm,
    dr_grpo_advantages,
    group_advantages,
    rloo_advantages,
    whiten,
)
from asyncgrpo.core.aggregation import LOSS_AGG_MODES, aggregate_loss, count_seqs, count_tokens
from asyncgrpo.core.importance import BEHAV_WEIGHT_LEVELS, BEHAV_WEIGHT_MODES, behaviour_weight
from asyncgrpo.core.kl import KL_ESTIMATORS, kl_in_reward, kl_k1, kl_k2, kl_k3, kl_penalty
from asyncgrpo.core.policy_loss import (
    POLICY_LOSSES,
    LossParams,
    broadcast_advantages,
    effective_mask,
    gspo_loss,
    policy_objective,
    ppo_clip_loss,
)
from asyncgrpo.core.process_advantages import Steps, process_group_advantages, token_advantages
from asyncgrpo.core.registry import Registry
from asyncgrpo.core.reward_shaping import overlong_penalty
from asyncgrpo.core.stats import Stat, finish_stats, loss_stats, masked_mean, masked_std, masked_sum, stat_sums

__all__ = [
    "ADV_ESTIMATORS",
    "BEHAV_WEIGHT_LEVELS",
    "BEHAV_WEIGHT_MODES",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "NORM_LEVELS",
    "POLICY_LOSSES",
    "AdvNorm",
    "LossParams",
    "Registry",
    "Stat",
    "Steps",
    "aggregate_loss",
    "behaviour_weight",
    "broadcast_advantages",
    "count_seqs",
    "count_tokens",
    "dr_grpo_advantages",
    "effective_mask",
    "finish_stats",
    "group_advantages",
    "gspo_loss",
    "kl_in_reward",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "loss_stats",
    "masked_mean",
    "masked_std",
    "masked_sum",
    "overlong_penalty",
    "policy_objective",
    "ppo_clip_loss",
    "process_group_advantages",
    "rloo_advantages",
    "stat_sums",
    "token_advantages",
    "whiten",
]
