"""An outcome reward model (ORM) behind HTTP as a reward: the prompt and completion are scored by a reward-model
server in SGLang's `/classify` shape (asyncgrpo reward-server, or `sglang.launch_server --is-embedding`), and the
first logit is the reward. It combines with rule rewards by reward.weights like any reward function."""

from __future__ import annotations

import math
from typing import Any

import httpx

ENV_REWARD_API_KEY = "ASYNCGRPO_REWARD_API_KEY"


class OrmError(RuntimeError):
    """The reward server did not give a score: the message says which server and why."""


class OrmClient:
    """`await client.score(text)` -> the model's score; one pooled HTTP client per event loop (connections reused).

    Each completion is its own request: the server batches requests that arrive together, so G completions
    scored concurrently share forward passes without this side waiting to fill a batch."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self._clients: dict[int, httpx.AsyncClient] = {}

    def _client(self) -> httpx.AsyncClient:
        import asyncio

        loop = id(asyncio.get_running_loop())
        c = self._clients.get(loop)
        if c is None or c.is_closed:
            c = self._clients[loop] = httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers)
        return c

    @classmethod
    def configured(cls, url: str | None, api_key: str | None, timeout_s: float) -> "OrmClient | None":
        """The client of reward.orm / reward.prm settings: None without a URL; api_key None reads
        $ASYNCGRPO_REWARD_API_KEY (an empty one means no key)."""
        import os

        key = api_key if api_key is not None else os.environ.get(ENV_REWARD_API_KEY)
        return cls(url, key or None, timeout_s) if url else None

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            r = await self._client().post(f"{self.url}{path}", json=body)
        except httpx.HTTPError as e:
            raise OrmError(f"reward server {self.url}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise OrmError(f"reward server {self.url}{path} answered {r.status_code}: {r.text[:200]}")
        return r.json()

    async def score(self, text: str) -> float:
        return _first_score(await self._post("/classify", {"text": text}), self.url)

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()


def _first_score(body: Any, url: str) -> float:
    try:
        value = float(body["embedding"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        raise OrmError(f"reward server {url}: /classify answered {str(body)[:200]!r}, not {{'embedding': [score, ...]}}") from None
    if not math.isfinite(value):
        raise OrmError(f"reward server {url}: score {value} is not finite")
    return value


_default: OrmClient | None = None


def configure(url: str | None, api_key: str | None = None, timeout_s: float = 30.0) -> None:
    """Point the built-in `orm` reward at a server (reward.orm.*); api_key None: $ASYNCGRPO_REWARD_API_KEY."""
    global _default
    _default = OrmClient.configured(url, api_key, timeout_s)


def default_client() -> OrmClient:
    if _default is None:
        raise OrmError("the orm reward has no server: set reward.orm.url (an asyncgrpo reward-server or SGLang "
                       "--is-embedding server)")
    return _default
