"""Named algorithm presets: `preset: dapo` in a config (or --preset=dapo) fills these keys beneath the user's own,
so any key given explicitly still wins. Each preset is the recipe of docs/algorithms.md, by the names its paper
and the anchors use."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath's GRPO, this project's defaults spelled out (the seed's algorithm)
    "grpo": {"actor": {"adv_estimator": "grpo", "policy_loss": "ppo", "loss_agg_mode": "seq-mean-token-mean"}},
    # DAPO: clip-higher, token-level loss, overlong shaping, dynamic sampling
    "dapo": {"actor": {"eps_clip": 0.2, "eps_clip_higher": 0.28, "loss_agg_mode": "token-mean",
                       "overlong_penalty": {"enabled": True}},
             "rollout": {"dynamic_filtering": True}},
    # Dr.GRPO: no std division, no length normalisation per sequence
    "dr_grpo": {"actor": {"adv_estimator": "dr_grpo", "loss_agg_mode": "seq-mean-token-sum-norm"}},
    "rloo": {"actor": {"adv_estimator": "rloo"}},
    # REINFORCE++: batch-whitened rewards, the KL (k1) in the reward
    "reinforce_plus_plus": {"actor": {"adv_estimator": "reinforce_plus_plus", "kl_ctl": 0.001, "kl_estimator": "k1",
                                      "use_kl_in_reward": True}},
    # GSPO: the sequence-level ratio with its own small clip range
    "gspo": {"actor": {"policy_loss": "gspo", "eps_clip": 3.0e-4, "eps_clip_higher": 4.0e-4,
                       "behav_imp_weight_level": "geometric"}},
    # GRPO with process supervision: give reward.fns a step reward (e.g. prm) and reward.step_separator
    "grpo_process": {"actor": {"adv_estimator": "grpo_process", "policy_loss": "ppo"}},
}


def preset_values(name: Any) -> dict[str, Any]:
    """The keys of a preset; an unknown name is an error listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"preset: {name!r} is not a preset; choose one of {sorted(PRESETS)} (docs/algorithms.md)")
    import copy

    return copy.deepcopy(PRESETS[name])
