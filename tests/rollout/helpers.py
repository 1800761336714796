"""Builders shared by the rollout tests."""

from __future__ import annotations

from asyncgrpo.queue import Completion, Group, PromptRef


def make_completion(n: int = 4, version: int = 0, reward: float = 1.0, split: int | None = None, v2: int = 1) -> Completion:
    spans = [(version, 0, n)] if split is None else [(version, 0, split), (v2, split, n)]
    return Completion(output_ids=list(range(n)), logprobs=[-0.5] * n, version_spans=spans, finish_reason="stop",
                      reward=reward, reward_details={"gsm8k": reward}, started_at=1.0, finished_at=2.0)


def make_group(run_id: str = "exp/t0", ref: PromptRef = PromptRef(0, 0, 0), g: int = 4, n: int = 4, **kw) -> Group:
    return Group(run_id=run_id, group_id=ref.group_id(), prompt_id=f"id{ref.position}", epoch=ref.epoch,
                 position=ref.position, attempt=ref.attempt, prompt_ids=[1, 2, 3],
                 completions=[make_completion(n, reward=float(i % 2), **kw) for i in range(g)], answer="42")
