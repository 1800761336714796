"""Bearer-token auth for the HTTP services, exactly as SGLang 0.5.23 does it (sglang/srt/utils/auth.py), so a
generation server behind our clients behaves the same whether it is SGLang or genserver.

- `--api-key K` protects every endpoint (`Authorization: Bearer K`).
- `--admin-api-key A` protects the ADMIN_OPTIONAL endpoints (weight updates, pause, abort, ...); with both keys
  set those accept only A, and the NORMAL endpoints only K. With only A set the NORMAL endpoints are open.
- /health*, /ready* and /metrics* are always open (probes and scraping carry no secret); so is OPTIONS.
- A missing or wrong key answers 401 `{"error": "Unauthorized"}`; keys are compared in constant time.

SGLang's third level, ADMIN_FORCE, is marked nowhere in 0.5.23 (its FIXME), so it is not carried over.
"""

from __future__ import annotations

import enum
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

ENV_API_KEY = "ASYNCGRPO_API_KEY"
ENV_ADMIN_API_KEY = "ASYNCGRPO_ADMIN_API_KEY"
OPEN_PREFIXES = ("/health", "/ready", "/metrics")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Any])


class AuthLevel(str, enum.Enum):
    NORMAL = "normal"
    ADMIN_OPTIONAL = "admin_optional"


@dataclass(frozen=True)
class AuthDecision:
    allowed: bool
    status_code: int = 401  # meaningful only when not allowed


def auth_level(level: AuthLevel) -> Callable[[F], F]:
    """Mark an endpoint function with its level (unmarked endpoints are NORMAL), as SGLang's decorator."""

    def mark(fn: F) -> F:
        fn._auth_level = level  # type: ignore[attr-defined]
        return fn

    return mark


def resolve_keys(api_key: str | None, admin_api_key: str | None) -> tuple[str | None, str | None]:
    """The keys in force: an argument that is None falls back to ASYNCGRPO_API_KEY / ASYNCGRPO_ADMIN_API_KEY;
    an empty string (argument or variable) means no key."""
    if api_key is None:
        api_key = os.environ.get(ENV_API_KEY)
    if admin_api_key is None:
        admin_api_key = os.environ.get(ENV_ADMIN_API_KEY)
    return api_key or None, admin_api_key or None


def unprotected_listener(service: str, host: str, api_key: str | None, admin_api_key: str | None, options: str) -> str | None:
    """The one line that stops `service` from serving on a non-loopback `host` with no key (anyone who can
    reach it could change the run), else None. `options` names where the service takes its keys."""
    from asyncgrpo.utils.net import is_loopback

    if api_key or admin_api_key or is_loopback(host):
        return None
    return (f"asyncgrpo {service}: refusing to serve on {host} without a key: anyone who can reach it could change "
            f"the run. Pass {options} (or set {ENV_API_KEY} / {ENV_ADMIN_API_KEY}), or bind 127.0.0.1.")


def bearer_matches(authorization: str | None, expected: str) -> bool:
    """`Authorization: Bearer <expected>` (scheme case-insensitive), compared in constant time."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not _:
        return False
    return secrets.compare_digest(token.encode(), expected.encode())


def decide(*, method: str, path: str, authorization: str | None, api_key: str | None, admin_api_key: str | None,
           level: AuthLevel) -> AuthDecision:
    """SGLang's decision table (pure)."""
    if method == "OPTIONS" or path.startswith(OPEN_PREFIXES):
        return AuthDecision(True)
    if level is AuthLevel.ADMIN_OPTIONAL:
        key = admin_api_key or api_key or None  # both set: only the admin key opens admin endpoints
        return AuthDecision(True) if key is None else AuthDecision(bearer_matches(authorization, key))
    if api_key:  # NORMAL: only api_key matters (open when just an admin key is set)
        return AuthDecision(bearer_matches(authorization, api_key))
    return AuthDecision(True)


def route_level(app: Any, scope: Scope) -> AuthLevel:
    """The level marked on the endpoint this request routes to (NORMAL when none matches, as SGLang)."""
    from starlette.routing import Match

    for route in getattr(getattr(app, "router", None), "routes", None) or getattr(app, "routes", []):
        try:
            match, child = route.matches(scope)
        except Exception:  # noqa: BLE001 - a route that cannot judge this scope does not match it
            continue
        if match == Match.FULL:
            level = getattr(child.get("endpoint") or getattr(route, "endpoint", None), "_auth_level", None)
            return level if isinstance(level, AuthLevel) else AuthLevel.NORMAL
    return AuthLevel.NORMAL


def endpoint_levels(app: Any) -> dict[tuple[str, str], AuthLevel]:
    """(METHOD, path) -> level of every route of a FastAPI app (for the OpenAPI document and tests)."""
    out: dict[tuple[str, str], AuthLevel] = {}
    for route in getattr(app, "routes", []):
        level = getattr(getattr(route, "endpoint", None), "_auth_level", AuthLevel.NORMAL)
        for method in getattr(route, "methods", None) or ():
            out[(method, route.path)] = level
    return out


_UNAUTHORIZED = b'{"error":"Unauthorized"}'


class ApiKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so the app still sees http.disconnect: genserver aborts a
    non-streaming request whose client went away."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, admin_api_key: str | None, routes_of: Any) -> None:
        self.app, self.api_key, self.admin_api_key, self.routes_of = app, api_key, admin_api_key, routes_of

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        d = decide(method=scope["method"], path=scope["path"], authorization=authorization, api_key=self.api_key,
                   admin_api_key=self.admin_api_key, level=route_level(self.routes_of, scope))
        if d.allowed:
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": d.status_code, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(_UNAUTHORIZED)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})


def add_api_key_middleware(app: Any, *, api_key: str | None, admin_api_key: str | None) -> None:
    """Protect a FastAPI app; without any key it stays open and nothing is added (as SGLang)."""
    if api_key or admin_api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, admin_api_key=admin_api_key, routes_of=app)


def document_auth(openapi: dict[str, Any], app: Any, *, api_key: str | None, admin_api_key: str | None) -> None:
    """Declare, on every operation that needs a key under these keys, which one (scheme `bearer`: the api key,
    `adminBearer`: the admin key) and its 401 answer, so the OpenAPI says what the middleware does and a
    fuzzer can check that no key, or a wrong one, is refused."""
    if not (api_key or admin_api_key):
        return
    comps = openapi.setdefault("components", {})
    schemes = comps.setdefault("securitySchemes", {})
    comps.setdefault("schemas", {})["Unauthorized"] = {
        "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    unauthorized = {"description": "Missing or wrong `Authorization: Bearer` key",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Unauthorized"}}}}
    levels = endpoint_levels(app)
    for path, ops in openapi.get("paths", {}).items():
        for method, op in ops.items():
            level = levels.get((method.upper(), path), AuthLevel.NORMAL)
            probe = decide(method=method.upper(), path=path, authorization=None, api_key=api_key,
                           admin_api_key=admin_api_key, level=level)
            if probe.allowed:
                continue
            admin = level is AuthLevel.ADMIN_OPTIONAL and bool(admin_api_key)
            name = "adminBearer" if admin else "bearer"
            schemes[name] = {"type": "http", "scheme": "bearer", "description":
                             "the admin key (--admin-api-key)" if admin else "the api key (--api-key)"}
            op["security"] = [{name: []}]
            op.setdefault("responses", {})["401"] = unauthorized
