"""Held-out evaluation of the policy a generation server holds now, during a run.

The served weights are the policy being trained (weight sync puts each version there), so evaluating
through the server costs no extra copy of the model and measures exactly what the rollout samples from.
Sampled accuracy draws `samples` completions per prompt at the run's temperature with a fixed seed per
prompt and sample (top-k / top-p off, the distribution tiny.evaluate uses); greedy accuracy is one
temperature-0 completion per prompt.

Intervals: completions of one prompt are correlated (an easy prompt is right in all of them), so the
sampled accuracy's 95% half-width comes from the spread of per-prompt means over prompts, not from the
binomial over all completions, which would understate it by up to sqrt(samples).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from asyncgrpo.queue.schema import version_number

Z95 = 1.959964


@dataclass(frozen=True)
class HeldOutResult:
    version: int  # the weight version most completions were generated at
    versions: tuple[int, int]  # lowest and highest weight version seen (an update may land mid-evaluation)
    time: float
    prompts: int
    samples: int  # sampled completions per prompt
    reward: float  # mean reward of the sampled completions
    reward_ci95: float  # half-width, over prompts (see the module docstring)
    greedy_reward: float | None
    greedy_ci95: float | None
    seconds: float

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["versions"] = list(self.versions)
        return d


def mean_ci95(per_prompt: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-width of per-prompt scores (normal approximation; 0 width for fewer than 2)."""
    n = len(per_prompt)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(per_prompt) / n
    if n < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in per_prompt) / (n - 1)
    return m, Z95 * math.sqrt(var / n)


async def _complete(client: Any, ids: list[int], params: dict[str, Any], n: int, attempts: int = 4) -> list[Any]:
    """n completions of one prompt. A weight update aborts requests in flight (the server pauses for it):
    such a request is simply asked again."""
    for _ in range(attempts):
        results = await client.generate_n(ids, params, n, return_logprob=False)
        if len(results) == n and not any(r.aborted for r in results):
            return results
    raise RuntimeError(f"a held-out request was aborted {attempts} times (weight updates in a row); try again later")


async def evaluate_served(client: Any, prompts: Sequence[list[int]], answers: Sequence[str],
                          score: Callable[[list[int], list[list[int]], str], Awaitable[list[float]]], *, temperature: float, samples: int,
                          max_new_tokens: int, seed: int = 0, greedy: bool = True, concurrency: int = 16) -> HeldOutResult:
    """Accuracy of the server's current policy on held-out prompts (token ids) with reference answers.
    `await score(prompt ids, [completion ids, ...], answer)` gives the task's reward of each completion (the rollout's
    RewardRunner: a pool with a timeout, a failing function scoring 0)."""
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"need as many answers as prompts and at least one prompt (got {len(prompts)} and {len(answers)})")
    sem = asyncio.Semaphore(concurrency)
    versions: Counter[int] = Counter()
    t0 = time.perf_counter()

    async def one(i: int, ids: list[int], answer: str) -> tuple[float, float | None]:
        async with sem:
            # one seed per prompt: the same prompts draw the same random numbers at every evaluation
            params = {"temperature": temperature, "top_p": 1.0, "top_k": -1, "max_new_tokens": max_new_tokens,
                      "sampling_seed": seed * 1_000_003 + i * samples}
            sampled = await _complete(client, ids, params, samples)
            g = None
            if greedy:
                g = (await _complete(client, ids, {"temperature": 0.0, "max_new_tokens": max_new_tokens}, 1))[0]
        for r in [*sampled, *([g] if g is not None else [])]:
            with contextlib.suppress(ValueError):  # a server reporting no integer version: not counted
                versions[version_number(r.weight_version)] += 1
        scores = await score(ids, [r.output_ids for r in [*sampled, *([g] if g is not None else [])]], answer)
        return sum(scores[:samples]) / samples, (scores[samples] if g is not None else None)

    # a failure cancels the other prompts' requests: a failed evaluation stops generating at once
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(i, list(p), a)) for i, (p, a) in enumerate(zip(prompts, answers))]
    except ExceptionGroup as eg:  # the first real error, not "unhandled errors in a TaskGroup"
        raise eg.exceptions[0] from eg
    res = [t.result() for t in tasks]
    reward, reward_ci = mean_ci95([s for s, _ in res])
    greedy_reward = greedy_ci = None
    if greedy:
        greedy_reward, greedy_ci = mean_ci95([float(g) for _, g in res if g is not None])
    version = versions.most_common(1)[0][0] if versions else -1
    span = (min(versions), max(versions)) if versions else (-1, -1)
    return HeldOutResult(version=version, versions=span, time=time.time(), prompts=len(prompts), samples=samples,
                         reward=reward, reward_ci95=reward_ci, greedy_reward=greedy_reward, greedy_ci95=greedy_ci,
                         seconds=time.perf_counter() - t0)
