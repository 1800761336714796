"""Scoring completions off the event loop, with a timeout, without letting a bad reward function hurt the
worker: a call that raises or runs past the timeout scores 0 for that completion and is counted.

Async reward functions (e.g. the `orm` reward calling a reward-model server) are awaited on the event loop
instead, with the same timeout. Thread mode (default) suits the built-in rule functions (pure Python
regex/Decimal work, short). A timed-out call cannot be stopped in a thread, so the pool is replaced and the stuck thread left to finish on its own;
later groups never queue behind it. Process mode isolates functions that may hang or leak (math-verify on
adversarial input): there the old pool's processes are killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import logging
import math
import multiprocessing as mp
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from asyncgrpo.rewards import RewardInput, is_async, resolve_reward_fn
from asyncgrpo.rewards.steps import char_ends, split_steps

log = logging.getLogger(__name__)

ExecutorKind = Literal["thread", "process"]


@dataclass
class Score:
    reward: float
    details: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # "<fn>: <ExceptionType>: msg" or "timeout after Ns"
    # Process rewards: one reward per step and the character index where each step ends in the completion; None
    # when no function scored steps (or one failed: the completion then scores 0 as a whole).
    step_rewards: list[float] | None = None
    step_char_ends: list[int] | None = None


Value = float | list[float]  # an outcome reward, or one reward per step


def _value(spec: str, v: object, n_steps: int | None = None) -> Value:
    """A reward's return value: a float (numpy scalars and bools included), or a list of them, one per step; a
    string, None, a non-finite number or a list of the wrong length is that function's error."""
    is_sequence = isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) == 1  # a list, tuple or 1-D array
    if n_steps is not None and is_sequence:
        values = [_value(spec, x) for x in v]  # type: ignore[union-attr]
        if len(values) != n_steps:
            raise TypeError(f"returned {len(values)} step scores for {n_steps} steps (reward.step_separator splits "
                            "the completion); return one per step or a float")
        return values  # type: ignore[return-value]
    try:
        if isinstance(v, (str, bytes)) or is_sequence or v is None:
            raise TypeError
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"returned {v!r}, not a finite number or one per step") from None
    if not math.isfinite(f):
        raise TypeError(f"returned {v!r}, not a finite number")
    return f


def combine(fns: Sequence[str], weights: Sequence[float], values: Mapping[str, Value], n_steps: int
            ) -> tuple[float, dict[str, float], list[float] | None]:
    """The weighted reward, each function's scalar, and the weighted step rewards when any function scored steps.

    A step-scoring function's scalar is its lowest step score (a solution is as good as its worst step; 0 with no
    steps). Step rewards: the step functions' weighted scores summed per step, plus the outcome functions' weighted
    sum on the last step (an outcome is judged where the completion ends)."""
    details = {f: (min(v, default=0.0) if isinstance(v, list) else v) for f, v in values.items()}
    total = sum(w * details[f] for f, w in zip(fns, weights))
    if n_steps == 0 or not any(isinstance(values[f], list) for f in fns):
        return total, details, None  # no steps (e.g. a completion that decodes to no text): an outcome reward
    steps = [0.0] * n_steps
    outcome = 0.0
    for f, w in zip(fns, weights):
        v = values[f]
        if isinstance(v, list):
            steps = [a + w * b for a, b in zip(steps, v)]
        else:
            outcome += w * v
    steps[-1] += outcome
    return total, details, steps


@functools.lru_cache(maxsize=None)
def _resolved(spec: str):  # type: ignore[no-untyped-def]
    return resolve_reward_fn(spec)  # once per worker process (spawned workers import plug-ins by their path)


def score_sync(specs: Sequence[str], inp: RewardInput) -> dict[str, tuple[Value, str | None]]:
    """The sync reward functions on one completion; runs in the worker thread or process. One failing scores 0
    for itself and reports its error."""
    out: dict[str, tuple[Value, str | None]] = {}
    for spec in specs:
        try:
            out[spec] = (_value(spec, _resolved(spec)(inp), len(inp.steps)), None)
        except Exception as e:  # noqa: BLE001 - a reward function is user code: any failure scores 0
            out[spec] = (0.0, f"{spec}: {type(e).__name__}: {e}")
    return out


