"""HTTP API of the weight-sync service (FastAPI): the trainer's publish notification, run-time
membership, and what each server holds (rollout/router use /servers to pick ready servers).

Bodies are typed and bounded (a bad one answers 400 naming the field, never a 5xx; utils/api_errors.py), and
with keys the API is protected as SGLang's servers are (utils/auth.py): /publish and POST/DELETE /servers are
admin-level, GET /servers and /status ordinary, /health and /metrics open.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Query, Response
from fastapi.responses import PlainTextResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from asyncgrpo.utils.api_errors import (
    ErrorBody, customize_openapi, document_bad_request, error_response, install_error_handlers)
from asyncgrpo.utils.auth import AuthLevel, add_api_key_middleware, auth_level, document_auth
from asyncgrpo.weight_sync.service import WeightSyncService

MAX_VERSION = 2**63 - 1
MAX_URL_CHARS = 2048
MAX_BLOCKED_S = 1e9  # ~30 years: anything larger is a unit mistake, not a measurement

ADMIN = auth_level(AuthLevel.ADMIN_OPTIONAL)


def server_url(url: str) -> str:
    """An http(s) URL with a host and a valid port, without its trailing slashes (how members are keyed)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in 0..65535
        httpx.URL(url)  # what the service's client will have to parse
    except (ValueError, httpx.InvalidURL) as e:
        raise PydanticCustomError("url", "not a valid URL: {why}", {"why": str(e)}) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PydanticCustomError("url", "give the server's base URL as http(s)://host:port")
    if port == 0 or parts.query or parts.fragment:
        raise PydanticCustomError("url", "give the server's base URL as http(s)://host:port (no port 0, query or "
                                  "fragment)")
    return url.rstrip("/")


ServerUrl = Annotated[str, Field(max_length=MAX_URL_CHARS, pattern=r"^https?://[!-~]+$"),  # printable ASCII
                      AfterValidator(server_url)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PublishBody(_Body):
    """The trainer wrote `version` into the snapshot; blocked_s: how long the hand-over blocked it."""

    version: Annotated[int, Field(ge=0, le=MAX_VERSION)]
    blocked_s: Annotated[float, Field(ge=0.0, le=MAX_BLOCKED_S)] | None = None


class RegisterBody(_Body):
    url: ServerUrl
    transport: Literal["tensor", "distributed", "disk"] = "distributed"


class PublishAccepted(BaseModel):
    accepted: bool
    published_version: int | None


def build_app(service: WeightSyncService, api_key: str | None = None, admin_api_key: str | None = None) -> FastAPI:
    """The API over `service`; keys as given (None: that key is not required; see utils.auth.resolve_keys)."""
    app = FastAPI(title="asyncgrpo weight-sync")
    install_error_handlers(app)
    add_api_key_middleware(app, api_key=api_key, admin_api_key=admin_api_key)
    customize_openapi(app, document_bad_request,
                      lambda doc: document_auth(doc, app, api_key=api_key, admin_api_key=admin_api_key))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/publish", status_code=202, response_model=PublishAccepted)
    @ADMIN
    async def publish(body: PublishBody) -> dict[str, Any]:
        service.notify_published(body.version, body.blocked_s)
        return {"accepted": True, "published_version": service.published_version}

    @app.get("/servers")
    async def servers() -> list[dict[str, Any]]:
        return service.servers()

    @app.post("/servers")
    @ADMIN
    async def register(body: RegisterBody) -> dict[str, Any]:
        return await service.register(body.url, body.transport)

    @app.delete("/servers", responses={404: {"description": "No such server is registered", "model": ErrorBody}})
    @ADMIN
    async def leave(url: Annotated[str, Query(min_length=1, max_length=MAX_URL_CHARS)]) -> Any:
        try:
            return await service.leave(url)
        except KeyError as e:
            return error_response(str(e.args[0] if e.args else e), 404)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return service.status()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from asyncgrpo.utils.metrics import REGISTRY

        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app
