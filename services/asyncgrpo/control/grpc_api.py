"""The control plane's gRPC API (proto/asyncgrpo/v1/control.proto): the same ControlPlane handlers as REST,
translated to and from protobuf here and nowhere else, plus WatchRun (the run's Redis event channel as a
server stream) and the fleet API (forwarded to the run's weight-sync service, which owns membership)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import httpx
from google.protobuf import json_format, struct_pb2

from asyncgrpo.config.loader import ConfigError
from asyncgrpo.control.handlers import ControlPlane, Refused, RedisUnavailable, UnknownRun, run_status
from asyncgrpo.control.models import RunDetail, RunSummary, ServerState
from asyncgrpo.queue.run_control import RunControl
from asyncgrpo.utils.auth import bearer_matches
from asyncgrpo.v1 import control_pb2 as pb
from asyncgrpo.v1 import control_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATUS = {"running": pb.RUN_STATUS_RUNNING, "paused": pb.RUN_STATUS_PAUSED, "draining": pb.RUN_STATUS_DRAINING,
           "stopping": pb.RUN_STATUS_STOPPING, "stopped": pb.RUN_STATUS_STOPPED}
# messages on the run's event channel -> event kind (the others, e.g. 'pushed' or 'lease', are not run events)
_EVENTS = {"paused": pb.EVENT_KIND_PAUSED, "resumed": pb.EVENT_KIND_RESUMED, "knobs": pb.EVENT_KIND_KNOBS}
_PREFIXED = {"version": pb.EVENT_KIND_VERSION, "mode": pb.EVENT_KIND_MODE, "status": pb.EVENT_KIND_STATUS,
             "trainer": pb.EVENT_KIND_TRAINER}


def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(json.loads(json.dumps(d)))  # plain JSON types only
    return s


def _value(v: Any) -> struct_pb2.Value:
    return json_format.ParseDict(v, struct_pb2.Value())


def _audit(rec: dict[str, Any]) -> pb.AuditEntry:
    return pb.AuditEntry(at=rec["at"], who=rec["who"], action=rec["action"], key=rec.get("key") or "",
                         old=_value(rec.get("old")), new=_value(rec.get("new")))


def _summary(s: RunSummary) -> pb.RunSummary:
    return pb.RunSummary(run_id=s.run_id, experiment=s.experiment, trial=s.trial, status=_STATUS[s.status],
                         version=s.version, updated_at=s.updated_at or 0.0)


def _server(s: ServerState) -> pb.ServerState:
    return pb.ServerState(url=s.url, healthy=s.healthy, weight_version=s.weight_version,
                          running_requests=s.running_requests, waiting_requests=s.waiting_requests, error=s.error or "")


def _run(d: RunDetail) -> pb.Run:
    return pb.Run(summary=_summary(d), paused=d.paused, mode=d.mode, trainer_state=d.trainer_state,
                  trainer_alive=d.trainer_alive, max_steps=d.max_steps, started_at=d.started_at or 0.0,
                  knobs=_struct(d.knobs), servers=[_server(s) for s in d.servers], config=_struct(d.config))


class RunServicer(pb_grpc.RunServiceServicer, pb_grpc.FleetServiceServicer):
    def __init__(self, plane: ControlPlane, *, token: str | None, redis_url: str, api_key: str | None = None,
                 admin_api_key: str | None = None, protect_reads: bool = False) -> None:
        self.plane = plane
        self.token = token
        self.protect_reads = protect_reads
        self.redis_url = redis_url
        # the weight-sync service's keys (SGLang's contract): reads need api_key, membership changes admin_api_key
        self.api_key, self.admin_api_key = api_key, admin_api_key

    # -- plumbing --------------------------------------------------------------------------------------
    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except UnknownRun as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        except ConfigError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Refused as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except RedisUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        raise AssertionError("unreachable")  # context.abort raises

    async def _who(self, context: grpc.aio.ServicerContext) -> str:
        meta = {k: v for k, v in (context.invocation_metadata() or ())}
        if self.token is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "mutations are disabled: this control plane has no "
                                "token (control.token / ASYNCGRPO_CONTROL_TOKEN)")
        if not bearer_matches(meta.get("authorization"), self.token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token: send metadata "
                                "'authorization: Bearer <control token>'")
        actor = str(meta.get("x-asyncgrpo-actor", ""))[:64] or "grpc"
        return f"{actor}@{context.peer()}"

    async def _reader(self, context: grpc.aio.ServicerContext, always: bool = False) -> None:
        """Reads are open unless control.protect_reads (or `always`: reads that use the control plane's own keys
        on another service, which must not lend them to an anonymous caller)."""
        if self.protect_reads or always:
            await self._who(context)

    @staticmethod
    async def _run_id(context: grpc.aio.ServicerContext, run_id: str) -> str:
        exp, sep, trial = run_id.partition("/")
        if not (sep and exp and trial) or "/" in trial:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"run_id {run_id!r}: give experiment/trial")
        return run_id

    # -- RunService ------------------------------------------------------------------------------------
    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        await self._reader(context)
        runs = await self._call(context, self.plane.list_runs)
        return pb.ListRunsResponse(runs=[_summary(r) for r in runs])

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        run_id = await self._run_id(context, request.run_id)
        await self._reader(context)
        return pb.GetRunResponse(run=_run(await self._call(context, lambda: self.plane.get_run(run_id))))

    async def _act(self, request: Any, context: grpc.aio.ServicerContext, action: str) -> tuple[int, pb.AuditEntry]:
        run_id = await self._run_id(context, request.run_id)
        who = await self._who(context)
        r = await self._call(context, lambda: self.plane.act(run_id, action, who))
        return _STATUS[r.status], _audit(r.audit)

    async def Pause(self, request: pb.PauseRequest, context: grpc.aio.ServicerContext) -> pb.PauseResponse:
        status, audit = await self._act(request, context, "pause")
        return pb.PauseResponse(status=status, audit=audit)

    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext) -> pb.ResumeResponse:
        status, audit = await self._act(request, context, "resume")
        return pb.ResumeResponse(status=status, audit=audit)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        status, audit = await self._act(request, context, "drain")
        return pb.DrainResponse(status=status, audit=audit)

    async def Stop(self, request: pb.StopRequest, context: grpc.aio.ServicerContext) -> pb.StopResponse:
        status, audit = await self._act(request, context, "stop")
        return pb.StopResponse(status=status, audit=audit)

    async def SetKnobs(self, request: pb.SetKnobsRequest, context: grpc.aio.ServicerContext) -> pb.SetKnobsResponse:
        run_id = await self._run_id(context, request.run_id)
        who = await self._who(context)
        changes = json_format.MessageToDict(request.knobs)
        r = await self._call(context, lambda: self.plane.set_knobs(run_id, changes, who))
        return pb.SetKnobsResponse(knobs=_struct(r.knobs), changes=[_audit(c) for c in r.changes])

    async def WatchRun(self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchRunResponse]:
        from asyncgrpo.queue.connection import make_async_redis

        run_id = await self._run_id(context, request.run_id)
        await self._reader(context)
        await self._call(context, lambda: self.plane.brief(run_id))  # NOT_FOUND before subscribing

        async def event(kind: int, detail: str = "") -> pb.WatchRunResponse:
            version, status, knobs = await self._call(context, lambda: self.plane.brief(run_id))
            if kind == pb.EVENT_KIND_VERSION and detail.isdigit():
                version, detail = int(detail), ""  # the version the event announces, not a later one
            with_knobs = kind in (pb.EVENT_KIND_SNAPSHOT, pb.EVENT_KIND_KNOBS)
            return pb.WatchRunResponse(kind=kind, version=version, detail=detail, status=_STATUS[status], at=time.time(),
                                       knobs=_struct(knobs) if with_knobs else None)

        client = make_async_redis(self.redis_url, max_block_s=5.0)
        try:
            async with client.pubsub(ignore_subscribe_messages=True) as ps:
                await ps.subscribe(RunControl(self.plane.r, run_id).keys.events)  # before the snapshot: nothing missed
                yield await event(pb.EVENT_KIND_SNAPSHOT)
                while True:
                    try:
                        msg = await ps.get_message(timeout=5.0)
                    except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the run's event channel dropped ({e}); watch again")
                    if msg is None:
                        continue
                    data = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
                    name, _, detail = data.partition(":")
                    kind = _EVENTS.get(data) or (_PREFIXED.get(name) if detail else None)
                    if kind is not None:
                        yield await event(kind, detail)
        except Exception as e:  # noqa: BLE001 - redis-py's connection errors; an abort above passes through
            if isinstance(e, (grpc.aio.AbortError, asyncio.CancelledError)):
                raise
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the run's event channel is unavailable ({type(e).__name__}: {e})")
        finally:
            await client.aclose()

    # -- FleetService: membership belongs to the run's weight-sync service -------------------------------
    async def _weight_sync(self, context: grpc.aio.ServicerContext, run_id: str, method: str, **kw: Any) -> Any:
        cfg = (await self._call(context, lambda: self.plane.get_config(run_id))).get("weight_sync") or {}
        host = cfg.get("host") or "127.0.0.1"
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{cfg.get('port')}"
        key = (self.api_key if method == "GET" else self.admin_api_key or self.api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as c:
                r = await c.request(method, "/servers", **kw)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"weight-sync at {url} unreachable ({e})")
        if r.status_code >= 400:
            try:
                msg = r.json().get("message") or r.text
            except ValueError:
                msg = r.text
            code = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.PERMISSION_DENIED,
                    404: grpc.StatusCode.NOT_FOUND}.get(r.status_code, grpc.StatusCode.INTERNAL)
            await context.abort(code, f"weight-sync: {msg}")
        try:
            return r.json() if r.content else None
        except ValueError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"weight-sync at {url} answered {r.status_code} without JSON")

    async def RegisterServer(self, request: pb.RegisterServerRequest, context: grpc.aio.ServicerContext) -> pb.RegisterServerResponse:
        run_id = await self._run_id(context, request.run_id)
        await self._who(context)
        body = {"url": request.url, "transport": request.transport or "distributed"}
        return pb.RegisterServerResponse(server=_struct(await self._weight_sync(context, run_id, "POST", json=body)))

    async def DeregisterServer(self, request: pb.DeregisterServerRequest, context: grpc.aio.ServicerContext) -> pb.DeregisterServerResponse:
        run_id = await self._run_id(context, request.run_id)
        await self._who(context)
        await self._weight_sync(context, run_id, "DELETE", params={"url": request.url})
        return pb.DeregisterServerResponse()

    async def ListServers(self, request: pb.ListServersRequest, context: grpc.aio.ServicerContext) -> pb.ListServersResponse:
        run_id = await self._run_id(context, request.run_id)
        await self._reader(context, always=True)
        servers = await self._weight_sync(context, run_id, "GET")
        return pb.ListServersResponse(servers=[_struct(s) for s in servers or []])


async def start_grpc(servicer: RunServicer, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_RunServiceServicer_to_server(servicer, server)
    pb_grpc.add_FleetServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port} for gRPC")
    await server.start()
    return server
