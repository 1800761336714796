"""Scoring completions off the event loop, with a timeout, without letting a bad reward function hurt the
worker: a call that raises or runs past the timeout scores 0 for that completion and is counted.

Thread mode (default) suits the registry's functions (pure Python regex/Decimal work, short). A timed-out
call cannot be stopped in a thread, so the pool is replaced and the stuck thread left to finish on its own;
later groups never queue behind it. Process mode isolates functions that may hang or leak (math-verify on
adversarial input): there the old pool's processes are killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import math
import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from asyncgrpo.rewards import get_reward_fn

log = logging.getLogger(__name__)

ExecutorKind = Literal["thread", "process"]


@dataclass
class Score:
    reward: float
    details: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # "<fn>: <ExceptionType>: msg" or "timeout after Ns"


def score_one(fn_names: Sequence[str], weights: Sequence[float], completion: str, answer: str) -> Score:
    """Weighted sum of the named reward functions. Runs in the worker thread or process. One function
    failing scores 0 for itself only; its error is reported."""
    details: dict[str, float] = {}
    errors: list[str] = []
    total = 0.0
    for name, w in zip(fn_names, weights, strict=True):
        try:
            value = float(get_reward_fn(name)(completion, answer))
        except Exception as e:  # a reward function is user code: any failure scores 0
            value = 0.0
            errors.append(f"{name}: {type(e).__name__}: {e}")
        details[name] = value
        total += w * value
    return Score(total, details, "; ".join(errors) or None)


class RewardRunner:
    """Score completions concurrently in a pool; `await runner.score(texts, answer)` -> list[Score]."""

    def __init__(self, fns: Sequence[str], weights: Sequence[float] | None = None, *, timeout_s: float = 10.0,
                 executor: ExecutorKind = "thread", max_workers: int = 4) -> None:
        for f in fns:
            get_reward_fn(f)  # unknown names fail here, at start-up
        if weights is not None and len(weights) != len(fns):
            raise ValueError(f"reward weights: {len(weights)} given for {len(fns)} functions")
        self.fns = list(fns)
        self.weights = list(weights) if weights is not None else [1.0] * len(fns)
        self.timeout_s = timeout_s
        self.kind = executor
        self.max_workers = max_workers
        self.errors = 0  # completions that scored 0 because of a crash or timeout
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.Executor:
        if self.kind == "thread":
            return cf.ThreadPoolExecutor(self.max_workers, thread_name_prefix="reward")
        if self.kind == "process":
            # spawn: forking a process that holds an event loop and sockets is unsafe
            return cf.ProcessPoolExecutor(self.max_workers, mp_context=mp.get_context("spawn"))
        raise ValueError(f"reward executor {self.kind!r}: choose thread or process")

    def _recycle_pool(self) -> None:
        old, self._pool = self._pool, self._new_pool()
        if isinstance(old, cf.ProcessPoolExecutor):
            for p in list(getattr(old, "_processes", {}).values()):  # the hung call holds one of these
                p.kill()
        old.shutdown(wait=False, cancel_futures=True)  # a hung thread finishes (or not) on its own

    async def score(self, completions: Sequence[str], answer: str) -> list[Score]:
        """One Score per completion. Calls queue for the pool's workers, so the deadline of the batch is
        timeout_s per round of max_workers calls; whatever is not done by then scores 0 as a timeout."""
        loop = asyncio.get_running_loop()
        futs = [loop.run_in_executor(self._pool, score_one, self.fns, self.weights, c, answer) for c in completions]
        if not futs:
            return []
        rounds = math.ceil(len(futs) / self.max_workers)
        await asyncio.wait(futs, timeout=self.timeout_s * rounds)
        out: list[Score] = []
        recycle = False
        for fut in futs:
            if not fut.done():
                fut.cancel()  # a queued call never starts; a running thread cannot be stopped, see _recycle_pool
                s = Score(0.0, {n: 0.0 for n in self.fns}, f"timeout after {self.timeout_s}s")
                recycle = True
            elif fut.exception() is not None:  # e.g. a process pool broken by a crashed (segfaulted) worker
                e = fut.exception()
                s = Score(0.0, {n: 0.0 for n in self.fns}, f"{type(e).__name__}: {e}")
                recycle = recycle or isinstance(e, cf.BrokenExecutor)
            else:
                s = fut.result()
            if s.error is not None:
                s.reward = 0.0  # a crash anywhere in the weighted sum scores the whole completion 0
                self.errors += 1
                log.warning("reward error (scored 0): %s", s.error)
            out.append(s)
        if recycle:
            # the hung calls keep their workers busy: later groups get a fresh pool instead of waiting behind them
            self._recycle_pool()
        return out

    def close(self) -> None:
        old = self._pool
        if isinstance(old, cf.ProcessPoolExecutor):
            for p in list(getattr(old, "_processes", {}).values()):
                p.kill()
        old.shutdown(wait=False, cancel_futures=True)
