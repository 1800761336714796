"""init_custom_process_group: groups without init_process_group, joinable many times, bounded by a timeout."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from asyncgrpo.sglang.dist_group import destroy_custom_process_group, init_custom_process_group

from .procs import free_port


_PEER = """
import sys, torch, torch.distributed as dist
from asyncgrpo.sglang.dist_group import init_custom_process_group, destroy_custom_process_group
for port in map(int, sys.argv[1:]):
    pg = init_custom_process_group("gloo", master_address="127.0.0.1", master_port=port, world_size=2, rank=1,
                                   group_name="weight_update_group", timeout=20)
    t = torch.zeros(6)
    dist.broadcast(t, src=0, group=pg)
    print(t.tolist(), flush=True)
    destroy_custom_process_group(pg)
    del pg  # freed now, not at interpreter exit
"""


def test_same_group_name_twice_without_a_default_group() -> None:
    """Rank 0 here, rank 1 in another process; the group is destroyed and made again under the same name
    (a trainer restart), and neither process ever calls init_process_group."""
    ports = [free_port(), free_port()]
    peer = subprocess.Popen([sys.executable, "-c", _PEER, *map(str, ports)], stdout=subprocess.PIPE, text=True)
    try:
        for i, port in enumerate(ports):
            pg = init_custom_process_group("gloo", master_address="127.0.0.1", master_port=port, world_size=2,
                                           rank=0, group_name="weight_update_group", timeout=20)
            dist.broadcast(torch.arange(6.0) + i, src=0, group=pg)
            destroy_custom_process_group(pg)
            del pg
        out, _ = peer.communicate(timeout=60)
    finally:
        if peer.poll() is None:
            peer.kill()
    assert peer.returncode == 0
    assert out.split("\n")[:2] == [str([float(x) for x in range(6)]), str([float(x + 1) for x in range(6)])]
    assert not dist.is_initialized()


def test_joining_without_a_master_times_out() -> None:
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - torch raises DistStoreError / RuntimeError depending on version
        init_custom_process_group("gloo", master_address="127.0.0.1", master_port=free_port(), world_size=2, rank=1,
                                  group_name="nobody-home", timeout=1.5)
    assert time.monotonic() - t0 < 30


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="init_method or master_address"):
        init_custom_process_group("gloo", world_size=2, rank=0, group_name="x")
    with pytest.raises(ValueError, match="outside world_size"):
        init_custom_process_group("gloo", init_method="tcp://127.0.0.1:1", world_size=2, rank=2, group_name="x")
