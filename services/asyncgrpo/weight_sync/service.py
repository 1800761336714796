"""The weight-sync service: rank 0 of the broadcast group to the generation servers, their membership,
and the version each one holds.

Per new version (slime/SGLang order), for the members synced over the group:
  pause(mode) -> begin_weight_update -> per bucket: fire update_weights_from_distributed to every member,
  broadcast the bucket from rank 0, await the replies -> end_weight_update -> continue_generation.
The version is sent with the last bucket only, so a server's version changes only when all buckets landed.

Failure handling: every HTTP call and collective has a deadline. When an update fails, each member that
errored is health-checked: a dead one is dropped (reported; re-synced by the resync loop once /health is
OK again), a live one is retried; the group is rebuilt (fresh name and port) and the update re-run for
the survivors, so one dead server never blocks the others and never hangs the trainer (which only wrote
a snapshot). A joining or dropped server is caught up through a temporary group of its own before it is
marked ready (it stays paused until then), so ready servers are never paused for a newcomer.

The control functions (register, leave, servers, status, notify_published) are plain coroutines so the
HTTP API here and the control plane's gRPC can both call them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncgrpo.sglang.client import SGLangClient, SGLangError
from asyncgrpo.utils.metrics import counter, gauge, histogram
from asyncgrpo.weight_sync.checkpoint import write_checkpoint
from asyncgrpo.utils.net import free_port
from asyncgrpo.weight_sync.group import BroadcastGroup
from asyncgrpo.weight_sync.settings import SyncSettings
from asyncgrpo.weight_sync.snapshot import READER, Manifest, SnapshotDir

log = logging.getLogger("asyncgrpo.weight_sync")

TRANSPORTS = ("distributed", "disk")
MAX_ATTEMPTS = 3
HEALTH_TIMEOUT_S = 5.0  # a server that cannot answer /health this fast is not fit to serve anyway

_UPDATE_S = histogram("weight_sync_update_seconds", "Duration of one update (pause to continue)",
                      buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
_BYTES = counter("weight_sync_bytes_total", "Bytes broadcast to generation servers")
_LAST_BYTES = gauge("weight_sync_update_bytes", "Bytes of the last update")
_GBPS = gauge("weight_sync_broadcast_gbps", "Bandwidth of the last update's buckets in GB/s (1e9 bytes), HTTP replies included")
_COLL_GBPS = gauge("weight_sync_collective_gbps", "Bandwidth of the last update's broadcast collectives alone in GB/s")
_BLOCKED = gauge("weight_sync_last_trainer_blocked_seconds", "Seconds the trainer was blocked handing over the last version")
_VERSION = gauge("weight_sync_version", "Newest version synced to at least one server")
_PUBLISHED = gauge("weight_sync_published_version", "Newest version the trainer published")
_SERVER_VERSION = gauge("weight_sync_server_version", "Version each server holds (-1: unknown)", ["server"])
_SERVER_READY = gauge("weight_sync_server_ready", "1 when a server holds the current version and may serve", ["server"])
_FAILURES = counter("weight_sync_failures_total", "Servers dropped from an update or a group", ["server", "stage"])
_SKIPPED = counter("weight_sync_skipped_versions_total", "Published versions superseded before they were synced")


@dataclass
class Member:
    url: str
    transport: str
    client: SGLangClient
    state: str = "joining"  # joining -> ready; ready -> dropped on failure; dropped -> ready after re-sync
    version: str | None = None
    group: str | None = None  # the server-side group it was last told to join
    join_failures: int = 0
    failures: int = 0
    last_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def info(self) -> dict[str, Any]:
        return {"url": self.url, "transport": self.transport, "state": self.state, "ready": self.ready,
                "version": self.version, "failures": self.failures, "last_error": self.last_error}


def _as_int(v: str | None) -> int:
    try:
        return int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return -1


@dataclass
class UpdateReport:
    version: int
    members: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0
    broadcast_s: float = 0.0  # first bucket fired .. last bucket's replies (HTTP and servers' loading included)
    collective_s: float = 0.0  # time rank 0 spent inside the broadcast collectives
    bytes: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes / self.broadcast_s / 1e9 if self.broadcast_s > 0 else 0.0

    @property
    def collective_gbps(self) -> float:
        return self.bytes / self.collective_s / 1e9 if self.collective_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "members": self.members, "failed": self.failed, "duration_s": self.duration_s,
                "broadcast_s": self.broadcast_s, "collective_s": self.collective_s, "bytes": self.bytes, "gbps": self.gbps,
                "collective_gbps": self.collective_gbps}


class WeightSyncService:
    def __init__(self, settings: SyncSettings) -> None:
        self.s = settings
        self.snapshot = SnapshotDir(settings.snapshot_dir)
        self.members: dict[str, Member] = {}
        self.group: BroadcastGroup | None = None
        self.group_members: list[str] = []
        self.published_version: int | None = None
        self.synced_version: int | None = None
        self.last_blocked_s: float | None = None
        self.last_update: UpdateReport | None = None
        self.updating = False
        self._gen = 0
        self._lock = asyncio.Lock()  # one update or group change at a time
        self._wake = asyncio.Event()
        self._resync_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ckpt: tuple[tuple[int, float], str] | None = None  # (version, published_at) -> disk checkpoint

    # ---------------- lifecycle ----------------
    async def start(self) -> None:
        self.snapshot.claim(READER)  # SnapshotInUse if another live weight-sync reads this snapshot
        latest = self.snapshot.latest()
        if latest is not None:
            self.published_version = latest["version"]
            _PUBLISHED.set(latest["version"])
        for url in self.s.servers:
            await self.register(url, "distributed")
        for url in self.s.disk_servers:
            await self.register(url, "disk")
        self._tasks = [asyncio.create_task(self._update_loop(), name="weight-sync-update"),
                       asyncio.create_task(self._resync_loop(), name="weight-sync-resync")]
        self._wake.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        async with self._lock:
            await self._teardown_group()
            for m in self.members.values():
                await m.client.aclose()
        self.snapshot.release(READER)

    # ---------------- control functions (HTTP now, gRPC later) ----------------
    async def register(self, url: str, transport: str = "distributed") -> dict[str, Any]:
        """Add a server; it is paused at once (if reachable) and marked ready once it holds the current version."""
        url = url.rstrip("/")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r}: use one of {TRANSPORTS}")
        m = self.members.get(url)
        if m is None:
            client = SGLangClient(url, timeout_s=self.s.request_timeout_s, connect_timeout_s=min(5.0, self.s.request_timeout_s),
                                  retries=0, api_key=self.s.api_key, admin_api_key=self.s.admin_api_key)
            m = self.members[url] = Member(url=url, transport=transport, client=client)
            log.info("server %s registered (transport %s)", url, transport)
        elif m.state != "ready":
            m.transport = transport
        if m.state != "ready":
            with contextlib.suppress(SGLangError):
                await m.client.pause(self.s.pause_mode)  # serve nothing until it holds the current version
        self._export(m)
        self._resync_wake.set()
        return m.info()

    async def leave(self, url: str) -> dict[str, Any]:
        """Remove a server: it leaves the group (best effort) and is no longer updated."""
        url = url.rstrip("/")
        async with self._lock:
            m = self.members.pop(url, None)
            if m is None:
                raise KeyError(f"server {url} is not registered")
            if m.group:
                with contextlib.suppress(SGLangError):
                    await asyncio.wait_for(m.client.destroy_weights_update_group(m.group), self.s.request_timeout_s)
            await m.client.aclose()
            _SERVER_READY.labels(url).set(0)
            log.info("server %s left", url)
            return m.info() | {"state": "left", "ready": False}

    def servers(self) -> list[dict[str, Any]]:
        return [m.info() for m in self.members.values()]

    def status(self) -> dict[str, Any]:
        return {"published_version": self.published_version, "synced_version": self.synced_version,
                "updating": self.updating, "group": self.group.name if self.group and not self.group.broken else None,
                "group_members": self.group_members, "last_trainer_blocked_s": self.last_blocked_s,
                "last_update": self.last_update.to_json() if self.last_update else None, "servers": self.servers()}

    def notify_published(self, version: int, blocked_s: float | None = None) -> None:
        """The trainer wrote `version` into the snapshot (the snapshot itself says which version is newest)."""
        if self.published_version is not None and version <= self.published_version:
            # a trainer restarted from an older checkpoint: its version is the truth now, and the numbers it
            # publishes again name other weights than the servers' (same label, dead branch): re-send them
            log.warning("version %d published after version %d (trainer restarted from a checkpoint?); every server "
                        "is updated again", version, self.published_version)
            for m in self.members.values():
                m.version = None
            self.synced_version = None
        self.published_version = version
        _PUBLISHED.set(version)
        if blocked_s is not None:
            self.last_blocked_s = blocked_s
            _BLOCKED.set(blocked_s)
        self._wake.set()

    # ---------------- loops ----------------
    async def _update_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                async with self._lock:
                    await self._update_ready()
            except Exception:  # keep the service alive; the next publish or resync retries
                log.exception("weight update failed")

    async def _resync_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._resync_wake.wait(), self.s.resync_interval_s)
            self._resync_wake.clear()
            try:
                async with self._lock:
                    await self._verify_ready()
            except Exception:  # the check is a safety net: never let it stop the loop
                log.exception("version check of the ready servers failed")
            waiting = [m for m in self.members.values() if m.state != "ready"]
            if not waiting:
                continue
            healthy = [m for m, ok in zip(waiting, await asyncio.gather(*(self._healthy(m) for m in waiting))) if ok]
            if not healthy:
                continue
            try:
                async with self._lock:
                    await self._catch_up([m for m in healthy if m.url in self.members and m.state != "ready"])
            except Exception:
                log.exception("re-sync of %s failed", [m.url for m in healthy])

    async def _verify_ready(self) -> None:
        """A ready server must still hold the version we gave it. One restarted under the same URL (e.g. killed
        while its update finished) serves its base weights: every group it generates is stale, so the trainer
        publishes nothing new and no update would ever reach it. Drop it, so the resync catches it up."""
        ready = [m for m in self.members.values() if m.ready and m.version is not None]

        async def held(m: Member) -> str | None:
            try:
                info = await asyncio.wait_for(m.client.model_info(), HEALTH_TIMEOUT_S)
            except (SGLangError, asyncio.TimeoutError, OSError):
                return None  # unreachable now: the next update (or this check, once it answers) deals with it
            v = info.get("weight_version")
            return None if v is None else str(v)  # a server that does not report it cannot be checked

        for m, v in zip(ready, await asyncio.gather(*(held(m) for m in ready))):
            if v is not None and v != m.version and m.ready:
                self._drop(m, "version", f"holds weight version {v!r}, not {m.version!r} (restarted?)")

    # ---------------- snapshot ----------------
    @contextlib.asynccontextmanager
    async def _latest(self):  # type: ignore[no-untyped-def]
        cm = self.snapshot.read_latest()
        snap = await asyncio.to_thread(cm.__enter__)  # may wait for the publisher to finish the slot
        try:
            yield snap
        finally:
            cm.__exit__(None, None, None)

    # ---------------- updates ----------------
    async def _update_ready(self) -> None:
        async with self._latest() as snap:
            if snap is None:
                return
            manifest, data = snap
            v = str(manifest.version)
            targets = [m for m in self.members.values() if m.ready and m.version != v]
            if not targets:
                return
            if self.synced_version is not None and manifest.version > self.synced_version + 1:
                _SKIPPED.inc(manifest.version - self.synced_version - 1)
            await self._sync(targets, manifest, data, temporary_group=False)

    async def _catch_up(self, members: list[Member]) -> None:
        if not members:
            return
        async with self._latest() as snap:
            if snap is None:
                # Nothing published yet: a server holds the base model, which is the trainer's version 0.
                for m in members:
                    try:
                        info = await m.client.model_info()
                        m.version = str(info.get("weight_version", "default"))
                        m.state = "ready"
                        await m.client.resume()
                    except SGLangError as e:
                        self._drop(m, "join", e)
                    self._export(m)
                return
            manifest, data = snap
            behind = []
            for m in members:
                try:
                    held = str((await m.client.model_info()).get("weight_version"))
                except SGLangError as e:
                    self._drop(m, "join", e)
                    continue
                if held == str(manifest.version) and m.failures == 0:
                    # e.g. this service restarted: the server already holds the newest version
                    m.version, m.state = held, "ready"
                    await self._resume([m])
                else:
                    m.state = "joining"  # healthy again: a dropped server re-joins (a failure drops it again)
                    behind.append(m)
            members = behind
            if not members:
                return
            log.info("catching up %s to version %d", [m.url for m in members], manifest.version)
            await self._sync(members, manifest, data, temporary_group=True)

    async def _sync(self, members: list[Member], manifest: Manifest, data: torch.Tensor, temporary_group: bool) -> None:
        t0 = time.perf_counter()
        self.updating = True
        report = UpdateReport(version=manifest.version, members=[m.url for m in members])
        try:
            dist = [m for m in members if m.transport == "distributed"]
            disk = [m for m in members if m.transport == "disk"]
            jobs = []
            if dist:
                jobs.append(self._sync_distributed(dist, manifest, data, temporary_group, report))
            if disk:
                jobs.append(self._sync_disk(disk, manifest, data, report))
            await asyncio.gather(*jobs)
            # servers switched to disk while forming the group (auto fallback) are synced now
            moved = [m for m in dist if m.transport == "disk" and m.state != "dropped" and m.version != str(manifest.version)]
            if moved:
                await self._sync_disk(moved, manifest, data, report)
        finally:
            self.updating = False
        report.duration_s = time.perf_counter() - t0
        self.last_update = report
        if any(m.version == str(manifest.version) for m in members):
            self.synced_version = max(self.synced_version or 0, manifest.version)
            _VERSION.set(self.synced_version)
        _UPDATE_S.observe(report.duration_s)
        _LAST_BYTES.set(report.bytes)
        _GBPS.set(report.gbps)
        _COLL_GBPS.set(report.collective_gbps)
        log.info("version %d -> %d server(s) in %.3fs (broadcast %.3fs, %.1f MB, %.3f GB/s)%s", manifest.version,
                 len(members) - len(report.failed), report.duration_s, report.broadcast_s, report.bytes / 1e6, report.gbps,
                 f"; failed: {report.failed}" if report.failed else "")

    async def _sync_distributed(self, members: list[Member], manifest: Manifest, data: torch.Tensor, temporary: bool,
                                report: UpdateReport) -> None:
        v = str(manifest.version)
        todo = list(members)
        for attempt in range(MAX_ATTEMPTS):
            todo = [m for m in todo if m.state != "dropped" and m.transport == "distributed" and m.url in self.members]
            if not todo:
                return
            if temporary:
                group, joined = await self._form(todo)
            else:
                group, joined = await self._ensure_group(todo)
            if group is None:
                return
            try:
                errors = await self._push(group, joined, manifest, data, report)
            finally:
                if temporary:
                    await self._destroy(group, joined)
            ok = [m for m in joined if m.url not in errors]
            for m in ok:
                m.version, m.state, m.last_error = v, "ready", None
            await self._resume(ok)
            if not errors:
                return
            # The group is unusable after a failed collective: rebuild it (without the dead) and retry.
            if not temporary:
                await self._teardown_group()
            failed = [m for m in joined if m.url in errors]
            alive = await asyncio.gather(*(self._healthy(m) for m in failed))
            for m, ok_health in zip(failed, alive):
                if not ok_health or attempt == MAX_ATTEMPTS - 1:
                    self._drop(m, "update", errors[m.url])
                    report.failed[m.url] = errors[m.url]
                else:
                    log.warning("update of %s to version %s failed (%s); retrying", m.url, v, errors[m.url])
                    with contextlib.suppress(SGLangError, asyncio.TimeoutError):
                        await asyncio.wait_for(m.client.end_weight_update(), self.s.request_timeout_s)
            todo = [m for m in failed if m.state != "dropped"]

    async def _push(self, group: BroadcastGroup, members: list[Member], manifest: Manifest, data: torch.Tensor,
                    report: UpdateReport) -> dict[str, str]:
        """One update over a formed group; {url: error} for the members it failed on (empty: all done)."""
        s = self.s
        errors: dict[str, str] = {}

        async def call(m: Member, coro: Any, timeout: float) -> None:
            try:
                await asyncio.wait_for(coro, timeout)
            except (SGLangError, asyncio.TimeoutError, OSError) as e:
                errors.setdefault(m.url, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

        async def each(make: Any, timeout: float) -> None:
            await asyncio.gather(*(call(m, make(m), timeout) for m in members))

        await each(lambda m: m.client.pause(s.pause_mode), s.request_timeout_s)
        await each(lambda m: m.client.begin_weight_update(), s.request_timeout_s)
        if errors:
            return errors | {m.url: "group aborted: another member failed" for m in members if m.url not in errors}
        buckets = manifest.layout.buckets
        t0 = time.perf_counter()
        for i, b in enumerate(buckets):
            last = i == len(buckets) - 1
            calls = [asyncio.create_task(call(m, m.client.update_weights_from_distributed(
                b.names, b.dtypes, b.shapes, group.name, weight_version=str(manifest.version) if last else None,
                load_format="flattened_bucket", flush_cache=last), s.collective_timeout_s)) for m in members]
            bcast_error: str | None = None
            tb = time.perf_counter()
            try:
                await group.broadcast(data[b.offset:b.offset + b.nbytes], s.collective_timeout_s)
                report.collective_s += time.perf_counter() - tb
            except Exception as e:  # noqa: BLE001 - any collective failure aborts this group
                bcast_error = f"broadcast: {type(e).__name__}: {e}"
            await asyncio.gather(*calls)
            if bcast_error or errors:
                for m in members:
                    errors.setdefault(m.url, bcast_error or "group aborted: another member failed")
                return errors
            report.bytes += b.nbytes
        report.broadcast_s += time.perf_counter() - t0
        _BYTES.inc(manifest.layout.payload_bytes)
        await each(lambda m: m.client.end_weight_update(), s.request_timeout_s)
        return errors

    async def _sync_disk(self, members: list[Member], manifest: Manifest, data: torch.Tensor, report: UpdateReport) -> None:
        s, v = self.s, str(manifest.version)
        if self._ckpt is None or self._ckpt[0] != (manifest.version, manifest.published_at):
            path = await asyncio.to_thread(write_checkpoint, manifest, data, s.checkpoint_dir, s.base_model_path,
                                           s.keep_checkpoints)
            self._ckpt = ((manifest.version, manifest.published_at), str(path))
        path = self._ckpt[1]

        async def one(m: Member) -> None:
            try:
                await asyncio.wait_for(m.client.pause(s.pause_mode), s.request_timeout_s)
                await asyncio.wait_for(m.client.update_weights_from_disk(path, weight_version=v), s.collective_timeout_s)
                m.version, m.state, m.last_error = v, "ready", None
                await asyncio.wait_for(m.client.resume(), s.request_timeout_s)
                self._export(m)
            except (SGLangError, asyncio.TimeoutError, OSError) as e:
                report.failed[m.url] = f"{type(e).__name__}: {e}"
                self._drop(m, "disk", report.failed[m.url])

        await asyncio.gather(*(one(m) for m in members))

    async def _resume(self, members: list[Member]) -> None:
        async def one(m: Member) -> None:
            try:
                await asyncio.wait_for(m.client.resume(), self.s.request_timeout_s)
            except (SGLangError, asyncio.TimeoutError) as e:
                log.warning("continue_generation on %s failed: %s", m.url, e)
            self._export(m)
        await asyncio.gather(*(one(m) for m in members))

    # ---------------- group ----------------
    async def _ensure_group(self, members: list[Member]) -> tuple[BroadcastGroup | None, list[Member]]:
        urls = [m.url for m in members]
        if self.group is not None and not self.group.broken and self.group_members == urls:
            return self.group, members
        await self._teardown_group()
        group, joined = await self._form(members)
        self.group, self.group_members = group, [m.url for m in joined]
        return group, joined

    async def _teardown_group(self) -> None:
        if self.group is None:
            return
        group, self.group = self.group, None
        await self._destroy(group, [self.members[u] for u in self.group_members if u in self.members])
        self.group_members = []

    async def _destroy(self, group: BroadcastGroup, members: list[Member]) -> None:
        async def one(m: Member) -> None:
            if m.group == group.name:
                with contextlib.suppress(SGLangError, asyncio.TimeoutError):
                    await asyncio.wait_for(m.client.destroy_weights_update_group(group.name), self.s.request_timeout_s)
                m.group = None
        await asyncio.gather(*(one(m) for m in members), group.destroy())

    async def _form(self, members: list[Member]) -> tuple[BroadcastGroup | None, list[Member]]:
        """A fresh group with as many of `members` as can join; the others are dropped (or moved to disk)."""
        s = self.s
        todo = list(members)
        while todo:
            # a server still in an older group (e.g. after a failure) leaves it first
            await asyncio.gather(*(self._leave_old(m) for m in todo))
            self._gen += 1
            name = f"asyncgrpo-ws-{os.getpid()}-{self._gen}"
            # the store listens on the service's own interface (weight_sync.host); servers are told master_address
            port = s.master_port or free_port("" if s.host in ("0.0.0.0", "::") else s.host)
            group = BroadcastGroup(name=name, backend=s.backend, master_address=s.master_address, master_port=port,
                                   world_size=len(todo) + 1, timeout_s=s.collective_timeout_s, bind_address=s.host)
            errors: dict[str, str] = {}

            async def join(m: Member, rank: int) -> None:
                try:
                    await asyncio.wait_for(m.client.init_weights_update_group(
                        s.master_address, port, rank, len(todo) + 1, name, s.backend), s.group_timeout_s)
                    m.group = name
                except (SGLangError, asyncio.TimeoutError, OSError) as e:
                    errors[m.url] = f"init_weights_update_group: {type(e).__name__}: {e}"

            results = await asyncio.gather(group.form(s.group_timeout_s), *(join(m, i + 1) for i, m in enumerate(todo)),
                                           return_exceptions=True)
            if not errors and not isinstance(results[0], BaseException):
                log.info("group %s formed: rank 0 + %s (%s, port %d)", name, [m.url for m in todo], s.backend, port)
                return group, todo
            await self._destroy(group, todo)
            if not errors:
                raise RuntimeError(f"rank 0 could not host group {name} on port {port}: {results[0]}")
            for m in [m for m in todo if m.url in errors]:
                m.join_failures += 1
                healthy = await self._healthy(m)
                if healthy and s.auto_disk_fallback and m.join_failures >= 2:
                    log.warning("server %s failed to join the group %d times (%s); switching it to the disk transport",
                                m.url, m.join_failures, errors[m.url])
                    m.transport = "disk"
                    _FAILURES.labels(m.url, "join").inc()
                else:
                    self._drop(m, "join", errors[m.url])
            todo = [m for m in todo if m.url not in errors]
        return None, []

    async def _leave_old(self, m: Member) -> None:
        if m.group:
            with contextlib.suppress(SGLangError, asyncio.TimeoutError):
                await asyncio.wait_for(m.client.destroy_weights_update_group(m.group), self.s.request_timeout_s)
            m.group = None

    async def _healthy(self, m: Member) -> bool:
        try:
            return await asyncio.wait_for(m.client.health(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False

    # ---------------- reporting ----------------
    def _drop(self, m: Member, stage: str, error: Any) -> None:
        m.state, m.failures, m.last_error = "dropped", m.failures + 1, str(error)
        _FAILURES.labels(m.url, stage).inc()
        log.warning("server %s dropped (%s): %s; it is re-synced once /health answers", m.url, stage, error)
        self._export(m)
        self._resync_wake.set()

    def _export(self, m: Member) -> None:
        _SERVER_VERSION.labels(m.url).set(_as_int(m.version))
        _SERVER_READY.labels(m.url).set(1 if m.ready else 0)
