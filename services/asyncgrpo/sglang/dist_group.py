"""A torch.distributed process group made without init_process_group, shared by the weight-sync trainer
side (rank 0) and the generation servers (rank_offset ...).

Why not init_process_group: a server joins a new group per trainer (re)start over its life, and the
trainer already has its own default group (megatron). Each group rendezvouses over its own TCPStore,
namespaced by PrefixStore(group_name), and is registered in torch's world tables, so the usual
`dist.broadcast(t, src=0, group=pg)` works on it. Every collective on it times out after `timeout`.
(Same approach as SGLang's and verl's init_custom_process_group.) Rank 0 hosts the store on the master
address only, not on every interface as torch's tcp:// rendezvous would, and gloo's transport is pinned
to that address's interface (utils/net.py).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

from asyncgrpo.utils.net import is_loopback, pin_gloo_interface, tcp_store


def init_custom_process_group(backend: str, init_method: str | None = None, *, master_address: str | None = None,
                              master_port: int | None = None, world_size: int, rank: int, group_name: str,
                              timeout: timedelta | float = 60.0, bind_address: str | None = None) -> Any:
    """Join (rank > 0) or host (rank 0) a group; returns the ProcessGroup. Blocks until all ranks joined
    or `timeout` passes. Give either init_method ("tcp://host:port") or master_address + master_port. Rank 0
    listens on `bind_address` (default master_address, the address the others connect to)."""
    if init_method is not None:
        if not init_method.startswith("tcp://"):
            raise ValueError(f"init_method {init_method!r}: only tcp://host:port is supported")
        master_address, _, port = init_method.removeprefix("tcp://").rpartition(":")
        master_port = int(port)
    if master_address is None or master_port is None:
        raise ValueError("init_custom_process_group: give init_method or master_address and master_port")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if str(backend) == "gloo" and rank == 0:
        pin_gloo_interface(bind_address or master_address)  # rank 0's transport listens where its store does
    elif str(backend) == "gloo" and is_loopback(master_address):
        pin_gloo_interface(master_address)  # everyone on this host: loopback only
    store = tcp_store(master_address, int(master_port), world_size, rank == 0, timeout, bind=bind_address)
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_custom_process_group(pg: Any) -> None:
    """Leave a group made by init_custom_process_group (idempotent).

    Then drop every reference to `pg` (`del pg`): a gloo group object that is only freed during interpreter
    shutdown, after its peer has gone, can abort the process at exit ("terminate called without an active
    exception"); freed right after this call it does not (measured, torch 2.13)."""
    try:
        # shutdown first: destroying a live gloo group aborts the process at exit ("terminate called ...")
        if hasattr(pg, "shutdown"):
            pg.shutdown()
        dist.destroy_process_group(pg)
    except (ValueError, RuntimeError, KeyError):
        pass
