"""Verifiable reward functions: (completion text, reference answer) -> float in [0, 1].

Each is a plain function with no I/O so the rollout service can run it off its event loop with a timeout.
`REWARD_FNS` is the registry that config names (reward.fns) refer to.
"""

from __future__ import annotations

from collections.abc import Callable

from asyncgrpo.rewards.boxed import boxed_reward
from asyncgrpo.rewards.extract import exact_reward, gsm8k_reward

RewardFn = Callable[[str, str], float]

REWARD_FNS: dict[str, RewardFn] = {
    "exact": exact_reward,
    "gsm8k": gsm8k_reward,
    "boxed": boxed_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    try:
        return REWARD_FNS[name]
    except KeyError:
        raise ValueError(f"unknown reward function {name!r}; choose from {sorted(REWARD_FNS)}") from None


__all__ = ["REWARD_FNS", "RewardFn", "boxed_reward", "exact_reward", "get_reward_fn", "gsm8k_reward"]
