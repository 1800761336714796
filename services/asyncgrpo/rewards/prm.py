"""A process reward model (PRM) behind HTTP as a reward: the prompt and the completion's steps go to a reward
server's `/score_steps` (asyncgrpo reward-server with a token-classification model), which answers one score per
step, read at each step's last token. SGLang has no process-reward endpoint, so this shape is ours: see
docs/rewards.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from asyncgrpo.rewards.orm import OrmClient, OrmError


class PrmClient(OrmClient):
    """`await client.score_steps(prompt, steps)` -> one score per step (the model's probability that it is right)."""

    async def score_steps(self, prompt: str, steps: Sequence[str]) -> list[float]:
        if not steps:
            return []  # an empty completion has no steps to score
        body = await self._post("/score_steps", {"prompt": prompt, "steps": list(steps)})
        return _step_scores(body, len(steps), self.url)


def _step_scores(body: Any, n: int, url: str) -> list[float]:
    try:
        scores = [float(v) for v in body["step_scores"]]
    except (KeyError, TypeError, ValueError):
        raise OrmError(f"reward server {url}: /score_steps answered {str(body)[:200]!r}, not {{'step_scores': [...]}}") from None
    if len(scores) != n or not all(math.isfinite(v) for v in scores):
        raise OrmError(f"reward server {url}: {len(scores)} step scores {scores[:8]} for {n} steps")
    return scores


_default: PrmClient | None = None


def configure(url: str | None, api_key: str | None = None, timeout_s: float = 30.0) -> None:
    """Point the built-in `prm` reward at a server (reward.prm.*); api_key None: $ASYNCGRPO_REWARD_API_KEY."""
    global _default
    _default = PrmClient.configured(url, api_key, timeout_s)  # type: ignore[assignment]


def default_client() -> PrmClient:
    if _default is None:
        raise OrmError("the prm reward has no server: set reward.prm.url (an asyncgrpo reward-server serving a "
                       "token-classification model)")
    return _default