class RewardRunner:
    """Score completions: `await runner.score(prompt, texts, answer, metadata)` -> one Score per completion.

    Sync functions run concurrently in a pool, async ones on the event loop, each with timeout_s; the weighted
    sum is the reward. A function that raises, times out or returns no finite number scores the whole completion
    0, counted and logged with its name."""

    def __init__(self, fns: Sequence[str], weights: Sequence[float] | None = None, *, timeout_s: float = 10.0,
                 executor: ExecutorKind = "thread", max_workers: int = 4, step_separator: str = "\n") -> None:
        resolved = {f: resolve_reward_fn(f) for f in fns}  # unknown names and bad import paths fail here, at start-up
        if weights is not None and len(weights) != len(fns):
            raise ValueError(f"reward weights: {len(weights)} given for {len(fns)} functions")
        self.fns = list(fns)
        self.weights = list(weights) if weights is not None else [1.0] * len(fns)
        self.async_fns = {f: fn for f, fn in resolved.items() if is_async(fn)}
        self.sync_specs = [f for f in self.fns if f not in self.async_fns]
        self.timeout_s = timeout_s
        self.kind = executor
        self.max_workers = max_workers
        self.step_separator = step_separator
        self.errors = 0  # completions that scored 0 because of a crash or timeout
        self._pool = self._new_pool()
    @classmethod
    def from_config(cls, cfg: Any, fns: Sequence[str] | None = None, weights: Sequence[float] | None = None) -> "RewardRunner":
        """The runner of a RunConfig's reward section (`fns`: a subset, e.g. the evaluator's first function)."""
        from asyncgrpo.rewards import orm, prm

        r = cfg.reward
        orm.configure(r.orm.url, r.orm.api_key, r.orm.timeout_s)
        prm.configure(r.prm.url, r.prm.api_key, r.prm.timeout_s)
        return cls(r.fns if fns is None else fns, r.weights if fns is None else weights, timeout_s=r.timeout_s,
                   executor=cfg.rollout.reward_executor, max_workers=cfg.rollout.reward_workers,
                   step_separator=r.step_separator)

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

    async def score(self, prompt: str, completions: Sequence[str], answer: str,
                    metadata: Mapping[str, Any] | None = None) -> list[Score]:
        """One Score per completion. Sync calls queue for the pool's workers, so their deadline is timeout_s per
        round of max_workers calls; whatever is not done by then scores 0 as a timeout."""
        if not completions:
            return []
        meta = dict(metadata or {})
        inputs = [RewardInput(prompt, c, answer, meta, split_steps(c, self.step_separator)) for c in completions]
        loop = asyncio.get_running_loop()
        futs = [loop.run_in_executor(self._pool, score_sync, self.sync_specs, x) for x in inputs] if self.sync_specs else []
        tasks = [[asyncio.ensure_future(self._call_async(spec, fn, x)) for spec, fn in self.async_fns.items()]
                 for x in inputs]
        if futs:
            await asyncio.wait(futs, timeout=self.timeout_s * math.ceil(len(futs) / self.max_workers))
        async_results = [await asyncio.gather(*row) for row in tasks]  # each bounded by its own wait_for
        out: list[Score] = []
        recycle = False
        for i in range(len(inputs)):
            results: dict[str, tuple[Value, str | None]] = dict(zip(self.async_fns, async_results[i]))
            if futs:
                fut = futs[i]
                if not fut.done():
                    fut.cancel()  # a queued call never starts; a running thread cannot be stopped, see _recycle_pool
                    results.update({f: (0.0, f"{f}: timeout after {self.timeout_s}s") for f in self.sync_specs})
                    recycle = True
                elif fut.exception() is not None:  # e.g. a process pool broken by a crashed (segfaulted) worker
                    e = fut.exception()
                    results.update({f: (0.0, f"{f}: {type(e).__name__}: {e}") for f in self.sync_specs})
                    recycle = recycle or isinstance(e, cf.BrokenExecutor)
                else:
                    results.update(fut.result())
            errors = [results[f][1] for f in self.fns if results[f][1] is not None]
            steps = inputs[i].steps
            total, details, step_rewards = combine(self.fns, self.weights, {f: results[f][0] for f in self.fns}, len(steps))
            s = Score(total, details, "; ".join(errors) or None)  # type: ignore[arg-type]
            if s.error is None and step_rewards is not None:
                s.step_rewards, s.step_char_ends = step_rewards, char_ends(steps)
            if s.error is not None:
                s.reward = 0.0  # a crash anywhere in the weighted sum scores the whole completion 0
                self.errors += 1
                log.warning("reward error (scored 0): %s", s.error)
            out.append(s)
        if recycle:
            # the hung calls keep their workers busy: later groups get a fresh pool instead of waiting behind them
            self._recycle_pool()
        return out

    async def _call_async(self, spec: str, fn: Any, x: RewardInput) -> tuple[Value, str | None]:
        try:
            return _value(spec, await asyncio.wait_for(fn(x), self.timeout_s), len(x.steps)), None
        except asyncio.TimeoutError:
            return 0.0, f"{spec}: timeout after {self.timeout_s}s"
        except Exception as e:  # noqa: BLE001 - user code (or a reward server) failing scores 0, as a sync one
            return 0.0, f"{spec}: {type(e).__name__}: {e}"

    def close(self) -> None:
        old = self._pool
        if isinstance(old, cf.ProcessPoolExecutor):
            for p in list(getattr(old, "_processes", {}).values()):
                p.kill()
        old.shutdown(wait=False, cancel_futures=True)
