"""Async client for the SGLang HTTP API subset the project uses (works against SGLang and genserver).

Retry policy (why: a retried /generate or weight update may run twice on the server):
- Every call has a connect timeout (`connect_timeout_s`) and a total timeout (`timeout_s`), so a dead or
  stuck server raises, it never hangs. Waiting for a free connection (more than `max_connections` calls at
  once) counts against the total only.
- Calls that change server state (generate, abort, pause, weight updates, ...) are retried only when the
  request provably never reached the server: connection refused / connect timeout. A read timeout or a
  dropped connection after sending raises `SGLangError` at once.
- Read-only calls (health, loads, model_info, server_info, get_weights_by_name) are also retried after
  read errors and 5xx answers.
- Up to `retries` retries with exponential backoff (`backoff_s`, 2x, ...); when they run out a
  connection problem raises `SGLangUnavailable`, anything else `SGLangError`.

Keys (SGLang's --api-key / --admin-api-key, utils/auth.py): ordinary calls send `Authorization: Bearer
<api_key>`, admin-level calls (weights, groups, pause/continue, abort, flush_cache, get_weights_by_name)
send `Bearer <admin_api_key or api_key>`, so one client works against a server with either key or both.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

log = logging.getLogger(__name__)

# The request provably never reached the server: no connection was made (refused, unresolvable, or the socket
# did not connect within connect_timeout_s).
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


class SGLangError(RuntimeError):
    """A call to a generation server failed; the message names the server, the endpoint and the cause."""

    def __init__(self, url: str, endpoint: str, cause: str, status: int | None = None) -> None:
        super().__init__(f"SGLang server {url}: {endpoint} failed: {cause}")
        self.url, self.endpoint, self.cause, self.status = url, endpoint, cause, status


class SGLangUnavailable(SGLangError):
    """The server could not be reached (connection refused / timed out) after all retries."""


@dataclass
class GenerateResult:
    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: dict[str, Any]
    weight_version: str
    token_versions: list[str]
    prompt_tokens: int
    rid: str
    meta_info: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def aborted(self) -> bool:
        return isinstance(self.finish_reason, dict) and self.finish_reason.get("type") == "abort"


def expand_token_versions(meta: dict[str, Any], n_tokens: int) -> list[str]:
    """One version per output token: from meta_info.weight_versions spans ({version, start, end},
    end exclusive) when the version changed mid-request, else the single weight_version."""
    spans = meta.get("weight_versions")
    default = str(meta.get("weight_version", "default"))
    if not spans:
        return [default] * n_tokens
    out = [default] * n_tokens
    for s in spans:
        for i in range(max(0, int(s["start"])), min(n_tokens, int(s["end"]))):
            out[i] = str(s["version"])
    return out


def parse_generate_response(obj: dict[str, Any]) -> GenerateResult:
    """Turn one SGLang /generate response object into a GenerateResult (pure)."""
    meta = obj.get("meta_info") or {}
    output_ids = [int(t) for t in obj.get("output_ids") or []]
    lps = [float(x[0]) if isinstance(x, (list, tuple)) else float(x) for x in meta.get("output_token_logprobs") or []]
    fr = meta.get("finish_reason")
    if not isinstance(fr, dict):
        fr = {"type": str(fr) if fr is not None else "unknown"}
    return GenerateResult(
        output_ids=output_ids,
        output_logprobs=lps,
        finish_reason=fr,
        weight_version=str(meta.get("weight_version", "default")),
        token_versions=expand_token_versions(meta, len(output_ids)),
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        rid=str(meta.get("id", "")),
        meta_info=meta,
        text=str(obj.get("text", "") or ""),
    )


def _text(content: bytes, limit: int) -> str:
    return content[:limit].decode(errors="replace")


def _dtype_name(d: Any) -> str:
    return str(d).removeprefix("torch.")


class SGLangClient:
    """One generation server. Use as `async with SGLangClient(url) as c: ...`."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, connect_timeout_s: float = 5.0, retries: int = 3,
                 backoff_s: float = 0.5, api_key: str | None = None, admin_api_key: str | None = None,
                 max_connections: int = 1024) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.max_connections = max_connections  # more requests at once wait for a free connection, within timeout_s
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        admin = admin_api_key or api_key
        self._admin_auth = {"Authorization": f"Bearer {admin}"} if admin else {}
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the keys
        return f"SGLangClient({self.base_url!r})"

    async def __aenter__(self) -> "SGLangClient":
        self._client()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _timeout(self, total_s: float) -> aiohttp.ClientTimeout:
        # sock_connect, not connect: aiohttp's `connect` also bounds the wait for a free pool slot, which a burst of
        # resubmitted samples may need. Kept under the total, whose expiry aiohttp does not report as a connect
        # failure, so a server that never accepts is always "not sent".
        return aiohttp.ClientTimeout(total=total_s, sock_connect=min(self.connect_timeout_s, 0.9 * total_s))

    def _client(self) -> aiohttp.ClientSession:
        # aiohttp + orjson rather than httpx + json: a /generate round trip costs the rollout about a quarter of
        # the CPU (0.5 vs 1.9 ms per 8-sample group, measured against the same server), and the rollout shares
        # the machine's cores with the genserver and the trainer.
        if self._http is None:
            self._http = aiohttp.ClientSession(  # no session timeout: every request passes its own (_call)
                # idle connections are dropped before the server drops them (SGLang's uvicorn: after 5 s), so a POST is
                # never sent on a connection the server is closing, where it would fail as "may have run"
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_connections,
                                               keepalive_timeout=4.0),
                trust_env=True,  # HTTP(S)_PROXY / NO_PROXY, as httpx honoured them
            )
        return self._http

    async def _call(self, method: str, path: str, body: Any = None, *, idempotent: bool = False,
                    timeout_s: float | None = None, retries: int | None = None, admin: bool = False) -> Any:
        retries = self.retries if retries is None else retries
        headers = dict(self._admin_auth if admin else self._auth)
        data: bytes | None = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        total_s = self.timeout_s if timeout_s is None else timeout_s
        url = self.base_url + path
        last: Exception | None = None
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                async with self._client().request(method, url, data=data, headers=headers, allow_redirects=False,
                                                  timeout=self._timeout(total_s)) as r:
                    status, content = r.status, await r.read()
            except _NOT_SENT as e:
                last = e
                continue
            except asyncio.TimeoutError as e:
                if idempotent:
                    last = e
                    continue
                raise SGLangError(self.base_url, path, f"no answer within {total_s} s ({type(e).__name__}); "
                                  "not retried since the request may have run") from e
            except aiohttp.ClientError as e:
                if idempotent:
                    last = e
                    continue
                raise SGLangError(self.base_url, path, f"{type(e).__name__}: {e}; not retried since the request "
                                  "may have run") from e
            if status >= 500 and idempotent and attempt < retries:
                last = SGLangError(self.base_url, path, f"HTTP {status}: {_text(content, 500)}", status)
                continue
            if status == 401:
                sent = "no key was sent" if "Authorization" not in headers else "the key was refused"
                raise SGLangError(self.base_url, path, f"HTTP 401 Unauthorized: {sent}; give the server's "
                                  f"{'admin_api_key (or api_key)' if admin else 'api_key'}", 401)
            if status >= 400:
                raise SGLangError(self.base_url, path, f"HTTP {status}: {_text(content, 1000)}", status)
            if not content:
                return None
            try:
                return orjson.loads(content)
            except orjson.JSONDecodeError:
                return content.decode(errors="replace")
        if isinstance(last, SGLangError):
            raise last
        raise SGLangUnavailable(self.base_url, path, f"unreachable after {retries + 1} attempts "
                                f"({type(last).__name__}: {last})") from last

    async def _update(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        out = await self._call("POST", path, body, admin=True)
        if isinstance(out, dict) and out.get("success") is False:
            raise SGLangError(self.base_url, path, str(out.get("message", out)))
        return out if isinstance(out, dict) else {"result": out}

    # ---- generation ----
    async def generate(self, input_ids: list[int], sampling_params: dict[str, Any], rid: str | None = None,
                       return_logprob: bool = True) -> GenerateResult:
        body: dict[str, Any] = {"input_ids": list(input_ids), "sampling_params": dict(sampling_params),
                                "return_logprob": return_logprob}
        if rid is not None:
            body["rid"] = rid
        out = await self._call("POST", "/generate", body)
        if isinstance(out, list):
            out = out[0]
        if not isinstance(out, dict):
            raise SGLangError(self.base_url, "/generate", f"unexpected response {str(out)[:200]!r}")
        return parse_generate_response(out)

    async def generate_n(self, input_ids: list[int], sampling_params: dict[str, Any], n: int,
                         rid: str | None = None, return_logprob: bool = True) -> list[GenerateResult]:
        body: dict[str, Any] = {"input_ids": list(input_ids), "sampling_params": {**sampling_params, "n": int(n)},
                                "return_logprob": return_logprob}
        if rid is not None:
            body["rid"] = rid
        out = await self._call("POST", "/generate", body)
        items = out if isinstance(out, list) else [out]
        return [parse_generate_response(o) for o in items]

    async def abort(self, rid: str = "", abort_all: bool = False) -> None:
        await self._call("POST", "/abort_request", {"rid": rid, "abort_all": abort_all}, admin=True)

    async def pause(self, mode: str = "abort") -> None:
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause mode {mode!r}: use abort, retract or in_place")
        await self._call("POST", "/pause_generation", {"mode": mode}, admin=True)

    async def resume(self) -> None:
        await self._call("POST", "/continue_generation", {}, admin=True)

    # ---- inspection ----
    async def loads(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/loads", idempotent=True)

    async def model_info(self) -> dict[str, Any]:
        return await self._call("GET", "/model_info", idempotent=True)

    async def weight_version(self) -> int:
        """The policy version the server holds, as the trainer's integer (parsed here, once, at the boundary:
        SGLang reports it as a string, "default" for the weights it started with)."""
        from asyncgrpo.queue.schema import version_number

        return version_number((await self.model_info()).get("weight_version", "default"))

    async def server_info(self) -> dict[str, Any]:
        return await self._call("GET", "/server_info", idempotent=True)

    async def health(self) -> bool:
        """True when /health answers 200; False when it answers otherwise or the server is unreachable."""
        try:
            await self._call("GET", "/health", idempotent=True, retries=0, timeout_s=min(self.timeout_s, 30.0))
            return True
        except SGLangError:
            return False

    async def health_generate(self) -> bool:
        try:
            await self._call("GET", "/health_generate", idempotent=True, retries=0)
            return True
        except SGLangError:
            return False

    async def flush_cache(self) -> None:
        await self._call("POST", "/flush_cache", {}, admin=True)

    # ---- weights ----
    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str = "gloo") -> dict[str, Any]:
        return await self._update("/init_weights_update_group", {
            "master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend})

    async def begin_weight_update(self) -> dict[str, Any]:
        return await self._update("/begin_weight_update", {})

    async def end_weight_update(self) -> dict[str, Any]:
        return await self._update("/end_weight_update", {})

    async def update_weights_from_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                                              group_name: str, weight_version: str | None = None,
                                              load_format: str | None = None, flush_cache: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"names": list(names), "dtypes": [_dtype_name(d) for d in dtypes],
                                "shapes": [list(map(int, s)) for s in shapes], "group_name": group_name,
                                "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        if load_format is not None:
            body["load_format"] = load_format
        return await self._update("/update_weights_from_distributed", body)

    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], weight_version: str | None = None,
                                         load_format: str | None = None, flush_cache: bool = True) -> dict[str, Any]:
        """Tensors by reference (asyncgrpo.sglang.tensor_payload), one payload per TP rank of the server."""
        body: dict[str, Any] = {"serialized_named_tensors": list(serialized_named_tensors), "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        if load_format is not None:
            body["load_format"] = load_format
        return await self._update("/update_weights_from_tensor", body)

    async def destroy_weights_update_group(self, group_name: str) -> dict[str, Any]:
        return await self._update("/destroy_weights_update_group", {"group_name": group_name})

    async def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model_path": str(model_path)}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return await self._update("/update_weights_from_disk", body)

    async def update_weight_version(self, version: str, abort_all_requests: bool = False) -> dict[str, Any]:
        """Set the served version label. SGLang's own default aborts all requests; ours does not unless asked."""
        return await self._update("/update_weight_version", {"new_version": str(version),
                                                             "abort_all_requests": abort_all_requests})

    async def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any:
        return await self._call("POST", "/get_weights_by_name", {"name": name, "truncate_size": int(truncate_size)},
                                idempotent=True, admin=True)
