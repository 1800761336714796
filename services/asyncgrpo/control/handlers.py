"""The control plane's one handler layer: every REST endpoint (and the CLI through it) calls these methods,
which read and write a run only through queue/ (RunState, RunControl, GroupQueue), never through raw keys.

Errors are typed: UnknownRun (404), Refused (409: the run cannot do that now), and ConfigError from a knob
that the run's config schema rejects (400). Redis being unreachable is RedisUnavailable (503).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from asyncgrpo.config.knobs import LIVE_KNOBS, get_dotted, validate_knobs
from asyncgrpo.control.models import (
    ActionResult,
    AuditList,
    DeadLetterSummary,
    Inspection,
    KnobsResult,
    RunDetail,
    RunStatus,
    RunSummary,
    ServerState,
    StepSeries,
)
from asyncgrpo.queue import GroupQueue, RunState
from asyncgrpo.queue.run_control import RunControl
from asyncgrpo.queue.staleness import staleness

T = TypeVar("T")
STALENESS_SCAN = 256  # undelivered groups decoded for the staleness histogram (the oldest; each may be ~100 KB)



PROBE_TTL_S = 1.0  # seconds one probe of a generation server's state is reused

class UnknownRun(LookupError):
    pass


class Refused(RuntimeError):
    pass


class RedisUnavailable(RuntimeError):
    pass


def split_run_id(run_id: str) -> tuple[str, str]:
    exp, _, trial = run_id.partition("/")
    return exp, trial


def run_status(info_status: str, mode: str, paused: bool) -> RunStatus:
    if info_status == "stopped":
        return "stopped"
    if mode == "stop":
        return "stopping"
    if mode == "drain":
        return "draining"
    return "paused" if paused else "running"


class ControlPlane:
    def __init__(self, client: redis.Redis, *, server_timeout_s: float = 2.0, api_key: str | None = None) -> None:
        self.r = client
        self.server_timeout_s = server_timeout_s
        self.api_key = api_key  # for asking the generation servers their state
        # one probe per server serves every request within PROBE_TTL_S (the dashboard asks for a run's detail and
        # its inspection at once, both with the servers): a task, so concurrent requests share one probe in flight
        self._probes: dict[str, tuple[float, asyncio.Task[ServerState]]] = {}

    async def _io(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise RedisUnavailable(f"the run state is unavailable: Redis does not answer ({type(e).__name__}: {e}); "
                                   "the run goes on without the control plane, retry when Redis is back") from None

    def _run(self, run_id: str) -> tuple[RunState, RunControl]:
        ctl = RunControl(self.r, run_id)
        if not ctl.exists():
            known = RunControl.list_runs(self.r)
            hint = f"known runs: {', '.join(known)}" if known else "no run is registered yet (a run appears once its trainer starts)"
            raise UnknownRun(f"run {run_id!r} not found; {hint}")
        return RunState(self.r, run_id), ctl

    # -- reads -------------------------------------------------------------------------------------------
    def _summary(self, run_id: str) -> RunSummary:
        state, ctl = self._run(run_id)
        info = ctl.info()
        exp, trial = split_run_id(run_id)
        return RunSummary(run_id=run_id, experiment=exp, trial=trial, version=state.get_version(),
                          status=run_status(info["status"], ctl.mode(), state.is_paused()), updated_at=info["updated_at"])

    async def list_runs(self) -> list[RunSummary]:
        def read() -> list[RunSummary]:
            return [self._summary(r) for r in RunControl.list_runs(self.r)]

        return await self._io(read)

    def _detail_sync(self, run_id: str) -> tuple[RunDetail, list[str]]:
        state, ctl = self._run(run_id)
        info, mode, paused, version = ctl.info(), ctl.mode(), state.is_paused(), state.get_version()
        cfg = info["config"]
        knobs = {k: get_dotted(cfg, k) for k in LIVE_KNOBS if cfg}
        knobs.update(ctl.knobs())
        exp, trial = split_run_id(run_id)
        servers = self._server_urls(cfg)
        detail = RunDetail(
            run_id=run_id, experiment=exp, trial=trial, status=run_status(info["status"], mode, paused), version=version,
            updated_at=info["updated_at"], paused=paused, mode=mode, trainer_state=info["trainer_state"],
            trainer_alive=ctl.role_held("trainer"), step=version,
            max_steps=(cfg.get("trainer") or {}).get("max_steps"), started_at=info["started_at"], knobs=knobs,
            servers=[], config=cfg)
        return detail, servers

    @staticmethod
    def _server_urls(cfg: dict[str, Any]) -> list[str]:
        """The run's generation servers as weight-sync resolves them (broadcast members, disk, tensor servers)."""
        from asyncgrpo.weight_sync.settings import synced_servers

        ws = cfg.get("weight_sync") or {}
        broadcast, disk, tensor = synced_servers(ws.get("servers"), (cfg.get("rollout") or {}).get("server_urls") or [],
                                                 ws.get("disk_servers") or [], ws.get("tensor_servers") or [])
        return [*broadcast, *disk, *tensor]

    async def get_run(self, run_id: str) -> RunDetail:
        detail, urls = await self._io(self._detail_sync, run_id)
        detail.servers = await self.servers(urls)
        return detail

    async def servers(self, urls: list[str]) -> list[ServerState]:
        # shielded: a request that goes away must not cancel a probe another request shares
        return list(await asyncio.gather(*(asyncio.shield(self._probe(u)) for u in urls)))

    def _probe(self, url: str) -> asyncio.Task[ServerState]:
        loop = asyncio.get_running_loop()
        now, key = loop.time(), f"{id(loop)} {url}"  # a task belongs to its event loop
        hit = self._probes.get(key)
        if hit is None or now - hit[0] > PROBE_TTL_S:
            self._probes = {k: h for k, h in self._probes.items() if now - h[0] <= PROBE_TTL_S}  # forget old ones
            hit = self._probes[key] = (now, loop.create_task(self._server(url)))
        return hit[1]

    async def _server(self, url: str) -> ServerState:
        from asyncgrpo.sglang.client import SGLangClient, SGLangError

        try:
            async with SGLangClient(url, timeout_s=self.server_timeout_s, connect_timeout_s=self.server_timeout_s,
                                    retries=0, api_key=self.api_key) as c:
                if not await c.health():
                    return ServerState(url=url, healthy=False, error="GET /health did not answer 200")
                version = await c.weight_version()
                loads = (await c.loads()).get("loads") or [{}]
                return ServerState(url=url, healthy=True, weight_version=version,
                                   running_requests=sum(int(x.get("num_running_reqs", 0)) for x in loads),
                                   waiting_requests=sum(int(x.get("num_waiting_reqs", 0)) for x in loads))
        except (SGLangError, ValueError) as e:
            return ServerState(url=url, healthy=False, error=str(e)[:300])
        except Exception as e:  # noqa: BLE001 - a server answering nonsense is reported, never a 500 here
            return ServerState(url=url, healthy=False, error=f"unexpected answer ({type(e).__name__}: {e})"[:300])

    def _inspect_sync(self, run_id: str) -> tuple[Inspection, list[str]]:
        state, ctl = self._run(run_id)
        queue = GroupQueue(self.r, run_id)
        version = state.get_version()
        accepted, running = state.budget_usage()
        letters = queue.dead_letters(-10, -1)  # the newest; counts come from the counters
        counters = state.counters()
        hist = Counter(str(staleness(version, g.oldest_version)) for g in queue.undelivered(STALENESS_SCAN))
        steps = ctl.step_metrics(200)
        info = ctl.info()
        insp = Inspection(
            run_id=run_id, version=version, queue_depth=queue.depth(), waiting_groups=max(0, accepted - state.trained()),
            running_groups=running, pending_deliveries=queue.pending(), requeued_prompts=len(state.requeued()),
            dead_letters=DeadLetterSummary(
                count=int(counters.get("dead_letters", 0)),
                by_kind={k.split(":", 1)[1]: int(v) for k, v in counters.items() if k.startswith("dead_letters:")},
                recent=[{"group_id": d.group_id, "kind": d.kind, "reason": d.reason, "at": d.at} for d in letters][::-1]),
            staleness_histogram=dict(sorted(hist.items(), key=lambda kv: int(kv[0]))), counters=counters,
            rollout=ctl.rollout_stats(), trainer_tokens_per_s=steps[-1].get("tokens_per_s") if steps else None,
            steps=steps, completions=ctl.completions(20), servers=[])
        return insp, self._server_urls(info["config"])

    async def inspect(self, run_id: str) -> Inspection:
        insp, urls = await self._io(self._inspect_sync, run_id)
        insp.servers = await self.servers(urls)
        return insp

    async def steps(self, run_id: str, limit: int) -> StepSeries:
        def read() -> StepSeries:
            _, ctl = self._run(run_id)
            return StepSeries(run_id=run_id, steps=ctl.step_metrics(limit))

        return await self._io(read)

    async def audit(self, run_id: str, limit: int) -> AuditList:
        def read() -> AuditList:
            _, ctl = self._run(run_id)
            return AuditList(run_id=run_id, entries=ctl.audit(limit))

        return await self._io(read)

    async def get_config(self, run_id: str) -> dict[str, Any]:
        """The run's config as registered by its trainer (secrets redacted)."""
        return await self._io(lambda: self._run(run_id)[1].info()["config"])

    async def brief(self, run_id: str) -> tuple[int, RunStatus, dict[str, Any]]:
        """(version, status, live knobs set): what each watched event carries."""

        def read() -> tuple[int, RunStatus, dict[str, Any]]:
            state, ctl = self._run(run_id)
            return state.get_version(), run_status(ctl.info()["status"], ctl.mode(), state.is_paused()), ctl.knobs()

        return await self._io(read)

    # -- mutations ---------------------------------------------------------------------------------------
    async def act(self, run_id: str, action: str, who: str) -> ActionResult:
        """pause | resume | drain | stop."""

        def do() -> ActionResult:
            state, ctl = self._run(run_id)
            info, mode, paused = ctl.info(), ctl.mode(), state.is_paused()
            before = run_status(info["status"], mode, paused)
            if before == "stopped":
                raise Refused(f"run {run_id} is stopped: nothing to {action}; start its services again "
                              "(asyncgrpo up --resume RUN_DIR) to continue it")
            if action in ("pause", "resume") and mode != "run":
                raise Refused(f"run {run_id} is {before}: {action} applies to a running run")
            if action == "pause":
                state.set_paused(True)
            elif action == "resume":
                state.set_paused(False)
            elif action in ("drain", "stop"):
                if mode == "stop" and action == "drain":
                    raise Refused(f"run {run_id} is already stopping")
                ctl.set_mode(action)  # type: ignore[arg-type]
            else:  # pragma: no cover - the API routes only the four
                raise ValueError(action)
            rec = ctl.audit_action(who, action, old=before)
            after = run_status(ctl.info()["status"], ctl.mode(), state.is_paused())
            return ActionResult(run_id=run_id, action=action, status=after, audit=rec)

        return await self._io(do)

    async def set_knobs(self, run_id: str, changes: dict[str, Any], who: str) -> KnobsResult:
        def do() -> KnobsResult:
            _, ctl = self._run(run_id)
            cfg = ctl.info()["config"]
            values = validate_knobs(cfg, changes)  # ConfigError names the key
            current = {k: get_dotted(cfg, k) for k in LIVE_KNOBS}
            current.update(ctl.knobs())
            diff = {k: (current.get(k), v) for k, v in values.items() if current.get(k) != v}
            records = ctl.set_knobs(diff, who) if diff else []
            current.update(values)
            return KnobsResult(run_id=run_id, knobs=current, changes=records)

        return await self._io(do)
