"""Reward plug-ins for the tests, named in reward.fns by import path (tests/ is on the path, also of spawned
pool processes: multiprocessing passes sys.path on)."""

from __future__ import annotations

import asyncio
import os
import threading

from asyncgrpo.rewards import RewardInput

RELEASE = threading.Event()  # hang() waits on it
SEEN: list[RewardInput] = []  # what seen() was given (thread pool / event loop: the same process)


def length_bonus(x: RewardInput) -> float:
    """0.1 per character of the completion: a reward no built-in gives, easy to check from the queue."""
    return 0.1 * len(x.completion)


def seen(x: RewardInput) -> float:
    SEEN.append(x)
    return float(x.metadata.get("difficulty", 0))


async def async_echo(x: RewardInput) -> float:
    await asyncio.sleep(0.01)
    return float(len(x.prompt))


async def async_slow(x: RewardInput) -> float:
    await asyncio.sleep(30)
    return 1.0


def crash_on_word(x: RewardInput) -> float:
    if "crash" in x.completion:
        raise RuntimeError("bad input")
    return 1.0


def hang(x: RewardInput) -> float:
    if x.completion == "hang":
        RELEASE.wait(10)
    return 1.0


def returns_text(x: RewardInput) -> float:
    return "1.0"  # type: ignore[return-value]


def returns_nan(x: RewardInput) -> float:
    return float("nan")


def pid(x: RewardInput) -> float:
    return float(os.getpid())


NOT_CALLABLE = 3


def numpy_scalar(x: RewardInput) -> float:
    import numpy as np

    return np.float32(0.5)  # type: ignore[return-value]


def a_bool(x: RewardInput) -> float:
    return x.completion == x.answer  # type: ignore[return-value]


def step_digits(x: RewardInput) -> list[float]:
    """A process reward: each step scores 1 when it holds a digit, else 0."""
    return [float(any(ch.isdigit() for ch in s)) for s in x.steps]


async def async_step_lengths(x: RewardInput) -> list[float]:
    await asyncio.sleep(0)
    return [float(len(s)) for s in x.steps]


def step_count_wrong(x: RewardInput) -> list[float]:
    return [1.0] * (len(x.steps) + 1)
