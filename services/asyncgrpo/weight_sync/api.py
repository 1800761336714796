"""HTTP API of the weight-sync service (FastAPI): the trainer's publish notification, run-time
membership, and what each server holds (rollout/router use /servers to pick ready servers)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, Field

from asyncgrpo.weight_sync.service import WeightSyncService


class PublishBody(BaseModel):
    version: int = Field(ge=0)
    blocked_s: float | None = None


class RegisterBody(BaseModel):
    url: str
    transport: Literal["distributed", "disk"] = "distributed"


def build_app(service: WeightSyncService) -> FastAPI:
    app = FastAPI(title="asyncgrpo weight-sync")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/publish", status_code=202)
    async def publish(body: PublishBody) -> dict[str, Any]:
        service.notify_published(body.version, body.blocked_s)
        return {"accepted": True, "published_version": service.published_version}

    @app.get("/servers")
    async def servers() -> list[dict[str, Any]]:
        return service.servers()

    @app.post("/servers")
    async def register(body: RegisterBody) -> dict[str, Any]:
        if not body.url.startswith(("http://", "https://")):
            raise HTTPException(400, f"url {body.url!r} must start with http:// or https://")
        return await service.register(body.url, body.transport)

    @app.delete("/servers")
    async def leave(url: str) -> dict[str, Any]:
        try:
            return await service.leave(url)
        except KeyError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return service.status()

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from asyncgrpo.utils.metrics import REGISTRY

        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app
