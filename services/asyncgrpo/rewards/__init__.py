"""Reward functions: one interface for the built-ins and for user plug-ins.

A reward function takes one :class:`RewardInput` (the prompt, the completion, the reference answer and the
dataset record's other fields, and the completion split into steps by ``reward.step_separator``) and returns a
float, or one float per step (a process reward), or an awaitable of either (an ``async def``, for rewards that call
a service, e.g. the ``orm`` and ``prm`` reward models). ``reward.fns`` names built-ins (:data:`REWARD_FNS`) or
plug-ins by import path, ``package.module:function``. Sync functions run in the rollout's reward pool (thread or
process) with a timeout; async ones are awaited on its event loop with the same timeout.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncgrpo.rewards.boxed import boxed_reward
from asyncgrpo.rewards.extract import exact_reward, gsm8k_reward


@dataclass(frozen=True)
class RewardInput:
    """What a reward function sees of one completion."""

    prompt: str  # the prompt text as sent to the generation server (template applied)
    completion: str  # the decoded completion
    answer: str  # the record's reference answer (train_dataset.answer_key)
    metadata: Mapping[str, Any] = field(default_factory=dict)  # the record's other fields (a plain dict: it is pickled)
    steps: tuple[str, ...] = ()  # the completion split by reward.step_separator: a process reward scores each


RewardFn = Callable[[RewardInput], "float | Sequence[float] | Awaitable[float | Sequence[float]]"]


def _exact(x: RewardInput) -> float:
    return exact_reward(x.completion, x.answer)


def _gsm8k(x: RewardInput) -> float:
    return gsm8k_reward(x.completion, x.answer)


def _boxed(x: RewardInput) -> float:
    return boxed_reward(x.completion, x.answer)


async def _orm(x: RewardInput) -> float:
    from asyncgrpo.rewards.orm import default_client

    return await default_client().score(x.prompt + x.completion)


async def _prm(x: RewardInput) -> list[float]:
    from asyncgrpo.rewards.prm import default_client

    return await default_client().score_steps(x.prompt, x.steps)


# the built-ins by name: rule rewards on the answer; `orm`, an outcome reward model behind reward.orm.url; `prm`, a
# process reward model behind reward.prm.url (one score per step)
REWARD_FNS: dict[str, RewardFn] = {"exact": _exact, "gsm8k": _gsm8k, "boxed": _boxed, "orm": _orm, "prm": _prm}


def is_async(fn: RewardFn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def check_reward_spec(spec: str) -> None:
    """The form of a reward.fns entry, without importing anything: a built-in name or package.module:function.
    (Loading a config must not import user code: a trainer node need not have the rollout's reward modules.)"""
    if ":" not in spec:
        if spec not in REWARD_FNS:
            raise ValueError(f"reward.fns: {spec!r} is not a built-in reward function ({', '.join(sorted(REWARD_FNS))}); "
                             "for your own function give its import path, package.module:function")
        return
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in (*module_name.split("."), *attr.split("."))):
        raise ValueError(f"reward.fns: {spec!r} is not an import path; write package.module:function")


def resolve_reward_fn(spec: str) -> RewardFn:
    """A built-in by name, or `package.module:function` imported; errors say what is wrong with reward.fns."""
    check_reward_spec(spec)
    if ":" not in spec:
        return REWARD_FNS[spec]
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - a user module may fail to import in any way; say which and why
        raise ValueError(f"reward.fns: {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                         "check the name and that it is on PYTHONPATH") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward.fns: {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward.fns: {spec!r} is a {type(fn).__name__}, not a function taking a RewardInput")
    return fn  # type: ignore[return-value]


def get_reward_fn(name: str) -> RewardFn:
    return resolve_reward_fn(name)


__all__ = ["REWARD_FNS", "RewardFn", "RewardInput", "boxed_reward", "check_reward_spec", "exact_reward", "get_reward_fn",
           "gsm8k_reward", "is_async", "resolve_reward_fn"]
