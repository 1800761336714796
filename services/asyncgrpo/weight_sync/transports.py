"""How a policy version reaches a generation server: one class per transport, one protocol for all.

The protocol, run by WeightSyncService._deliver for every transport (slime's and SGLang's order):

    prepare (form the broadcast group, learn TP sizes, write the disk checkpoint: nothing is paused yet)
    -> pause_generation -> begin_weight_update (if `session`)
    -> send (the transport's own calls, bucket by bucket; the version rides on the last one)
    -> end_weight_update (if `session`) -> continue_generation (members that got the version)

A transport only implements prepare / send / finish; it never pauses, resumes or drops a server. It
reports failures as {url: error}; the service health-checks, retries, falls back to the next transport of
the server's chain (tensor -> distributed -> disk) or drops it, and says so in logs and metrics.

- BroadcastTransport ("distributed"): rank 0 of a torch.distributed group (nccl on GPU, gloo on CPU) with
  the servers; each bucket is one broadcast of a flattened_bucket view of the snapshot (zero copy).
- TensorTransport ("tensor"): a server on this host (the same GPU on GPU) gets each bucket by reference
  through /update_weights_from_tensor: a CUDA IPC handle of a staging buffer on the GPU, or on CPU the name
  of a shared-memory staging buffer (the same code path, so CI runs it).
- DiskTransport ("disk"): an HF safetensors checkpoint written once per version, loaded by
  /update_weights_from_disk; the last resort for a server that can reach neither of the above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from asyncgrpo.sglang.client import SGLangError
from asyncgrpo.utils.net import free_port
from asyncgrpo.weight_sync.checkpoint import write_checkpoint
from asyncgrpo.weight_sync.group import BroadcastGroup
from asyncgrpo.weight_sync.settings import SyncSettings
from asyncgrpo.weight_sync.snapshot import Manifest

if TYPE_CHECKING:
    from asyncgrpo.weight_sync.service import Member, UpdateReport

log = logging.getLogger("asyncgrpo.weight_sync")

CALL_ERRORS = (SGLangError, asyncio.TimeoutError, OSError)
Errors = dict[str, str]
# the error of a member that failed only because another member of the same collective did
ABORTED = "group aborted: another member failed"


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def call_each(members: list["Member"], make: Callable[["Member"], Awaitable[Any]], timeout: float,
                    errors: Errors, what: str = "") -> None:
    """Run make(m) for every member at once, each bounded by `timeout`; the first error of each lands in errors."""
    async def one(m: "Member") -> None:
        try:
            await asyncio.wait_for(make(m), timeout)
        except CALL_ERRORS as e:
            errors.setdefault(m.url, f"{what}{describe(e)}")
    await asyncio.gather(*(one(m) for m in members))


class Transport(Protocol):
    name: ClassVar[str]
    session: ClassVar[bool]  # the update runs between begin_weight_update and end_weight_update
    collective: ClassVar[bool]  # one member's failure fails every member of the same send

    async def prepare(self, members: list["Member"], manifest: Manifest, data: torch.Tensor,
                      temporary: bool) -> tuple[list["Member"], Errors]:
        """The members ready to receive now, and {url: error} for those that cannot (e.g. failed to join)."""
        ...

    async def send(self, members: list["Member"], manifest: Manifest, data: torch.Tensor, report: "UpdateReport") -> Errors:
        """Deliver every bucket of `manifest` (the version with the last); {url: error} for the failed members."""
        ...

    async def finish(self, members: list["Member"], temporary: bool, failed: bool) -> None:
        """After a send: release what prepare made for this send (a temporary group, a group a failure broke)."""
        ...

    def state(self) -> dict[str, Any]:
        ...

    async def close(self) -> None:
        ...


class BroadcastTransport:
    name: ClassVar[str] = "distributed"
    session: ClassVar[bool] = True
    collective: ClassVar[bool] = True

    def __init__(self, settings: SyncSettings) -> None:
        self.s = settings
        self.group: BroadcastGroup | None = None  # the standing group of the ready servers
        self.group_members: list[Member] = []
        self._current: BroadcastGroup | None = None  # the group of the send in progress
        self._gen = 0

    def state(self) -> dict[str, Any]:
        return {"group": self.group.name if self.group and not self.group.broken else None,
                "group_members": [m.url for m in self.group_members]}

    async def prepare(self, members: list["Member"], manifest: Manifest, data: torch.Tensor,
                      temporary: bool) -> tuple[list["Member"], Errors]:
        if temporary:
            if self.s.master_port:  # one fixed rendezvous port: the standing group's store holds it
                await self.teardown()
            self._current, joined, errors = await self._form(members)
            return joined, errors
        g = self.group
        if (g is not None and not g.broken and [m.url for m in self.group_members] == [m.url for m in members]
                and all(m.group == g.name for m in members)):  # a member caught up alone since is in another group
            self._current = g
            return members, {}
        await self.teardown()
        group, joined, errors = await self._form(members)
        self.group, self.group_members, self._current = group, joined, group
        return joined, errors

    async def send(self, members: list["Member"], manifest: Manifest, data: torch.Tensor, report: "UpdateReport") -> Errors:
        group = self._current
        if group is None:
            return {m.url: "no broadcast group" for m in members}
        s, errors = self.s, {}
        buckets = manifest.layout.buckets
        t0 = time.perf_counter()
        for i, b in enumerate(buckets):
            last = i == len(buckets) - 1
            # every server posts its receive, then rank 0 broadcasts, then the replies are awaited
            calls = asyncio.create_task(call_each(members, lambda m: m.client.update_weights_from_distributed(
                b.names, b.dtypes, b.shapes, group.name, weight_version=str(manifest.version) if last else None,
                load_format="flattened_bucket", flush_cache=last), s.collective_timeout_s, errors))
            bcast_error: str | None = None
            tb = time.perf_counter()
            try:
                await group.broadcast(data[b.offset:b.offset + b.nbytes], s.collective_timeout_s)
                report.collective_s += time.perf_counter() - tb
            except Exception as e:  # noqa: BLE001 - any collective failure aborts this group
                bcast_error = f"broadcast: {describe(e)}"
            await calls
            if bcast_error or errors:
                return {m.url: errors.get(m.url) or bcast_error or ABORTED for m in members}
            report.bytes += b.nbytes
        report.broadcast_s += time.perf_counter() - t0
        return errors

    async def finish(self, members: list["Member"], temporary: bool, failed: bool) -> None:
        group, self._current = self._current, None
        if temporary and group is not None:
            await self._destroy(group, members)
        elif failed:  # a group is unusable after a failed collective: the next send forms a fresh one
            await self.teardown()

    async def teardown(self) -> None:
        if self.group is None:
            return
        group, members, self.group, self.group_members = self.group, self.group_members, None, []
        await self._destroy(group, members)

    async def forget(self, m: "Member") -> None:
        """`m` leaves the service: out of the standing group (which must then be rebuilt without it)."""
        if any(x is m for x in self.group_members):
            await self.teardown()
        await self._leave_old(m)

    async def close(self) -> None:
        await self.teardown()

    async def _destroy(self, group: BroadcastGroup, members: list["Member"]) -> None:
        async def one(m: "Member") -> None:
            if m.group == group.name:
                with contextlib.suppress(*CALL_ERRORS):
                    await asyncio.wait_for(m.client.destroy_weights_update_group(group.name), self.s.request_timeout_s)
                m.group = None
        await asyncio.gather(*(one(m) for m in members), group.destroy())

    async def _leave_old(self, m: "Member") -> None:
        if m.group:
            with contextlib.suppress(*CALL_ERRORS):
                await asyncio.wait_for(m.client.destroy_weights_update_group(m.group), self.s.request_timeout_s)
            m.group = None

    async def _form(self, members: list["Member"]) -> tuple[BroadcastGroup | None, list["Member"], Errors]:
        """A fresh group with as many of `members` as can join; {url: error} for the others."""
        s = self.s
        todo, failed = list(members), {}
        while todo:
            # a server still in an older group (e.g. after a failure) leaves it first
            await asyncio.gather(*(self._leave_old(m) for m in todo))
            self._gen += 1
            name = f"asyncgrpo-ws-{os.getpid()}-{self._gen}"
            # the store listens on the service's own interface (weight_sync.host); servers are told master_address
            port = s.master_port or free_port("" if s.host in ("0.0.0.0", "::") else s.host)
            group = BroadcastGroup(name=name, backend=s.backend, master_address=s.master_address, master_port=port,
                                   world_size=len(todo) + 1, timeout_s=s.collective_timeout_s, bind_address=s.host)
            errors: Errors = {}

            async def join(m: "Member", rank: int, name: str = name, port: int = port, world: int = len(todo) + 1) -> None:
                try:
                    await asyncio.wait_for(m.client.init_weights_update_group(
                        s.master_address, port, rank, world, name, s.backend), s.group_timeout_s)
                    m.group = name
                except CALL_ERRORS as e:
                    errors[m.url] = f"init_weights_update_group: {describe(e)}"

            results = await asyncio.gather(group.form(s.group_timeout_s), *(join(m, i + 1) for i, m in enumerate(todo)),
                                           return_exceptions=True)
            if not errors and not isinstance(results[0], BaseException):
                log.info("group %s formed: rank 0 + %s (%s, port %d)", name, [m.url for m in todo], s.backend, port)
                return group, todo, failed
            await self._destroy(group, todo)
            if not errors:
                raise RuntimeError(f"rank 0 could not host group {name} on port {port}: {results[0]}")
            failed.update(errors)
            todo = [m for m in todo if m.url not in errors]
        return None, [], failed


class TensorTransport:
    """Buckets by reference to servers on this host: a staging buffer (GPU memory on GPU, shared memory on CPU)
    holds one bucket at a time; every member maps it during its /update_weights_from_tensor call, so the
    buffer is rewritten only after all of them replied."""

    name: ClassVar[str] = "tensor"
    session: ClassVar[bool] = True
    collective: ClassVar[bool] = False

    def __init__(self, settings: SyncSettings) -> None:
        self.s = settings
        self._staging: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        d = self.s.tensor_device
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(d)

    def state(self) -> dict[str, Any]:
        return {"staging_bytes": 0 if self._staging is None else self._staging.numel(), "device": str(self.device)}

    def _stage(self, src: torch.Tensor) -> torch.Tensor:
        n = src.numel()
        if self._staging is None or self._staging.numel() < n:
            self._staging = None  # free the smaller one first
            if self.device.type == "cpu":
                free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else n
                if free < n:  # a short shared-memory mount would SIGBUS on the first write, not fail
                    raise OSError(f"/dev/shm has {free} bytes free, the tensor transport needs {n} for one bucket: "
                                  "give it more (docker: --shm-size) or lower weight_sync.bucket_size_mb")
                self._staging = torch.empty(n, dtype=torch.uint8).share_memory_()
            else:
                self._staging = torch.empty(n, dtype=torch.uint8, device=self.device)
        dst = self._staging[:n]
        dst.copy_(src)
        if dst.device.type == "cuda":
            torch.cuda.synchronize(dst.device)  # the receiver reads through its own stream
        return dst

    async def prepare(self, members: list["Member"], manifest: Manifest, data: torch.Tensor,
                      temporary: bool) -> tuple[list["Member"], Errors]:
        """Learn each new member's tensor-parallel size: SGLang wants one payload per TP rank."""
        errors: Errors = {}

        async def tp(m: "Member") -> None:
            if m.tp_size is None:
                info = await asyncio.wait_for(m.client.server_info(), self.s.request_timeout_s)
                m.tp_size = max(1, int(info.get("tp_size") or 1))
        await call_each(members, tp, self.s.request_timeout_s, errors, "server_info: ")
        return [m for m in members if m.url not in errors], errors

    async def send(self, members: list["Member"], manifest: Manifest, data: torch.Tensor, report: "UpdateReport") -> Errors:
        from asyncgrpo.sglang.tensor_payload import bucket_payload, serialize

        s, errors = self.s, {}
        buckets = manifest.layout.buckets
        t0 = time.perf_counter()
        for i, b in enumerate(buckets):
            last = i == len(buckets) - 1
            todo = [m for m in members if m.url not in errors]
            if not todo:
                break
            flat = await asyncio.to_thread(self._stage, data[b.offset:b.offset + b.nbytes])
            obj = bucket_payload(flat, b.names, b.dtypes, b.shapes)
            # one payload per TP rank, each serialized on its own: ranks sharing one CUDA IPC reference would
            # break its reference counting (SGLang's Engine does the same)
            payloads = {n: [serialize(obj) for _ in range(n)] for n in {m.tp_size or 1 for m in todo}}
            await call_each(todo, lambda m: m.client.update_weights_from_tensor(
                payloads[m.tp_size or 1], weight_version=str(manifest.version) if last else None,
                load_format="flattened_bucket", flush_cache=last), s.collective_timeout_s, errors)
            report.bytes += b.nbytes
        report.broadcast_s += time.perf_counter() - t0
        return errors

    async def finish(self, members: list["Member"], temporary: bool, failed: bool) -> None:
        return None

    async def close(self) -> None:
        self._staging = None


