"""HTTP API of the control plane (FastAPI), REST under /v1, plus the dashboard at / and /metrics.

Every mutation (pause, resume, drain, stop, knobs) needs `Authorization: Bearer <control token>`; with no
token configured mutations are refused (401 naming the setting), since anyone who can reach the port could
otherwise steer the run. Reads are open unless control.protect_reads. Errors use SGLang's error body:
400 bad body or knob (naming the field), 401 token, 404 unknown run, 409 the run cannot do that now,
503 Redis unreachable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path as PathParam, Query, Request, Response, Security
from fastapi.security import HTTPBearer
from fastapi.responses import HTMLResponse, PlainTextResponse

from asyncgrpo.config.loader import ConfigError
from asyncgrpo.control.handlers import ControlPlane, Refused, RedisUnavailable, UnknownRun
from asyncgrpo.control.models import ActionResult, AuditList, Inspection, KnobsRequest, KnobsResult, RunDetail, RunSummary, StepSeries
from asyncgrpo.utils.api_errors import ErrorBody, customize_openapi, document_bad_request, error_response, install_error_handlers
from asyncgrpo.utils.auth import bearer_matches
from asyncgrpo.utils.metrics import counter, histogram

ENV_CONTROL_TOKEN = "ASYNCGRPO_CONTROL_TOKEN"
NAME = Annotated[str, PathParam(min_length=1, max_length=200, pattern=r"^[^{}\s/]+$")]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why} for code, why in (
        (401, "Missing or wrong bearer token"), (404, "Unknown run"), (409, "The run cannot do that now"),
        (503, "Redis (the run state) unreachable"))}
STATIC = Path(__file__).parent / "static"


def plotly_js() -> Path | None:
    """plotly.js as the plotly package ships it (MIT, its licence in the package), served to the dashboard."""
    try:
        import plotly
    except ImportError:
        return None
    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def resolve_token(token: str | None) -> str | None:
    """control.token, else ASYNCGRPO_CONTROL_TOKEN; empty means none."""
    return (token if token is not None else os.environ.get(ENV_CONTROL_TOKEN)) or None


class Unauthorized(Exception):
    pass


def _who(request: Request) -> str:
    actor = request.headers.get("x-asyncgrpo-actor", "")[:64] or "token"
    host = request.client.host if request.client else "?"
    return f"{actor}@{host}"


BEARER = HTTPBearer(auto_error=False, scheme_name="controlToken",
                    description="The control token (control.token / ASYNCGRPO_CONTROL_TOKEN)")


async def _mutation(request: Request, _creds: Annotated[Any, Security(BEARER)]) -> str:
    """Every mutation: the bearer token, or 401 naming what to send; returns who made it (for the audit list)."""
    token = request.app.state.token
    if token is None:
        raise Unauthorized("mutations are disabled: this control plane has no token; start it with control.token "
                           f"set or {ENV_CONTROL_TOKEN} in its environment")
    if not bearer_matches(request.headers.get("authorization"), token):
        raise Unauthorized("missing or wrong bearer token: send 'Authorization: Bearer <control token>'")
    return _who(request)


async def _protected_read(request: Request, _creds: Annotated[Any, Security(BEARER)]) -> None:
    token = request.app.state.token
    if not (token and bearer_matches(request.headers.get("authorization"), token)):
        raise Unauthorized("reads need the bearer token here (control.protect_reads): send "
                           "'Authorization: Bearer <control token>'")


async def _open_read() -> None:
    return None


Actor = Annotated[str, Depends(_mutation)]


def create_app(plane: ControlPlane, *, token: str | None, protect_reads: bool = False) -> FastAPI:
    app = FastAPI(title="asyncgrpo control plane", version="1",
                  description="Pause, resume, drain, stop and inspect live asyncgrpo runs. Mutations need the bearer "
                              "token (control.token / ASYNCGRPO_CONTROL_TOKEN).")
    install_error_handlers(app)
    customize_openapi(app, document_bad_request)

    @app.exception_handler(UnknownRun)
    async def _unknown(_r: Request, e: UnknownRun) -> Response:
        return error_response(str(e.args[0]), 404)

    @app.exception_handler(Refused)
    async def _refused(_r: Request, e: Refused) -> Response:
        return error_response(str(e), 409)

    @app.exception_handler(ConfigError)
    async def _bad_knob(_r: Request, e: ConfigError) -> Response:
        return error_response(str(e), 400)

    @app.exception_handler(RedisUnavailable)
    async def _no_redis(_r: Request, e: RedisUnavailable) -> Response:
        return error_response(str(e), 503)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_r: Request, e: Unauthorized) -> Response:
        resp = error_response(str(e), 401)
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    app.state.token, app.state.protect_reads = token, protect_reads
    requests = counter("control_requests_total", "Control-plane requests by method, route and status code.",
                       ["method", "route", "code"])
    latency = histogram("control_request_seconds", "Control-plane request latency by route.", ["route"],
                        buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10))

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(request.method, route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - t0)
        return response
    Reader = Depends(_protected_read if protect_reads else _open_read)

    @app.get("/health", response_class=PlainTextResponse)
    async def health() -> str:
        return "ok"

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from asyncgrpo.utils.metrics import REGISTRY

        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> Response:
        page = STATIC / "dashboard.html"
        if not page.exists():
            return PlainTextResponse("dashboard not built into this install", status_code=404)
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.-]+\.(js|css)$")]) -> Response:
        f = plotly_js() if name == "plotly.min.js" else STATIC / name
        if f is None or not f.is_file():
            return error_response(f"no static file {name}", 404)
        kind = "application/javascript" if name.endswith(".js") else "text/css"
        return Response(f.read_bytes(), media_type=kind, headers={"Cache-Control": "max-age=3600"})

    @app.get("/v1/runs", response_model=list[RunSummary], dependencies=[Reader], responses=ERRORS)
    async def list_runs() -> list[RunSummary]:
        """Every run a trainer has registered in this Redis."""
        return await plane.list_runs()

    @app.get("/v1/runs/{experiment}/{trial}", response_model=RunDetail, dependencies=[Reader], responses=ERRORS)
    async def get_run(experiment: NAME, trial: NAME) -> RunDetail:
        """Config, status, version and step, times, live knobs, and the version each generation server holds."""
        return await plane.get_run(f"{experiment}/{trial}")

    @app.get("/v1/runs/{experiment}/{trial}/inspect", response_model=Inspection, dependencies=[Reader], responses=ERRORS)
    async def inspect(experiment: NAME, trial: NAME) -> Inspection:
        """Queue, staleness, dead letters, throughput, recent steps and completions, servers."""
        return await plane.inspect(f"{experiment}/{trial}")

    @app.get("/v1/runs/{experiment}/{trial}/steps", response_model=StepSeries, dependencies=[Reader], responses=ERRORS)
    async def steps(experiment: NAME, trial: NAME,
                    limit: Annotated[int, Query(ge=1, le=10_000, description="Most recent steps returned")] = 500) -> StepSeries:
        """Per-step metrics as time series, oldest first."""
        return await plane.steps(f"{experiment}/{trial}", limit)

    @app.get("/v1/runs/{experiment}/{trial}/audit", response_model=AuditList, dependencies=[Reader], responses=ERRORS)
    async def audit(experiment: NAME, trial: NAME,
                    limit: Annotated[int, Query(ge=1, le=1000, description="Most recent entries returned")] = 100) -> AuditList:
        """Who changed what and when (pause, resume, drain, stop, knobs), newest first."""
        return await plane.audit(f"{experiment}/{trial}", limit)

    def action(name: str, doc: str) -> Callable[[str, str, str], Awaitable[ActionResult]]:
        async def act(experiment: NAME, trial: NAME, actor: Actor) -> ActionResult:
            return await plane.act(f"{experiment}/{trial}", name, actor)

        act.__doc__ = doc
        act.__name__ = name
        return act

    for name, doc in (
            ("pause", "Admit no new group; running groups finish and are queued; the trainer stops at a step boundary."),
            ("resume", "Admit and train again after a pause."),
            ("drain", "Admit nothing new, train what is admitted, then stop."),
            ("stop", "Stop: admit nothing new, the trainer stops after its current step (with a checkpoint).")):
        app.post(f"/v1/runs/{{experiment}}/{{trial}}/{name}", response_model=ActionResult, responses=ERRORS,
                 summary=name.capitalize())(action(name, doc))

    @app.patch("/v1/runs/{experiment}/{trial}/knobs", response_model=KnobsResult, responses=ERRORS)
    async def set_knobs(experiment: NAME, trial: NAME, body: KnobsRequest, actor: Actor) -> KnobsResult:
        """Change live knobs (validated by the run's config schema); recorded in the audit list."""
        return await plane.set_knobs(f"{experiment}/{trial}", body.knobs, actor)

    return app
