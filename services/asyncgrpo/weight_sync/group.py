"""Rank 0 of a broadcast group: form it, broadcast a bucket, leave it; every step bounded in time.

Blocking torch.distributed calls run in worker threads and are awaited with a deadline, so the asyncio
loop keeps serving HTTP (the servers' update requests must be in flight while rank 0 broadcasts) and a
peer that never shows up costs a timeout, not a hang. A thread abandoned at its deadline still ends on
its own: the group's gloo/nccl timeout is the same bound.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncgrpo.sglang.dist_group import destroy_custom_process_group, init_custom_process_group


class GroupTimeout(RuntimeError):
    """A rendezvous or collective of the broadcast group did not finish in time."""


@dataclass
class BroadcastGroup:
    name: str
    backend: str
    master_address: str
    master_port: int
    world_size: int
    timeout_s: float
    bind_address: str | None = None  # where rank 0's store listens; None: master_address
    pg: Any = None
    broken: bool = False
    # One collective at a time on a group: an abandoned (timed-out) broadcast must not interleave.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def form(self, deadline_s: float) -> None:
        """Host the rendezvous as rank 0 (the servers join concurrently through their HTTP init call)."""
        def _init() -> Any:
            return init_custom_process_group(self.backend, master_address=self.master_address, master_port=self.master_port,
                                             bind_address=self.bind_address,
                                             world_size=self.world_size, rank=0, group_name=self.name, timeout=self.timeout_s)
        try:
            self.pg = await asyncio.wait_for(asyncio.to_thread(_init), deadline_s)
        except asyncio.TimeoutError:
            self.broken = True
            raise GroupTimeout(f"group {self.name}: not all {self.world_size} ranks joined within {deadline_s:.0f}s") from None
        except Exception:
            self.broken = True
            raise

    async def broadcast(self, t: torch.Tensor, deadline_s: float) -> None:
        """Broadcast `t` from rank 0; GroupTimeout (and the group marked broken) if it takes longer."""
        if self.pg is None or self.broken:
            raise RuntimeError(f"group {self.name} is not usable (formed={self.pg is not None}, broken={self.broken})")
        if self.backend == "nccl" and t.device.type != "cuda":
            t = t.to("cuda", non_blocking=False)

        def _bcast() -> None:
            with self._lock:
                torch.distributed.broadcast(t, src=0, group=self.pg)
                if t.device.type == "cuda":
                    torch.cuda.synchronize(t.device)
        try:
            await asyncio.wait_for(asyncio.to_thread(_bcast), deadline_s)
        except asyncio.TimeoutError:
            self.broken = True
            raise GroupTimeout(f"group {self.name}: broadcast of {t.numel()} bytes not done within {deadline_s:.0f}s") from None
        except Exception:
            self.broken = True
            raise

    async def destroy(self, deadline_s: float = 10.0) -> None:
        pg, self.pg, self.broken = self.pg, None, True
        if pg is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(destroy_custom_process_group, pg), deadline_s)
        except (asyncio.TimeoutError, RuntimeError):
            pass  # abandoned: its threads end at the gloo timeout
