"""One completion through the SGLang client, across weight updates (partial rollouts).

When a weight update pauses a server in abort mode, the in-flight request returns with finish_reason
"abort" and the tokens generated so far. The completion then continues: the prompt plus those tokens go
back as the new input with the remaining token budget, and the per-token versions and behaviour log-probs
of both pieces are concatenated, so a completion that crossed an update carries two versions.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from asyncgrpo.queue.schema import version_number


class GenerateClient(Protocol):
    """The part of asyncgrpo.sglang.client.SGLangClient this module uses."""

    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any], rid: str | None = None,
                       return_logprob: bool = True) -> Any: ...

    async def generate_n(self, input_ids: list[int], sampling_params: dict[str, Any], n: int,
                         rid: str | None = None, return_logprob: bool = True) -> list[Any]: ...


class PartialRolloutError(RuntimeError):
    """A completion was aborted more times than rollout.max_resubmits allows."""


@dataclass
class Sample:
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)  # the trainer's integers, parsed here once
    finish_reason: str = ""
    resumes: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0


def _logprob(x: Any) -> float:
    # SGLang's raw meta_info holds [logprob, token_id, text] triples; the client flattens them to floats
    return float(x[0] if isinstance(x, (list, tuple)) else x)


def _extend(s: Sample, res: Any, rid: str, max_new_tokens: int, max_resubmits: int) -> bool:
    """Append one server answer to the completion; True when it must be resubmitted (aborted with budget left)."""
    n = len(res.output_ids)
    if len(res.output_logprobs) != n or len(res.token_versions) != n:
        raise PartialRolloutError(
            f"request {rid}: server returned {n} tokens, {len(res.output_logprobs)} logprobs and "
            f"{len(res.token_versions)} versions; the generation server must return one of each per token"
        )
    s.output_ids += list(res.output_ids)
    s.logprobs += [_logprob(x) for x in res.output_logprobs]
    try:  # the one place a server's version strings become the trainer's integers
        s.token_versions += [version_number(v) for v in res.token_versions]
    except ValueError as e:
        raise PartialRolloutError(f"request {rid}: {e}") from None
    reason = str((res.finish_reason or {}).get("type", "")) if isinstance(res.finish_reason, dict) else str(res.finish_reason)
    if reason != "abort":
        s.finish_reason = reason or "stop"
        return False
    if len(s.output_ids) >= max_new_tokens:
        s.finish_reason = "length"
        return False
    if s.resumes >= max_resubmits:
        raise PartialRolloutError(
            f"request {rid}: aborted {s.resumes + 1} times (rollout.max_resubmits = {max_resubmits}); "
            "raise it if weight updates are frequent"
        )
    s.resumes += 1
    return True


async def _continue(client: GenerateClient, prompt_ids: list[int], sampling_params: dict[str, Any], s: Sample, *,
                    max_new_tokens: int, rid: str, max_resubmits: int) -> Sample:
    """Resubmit a completion (prompt + its tokens so far, the remaining budget) until it is not aborted."""
    while True:
        params = {**sampling_params, "max_new_tokens": max_new_tokens - len(s.output_ids)}
        sub = f"{rid}.{s.resumes}"
        res = await client.generate(prompt_ids + s.output_ids, params, rid=sub, return_logprob=True)
        if not _extend(s, res, sub, max_new_tokens, max_resubmits):
            s.finished_at = time.time()
            return s


async def sample_completion(client: GenerateClient, prompt_ids: list[int], sampling_params: dict[str, Any], *,
                            max_new_tokens: int, rid: str, max_resubmits: int) -> Sample:
    """One completion, resubmitted across weight updates. Requests are `{rid}.{resumes}`."""
    return await _continue(client, prompt_ids, sampling_params, Sample(started_at=time.time()),
                           max_new_tokens=max_new_tokens, rid=rid, max_resubmits=max_resubmits)


async def sample_group(client: GenerateClient, prompt_ids: list[int], sampling_params: dict[str, Any], n: int, *,
                       max_new_tokens: int, rid: str, max_resubmits: int) -> list[Sample]:
    """n completions of one prompt: one request with SGLang's parallel sampling (sampling_params.n, one
    prefill of the prompt, one HTTP round trip instead of n), then each completion a weight update aborted
    resubmitted on its own. Requests: `{rid}.0` (the server names its sequences `{rid}.0_{j}`), then
    `{rid}:{j}.{resumes}`."""
    started = time.time()
    params = {**sampling_params, "max_new_tokens": max_new_tokens}
    results = await client.generate_n(prompt_ids, params, n, rid=f"{rid}.0", return_logprob=True)
    if len(results) != n:
        raise PartialRolloutError(f"request {rid}.0: asked for n={n} completions, the server returned {len(results)}")
    samples, resubmit = [], []
    for j, res in enumerate(results):
        s = Sample(started_at=started)
        if _extend(s, res, f"{rid}.0_{j}", max_new_tokens, max_resubmits):
            resubmit.append(_continue(client, prompt_ids, sampling_params, s, max_new_tokens=max_new_tokens,
                                      rid=f"{rid}:{j}", max_resubmits=max_resubmits))
        else:
            s.finished_at = time.time()
        samples.append(s)
    if resubmit:
        async with asyncio.TaskGroup() as tg:  # one failure cancels the siblings (an ExceptionGroup)
            for coro in resubmit:
                tg.create_task(coro)  # each continues its own Sample in place
    return samples
