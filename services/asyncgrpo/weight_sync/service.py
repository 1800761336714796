"""The weight-sync service: the generation servers' membership, the version each one holds, and the
delivery of every new version to them over their transport (weight_sync/transports.py: broadcast, tensor
by reference, disk; the protocol pause -> begin -> send -> end -> continue is stated there once).
The version is sent with the last bucket only, so a server's version changes only when all buckets landed.

Failure handling: every HTTP call and collective has a deadline. When an update fails, each member that
errored is health-checked: a dead one is dropped (reported; re-synced by the resync loop once /health is
OK again), a live one is retried (a broadcast group is rebuilt, fresh name and port, without the dead),
and one that keeps failing falls back to the next transport of its chain (tensor -> distributed -> disk),
so one dead server never blocks the others and never hangs the trainer (which only wrote a snapshot). A
joining or dropped server is caught up through a temporary group of its own before it is marked ready (it
stays paused until then), so ready servers are never paused for a newcomer.

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
from asyncgrpo.weight_sync.settings import SyncSettings
from asyncgrpo.weight_sync.snapshot import READER, Manifest, SnapshotDir
from asyncgrpo.weight_sync.transports import (ABORTED, CALL_ERRORS, TRANSPORTS, BroadcastTransport, Transport,
                                              build_transports, call_each, describe, fallback_chain)

log = logging.getLogger("asyncgrpo.weight_sync")

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
_FALLBACKS = counter("weight_sync_transport_fallbacks_total", "Servers moved to the next transport of their chain",
                     ["server", "from_transport", "to_transport"])
_SKIPPED = counter("weight_sync_skipped_versions_total", "Published versions superseded before they were synced")


@dataclass
class Member:
    url: str
    transport: str  # the transport it is synced by now: the first of `chain` that has not failed it
    client: SGLangClient
    chain: list[str] = field(default_factory=list)
    tp_size: int | None = None  # the server's tensor-parallel size (the tensor transport sends one payload per rank)
    solo: bool = False  # failed together with others in a collective: caught up alone, to tell who is at fault
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
        return {"url": self.url, "transport": self.transport, "chain": self.chain, "state": self.state, "ready": self.ready,
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
        self.transports: dict[str, Transport] = build_transports(settings)
        self.published_version: int | None = None
        self.synced_version: int | None = None
        self.last_blocked_s: float | None = None
        self.last_update: UpdateReport | None = None
        self.updating = False
        self._lock = asyncio.Lock()  # one update or group change at a time
        self._wake = asyncio.Event()
        self._resync_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

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
        for url in self.s.tensor_servers:
            await self.register(url, "tensor")
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
            for t in self.transports.values():
                await t.close()
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
            m = self.members[url] = Member(url=url, transport=transport, client=client,
                                           chain=fallback_chain(transport, self.s.transport_fallback))
            log.info("server %s registered (transports %s)", url, " -> ".join(m.chain))
        elif m.state != "ready" and m.chain[:1] != [transport]:
            # a different transport asked for; the same one again (a sidecar re-registering) keeps a fallback
            m.transport, m.chain = transport, fallback_chain(transport, self.s.transport_fallback)
        if m.state != "ready":
            with contextlib.suppress(SGLangError):
                await m.client.pause(self.s.pause_mode)  # serve nothing until it holds the current version
        self._export(m)
        self._resync_wake.set()
        return m.info()

    async def leave(self, url: str) -> dict[str, Any]:
        """Remove a server: it leaves the broadcast group (best effort) and is no longer updated."""
        url = url.rstrip("/")
        async with self._lock:
            m = self.members.pop(url, None)
            if m is None:
                raise KeyError(f"server {url} is not registered")
            await self._broadcast.forget(m)
            await m.client.aclose()
            _SERVER_READY.labels(url).set(0)
            log.info("server %s left", url)
            return m.info() | {"state": "left", "ready": False}

    @property
    def _broadcast(self) -> BroadcastTransport:
        t = self.transports[BroadcastTransport.name]
        assert isinstance(t, BroadcastTransport)
        return t

    def servers(self) -> list[dict[str, Any]]:
        return [m.info() for m in self.members.values()]

    def status(self) -> dict[str, Any]:
        return {"published_version": self.published_version, "synced_version": self.synced_version,
                "updating": self.updating, **self._broadcast.state(), "last_trainer_blocked_s": self.last_blocked_s,
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
            except CALL_ERRORS:
                return None  # unreachable now: the next update (or this check, once it answers) deals with it
            v = info.get("weight_version")
            return None if v is None else str(v)  # a server that does not report it cannot be checked

        for m, v in zip(ready, await asyncio.gather(*(held(m) for m in ready))):
            if v is not None and v != m.version and m.ready:
                m.group = None  # a restarted server left every group it was in
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
            # a server dropped mid-update may still hold that update's session open; begin would be refused
            await asyncio.gather(*(self._close_session(m) for m in members))
            await self._sync(members, manifest, data, temporary_group=True)

    async def _sync(self, members: list[Member], manifest: Manifest, data: torch.Tensor, temporary_group: bool) -> None:
        t0 = time.perf_counter()
        self.updating = True
        report = UpdateReport(version=manifest.version, members=[m.url for m in members])
        v = str(manifest.version)
        try:
            todo = list(members)
            while todo:
                used = {m.url: m.transport for m in todo}
                by_transport: dict[str, list[Member]] = {}
                for m in todo:
                    by_transport.setdefault(m.transport, []).append(m)
                results = await asyncio.gather(*(self._deliver_all(self.transports[name], ms, manifest, data, report,
                                                                   temporary_group) for name, ms in by_transport.items()),
                                               return_exceptions=True)
                for name, r in zip(by_transport, results):  # a bug, not a server's failure: logged, its servers retried
                    if isinstance(r, BaseException):
                        log.error("update over %s failed: %s", name, describe(r), exc_info=r)
                        for m in by_transport[name]:
                            if m.version != v and m.state == "ready":
                                self._catch_up_later(m, describe(r))
                # a server that fell back to its next transport during this update gets the version through it now
                todo = [m for m in todo if m.url in self.members and m.state != "dropped" and m.version != v
                        and m.transport != used[m.url]]
        finally:
            self.updating = False
        if not any(m.transport == "tensor" for m in self.members.values()):
            await self.transports["tensor"].close()  # its staging buffer (a bucket of GPU or shared memory)
        report.duration_s = time.perf_counter() - t0
        self.last_update = report
        if any(m.version == v for m in members):
            self.synced_version = max(self.synced_version or 0, manifest.version)
            _VERSION.set(self.synced_version)
        _BYTES.inc(report.bytes)
        _UPDATE_S.observe(report.duration_s)
        _LAST_BYTES.set(report.bytes)
        _GBPS.set(report.gbps)
        _COLL_GBPS.set(report.collective_gbps)
        log.info("version %d -> %d server(s) in %.3fs (sending %.3fs, %.1f MB, %.3f GB/s)%s", manifest.version,
                 len(members) - len(report.failed), report.duration_s, report.broadcast_s, report.bytes / 1e6, report.gbps,
                 f"; failed: {report.failed}" if report.failed else "")

    async def _deliver_all(self, t: Transport, members: list[Member], manifest: Manifest, data: torch.Tensor,
                           report: UpdateReport, temporary: bool) -> None:
        """The members together, except those a failed collective marked solo: each of them alone, in turn."""
        split = temporary and t.collective
        alone = [m for m in members if split and m.solo]  # decided now: the joint delivery may mark more solo
        together = [m for m in members if not (split and m.solo)]
        if together:
            await self._deliver(t, together, manifest, data, report, temporary)
        for m in alone:
            await self._deliver(t, [m], manifest, data, report, temporary)

    async def _deliver(self, t: Transport, members: list[Member], manifest: Manifest, data: torch.Tensor,
                       report: UpdateReport, temporary: bool) -> None:
        """One version to `members` over transport `t`, with retries; see transports.py for the protocol."""
        v = str(manifest.version)
        todo = list(members)
        for attempt in range(MAX_ATTEMPTS):
            todo = [m for m in todo if m.state != "dropped" and m.transport == t.name and m.url in self.members]
            if not todo:
                return
            try:
                ready, join_errors = await t.prepare(todo, manifest, data, temporary)
            except Exception as e:  # noqa: BLE001 - e.g. the disk checkpoint cannot be written: nobody was paused
                log.warning("preparing %s for %s failed: %s", t.name, [m.url for m in todo], describe(e))
                ready, join_errors = [], {m.url: f"{t.name}: {describe(e)}" for m in todo}
            failed_join = [m for m in todo if m.url in join_errors]
            await asyncio.gather(*(self._join_failed(m, join_errors[m.url], report) for m in failed_join))
            if not ready:
                return
            errors: dict[str, str] = {}
            try:
                errors = await self._protocol(t, ready, manifest, data, report)
            finally:
                await t.finish(ready, temporary, failed=bool(errors))
            ok = [m for m in ready if m.url not in errors]
            for m in ok:
                m.version, m.state, m.last_error, m.solo = v, "ready", None, False
            await self._resume(ok)
            if not errors:
                return
            failed = [m for m in ready if m.url in errors]
            health = await asyncio.gather(*(self._healthy(m) for m in failed))
            alive = [m for m, ok in zip(failed, health) if ok]
            for m in (m for m, ok in zip(failed, health) if not ok):
                report.failed[m.url] = errors[m.url]
                self._drop(m, "update", errors[m.url])
            if t.session:  # a retry or the next transport opens its own session
                await asyncio.gather(*(self._close_session(m) for m in alive))
            for m in alive:
                if attempt < MAX_ATTEMPTS - 1:
                    log.warning("update of %s to version %s over %s failed (%s); retrying", m.url, v, t.name, errors[m.url])
                elif t.collective and len(failed) > 1:
                    # several members failed one collective: which one is at fault is unknown (one that never
                    # failed gets ABORTED or a receive timeout). None falls back; each stays paused and is
                    # caught up alone, where a failure is its own
                    m.solo = True
                    self._catch_up_later(m, errors[m.url])
                elif not self._fall_back(m, errors[m.url]):
                    report.failed[m.url] = errors[m.url]
                    self._drop(m, "update", errors[m.url])
            todo = failed

    async def _protocol(self, t: Transport, members: list[Member], manifest: Manifest, data: torch.Tensor,
                        report: UpdateReport) -> dict[str, str]:
        """pause -> begin -> send -> end for `members` over `t`; {url: error} of the members it failed for."""
        s, errors = self.s, {}
        await call_each(members, lambda m: m.client.pause(s.pause_mode), s.request_timeout_s, errors, "pause_generation: ")
        began: list[Member] = []
        if t.session:
            await call_each([m for m in members if m.url not in errors], lambda m: m.client.begin_weight_update(),
                            s.request_timeout_s, errors, "begin_weight_update: ")
            began = [m for m in members if m.url not in errors]
        if errors and t.collective:
            errors |= {m.url: ABORTED for m in members if m.url not in errors}
        go = [m for m in members if m.url not in errors]
        if go:
            try:
                errors.update(await t.send(go, manifest, data, report))
            except Exception as e:  # noqa: BLE001 - e.g. no memory for the staging buffer: every member failed
                log.warning("sending version %d over %s failed: %s", manifest.version, t.name, describe(e))
                errors.update({m.url: f"send: {describe(e)}" for m in go})
        # close the sessions of the members that got everything; a failed one's is closed only once it proved
        # healthy (_deliver), so a frozen server cannot keep the others paused for another request timeout
        done = [m for m in began if m.url not in errors]
        if done:
            await call_each(done, lambda m: m.client.end_weight_update(), s.request_timeout_s, errors, "end_weight_update: ")
        return errors

    async def _close_session(self, m: Member) -> None:
        with contextlib.suppress(*CALL_ERRORS):
            await asyncio.wait_for(m.client.end_weight_update(), self.s.request_timeout_s)

    async def _join_failed(self, m: Member, error: str, report: UpdateReport) -> None:
        """A server that could not join the broadcast group: dropped, or (healthy, twice) moved down its chain."""
        m.join_failures += 1
        if m.join_failures >= 2 and await self._healthy(m) and self._fall_back(m, error):
            m.join_failures = 0
            return
        report.failed[m.url] = error
        self._drop(m, "join", error)

    def _fall_back(self, m: Member, error: str) -> bool:
        """Move a healthy server whose transport keeps failing to the next of its chain; False at the end of it."""
        i = m.chain.index(m.transport) if m.transport in m.chain else len(m.chain)
        if i + 1 >= len(m.chain):
            return False
        old, m.transport = m.transport, m.chain[i + 1]
        m.state, m.last_error = "joining", error
        _FAILURES.labels(m.url, old).inc()
        _FALLBACKS.labels(m.url, old, m.transport).inc()
        log.warning("server %s: transport %s failed (%s); falling back to %s", m.url, old, error, m.transport)
        self._export(m)
        return True

    async def _resume(self, members: list[Member]) -> None:
        async def one(m: Member) -> None:
            try:
                await asyncio.wait_for(m.client.resume(), self.s.request_timeout_s)
            except (SGLangError, asyncio.TimeoutError) as e:
                log.warning("continue_generation on %s failed: %s", m.url, e)
            self._export(m)
        await asyncio.gather(*(one(m) for m in members))

    async def _healthy(self, m: Member) -> bool:
        try:
            return await asyncio.wait_for(m.client.health(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False

    # ---------------- reporting ----------------
    def _catch_up_later(self, m: Member, error: str) -> None:
        """Not at fault, or not known to be: `m` stays paused, not ready, and the resync loop catches it up."""
        m.state, m.last_error = "joining", error
        self._export(m)
        self._resync_wake.set()

    def _drop(self, m: Member, stage: str, error: Any) -> None:
        m.state, m.failures, m.last_error = "dropped", m.failures + 1, str(error)
        _FAILURES.labels(m.url, stage).inc()
        log.warning("server %s dropped (%s): %s; it is re-synced once /health answers", m.url, stage, error)
        self._export(m)
        self._resync_wake.set()

    def _export(self, m: Member) -> None:
        _SERVER_VERSION.labels(m.url).set(_as_int(m.version))
        _SERVER_READY.labels(m.url).set(1 if m.ready else 0)
