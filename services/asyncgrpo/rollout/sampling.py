"""One completion through the SGLang client, across weight updates (partial rollouts).

When a weight update pauses a server in abort mode, the in-flight request returns with finish_reason
"abort" and the tokens generated so far. The completion then continues: the prompt plus those tokens go
back as the new input with the remaining token budget, and the per-token versions and behaviour log-probs
of both pieces are concatenated, so a completion that crossed an update carries two versions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from asyncgrpo.queue.schema import version_number


class GenerateClient(Protocol):
    """The part of asyncgrpo.sglang.client.SGLangClient this module uses."""

    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any], rid: str | None = None,
                       return_logprob: bool = True) -> Any: ...


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


async def sample_completion(client: GenerateClient, prompt_ids: list[int], sampling_params: dict[str, Any], *,
                            max_new_tokens: int, rid: str, max_resubmits: int) -> Sample:
    s = Sample(started_at=time.time())
    while True:
        remaining = max_new_tokens - len(s.output_ids)
        params = {**sampling_params, "max_new_tokens": remaining}
        res = await client.generate(prompt_ids + s.output_ids, params, rid=f"{rid}.{s.resumes}", return_logprob=True)
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
            break
        if len(s.output_ids) >= max_new_tokens:
            s.finish_reason = "length"
            break
        if s.resumes >= max_resubmits:
            raise PartialRolloutError(
                f"request {rid}: aborted {s.resumes + 1} times (rollout.max_resubmits = {max_resubmits}); "
                "raise it if weight updates are frequent"
            )
        s.resumes += 1
    s.finished_at = time.time()
    return s