class DiskTransport:
    name: ClassVar[str] = "disk"
    session: ClassVar[bool] = False  # SGLang loads from disk outside a session
    collective: ClassVar[bool] = False

    def __init__(self, settings: SyncSettings) -> None:
        self.s = settings
        self._ckpt: tuple[tuple[int, float], str] | None = None  # (version, published_at) -> checkpoint dir

    def state(self) -> dict[str, Any]:
        return {"checkpoint": self._ckpt[1] if self._ckpt else None}

    async def prepare(self, members: list["Member"], manifest: Manifest, data: torch.Tensor,
                      temporary: bool) -> tuple[list["Member"], Errors]:
        """Write the checkpoint of `manifest` (once per version) before any server is paused for it."""
        s = self.s
        if self._ckpt is None or self._ckpt[0] != (manifest.version, manifest.published_at):
            path = await asyncio.to_thread(write_checkpoint, manifest, data, s.checkpoint_dir, s.base_model_path,
                                           s.keep_checkpoints)
            self._ckpt = ((manifest.version, manifest.published_at), str(path))
        return members, {}

    async def send(self, members: list["Member"], manifest: Manifest, data: torch.Tensor, report: "UpdateReport") -> Errors:
        s = self.s
        errors: Errors = {}
        await call_each(members, lambda m: m.client.update_weights_from_disk(self._ckpt[1], weight_version=str(manifest.version)),  # type: ignore[index]
                        s.collective_timeout_s, errors)
        return errors

    async def finish(self, members: list["Member"], temporary: bool, failed: bool) -> None:
        return None

    async def close(self) -> None:
        return None


TRANSPORTS: tuple[str, ...] = (TensorTransport.name, BroadcastTransport.name, DiskTransport.name)


def fallback_chain(first: str, enabled: bool) -> list[str]:
    """The transports a server tries, from its configured one down (tensor -> distributed -> disk)."""
    if first not in TRANSPORTS:
        raise ValueError(f"transport {first!r}: use one of {TRANSPORTS}")
    return list(TRANSPORTS[TRANSPORTS.index(first):]) if enabled else [first]


def build_transports(settings: SyncSettings) -> dict[str, Transport]:
    return {t.name: t(settings) for t in (TensorTransport, BroadcastTransport, DiskTransport)}
