"""Rank 0's group never hangs: a peer that stops taking part or dies turns into an error within the deadline."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal

import pytest
import torch

from asyncgrpo.sglang.dist_group import init_custom_process_group
from asyncgrpo.utils.net import free_port
from asyncgrpo.weight_sync.group import BroadcastGroup, GroupTimeout

pytestmark = pytest.mark.slow


def _peer(port: int, name: str, behaviour: str, ready, joined) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    ready.set()  # imported and about to connect (it retries until rank 0's store listens)
    pg = init_custom_process_group("gloo", master_address="127.0.0.1", master_port=port, world_size=2, rank=1,
                                   group_name=name, timeout=30)
    buf = torch.empty(1 << 10, dtype=torch.uint8)
    torch.distributed.broadcast(buf, src=0, group=pg)  # one bucket works
    joined.set()
    if behaviour == "hang":
        signal.pause()  # alive, never receives again
    os._exit(0)  # dies without leaving the group


@pytest.mark.parametrize("behaviour", ["hang", "die"])
def test_broadcast_to_a_stuck_or_dead_peer_fails_within_the_deadline(behaviour: str) -> None:
    ctx = mp.get_context("spawn")
    port, name = free_port(), f"t-{behaviour}-{os.getpid()}"
    ready, joined = ctx.Event(), ctx.Event()
    peer = ctx.Process(target=_peer, args=(port, name, behaviour, ready, joined))
    peer.start()
    # a spawned process imports torch first (seconds under load): the group's short bound is for the broadcast
    # under test, not for the peer's start-up
    assert ready.wait(120), "the peer process did not start"
    try:
        async def scenario() -> None:
            g = BroadcastGroup(name=name, backend="gloo", master_address="127.0.0.1", master_port=port, world_size=2,
                               timeout_s=5)  # gloo's own bound: the abandoned thread ends after it
            await g.form(60)
            await g.broadcast(torch.ones(1 << 10, dtype=torch.uint8), 30)
            assert await asyncio.to_thread(joined.wait, 30)
            if behaviour == "die":
                await asyncio.to_thread(peer.join, 30)
            # 64 MiB: more than the socket buffers hold, so rank 0 needs the peer to receive
            with pytest.raises((GroupTimeout, RuntimeError)):
                await g.broadcast(torch.ones(64 << 20, dtype=torch.uint8), 3)
            assert g.broken
            with pytest.raises(RuntimeError, match="not usable"):
                await g.broadcast(torch.ones(8, dtype=torch.uint8), 3)
            await g.destroy()

        asyncio.run(scenario())
    finally:
        if peer.is_alive():
            peer.kill()
        peer.join(10)


def test_form_without_the_peers_times_out() -> None:
    async def scenario() -> None:
        g = BroadcastGroup(name=f"lonely-{os.getpid()}", backend="gloo", master_address="127.0.0.1",
                           master_port=free_port(), world_size=2, timeout_s=2)
        with pytest.raises((GroupTimeout, RuntimeError)):
            await g.form(1.5)
        assert g.broken

    asyncio.run(scenario())
