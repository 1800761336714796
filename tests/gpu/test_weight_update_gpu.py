"""Weight updates into a genserver on the same GPU (run by benchmarks/gpu/run_all.sh on a lent GPU; skipped
without CUDA): the tensor transport hands each bucket over as a CUDA IPC handle; NCCL broadcast is tried
and, where NCCL refuses two ranks on one device, the test says so and skips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from asyncgrpo.utils.net import free_port
from asyncgrpo.weight_sync import WeightPublisher

from service_procs import start_genserver
from weight_sync.procs import Proc, export, server_weights_equal, start_weight_sync, wait_until

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu/run_all.sh on a GPU)")


class Setup:
    def __init__(self, root: Path, model_dir: Path, transport: str) -> None:
        self.root = root
        gport, wport = free_port(), free_port()
        self.url, self.ws_url = f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{wport}"
        self.procs: list[Proc] = [start_genserver(model_dir, gport, root / "genserver.log", "--device", "cuda", "--dtype",
                                                  "bfloat16", "--weight-version", "0", "--dist-timeout-s", "30")]
        ws: dict[str, Any] = {"port": wport, "snapshot_dir": str(root / "shm"), "bucket_size_mb": 0.02, "dtype": "bfloat16",
                              "group_timeout_s": 30, "collective_timeout_s": 30, "request_timeout_s": 30,
                              "resync_interval_s": 0.5, "transport_fallback": False}
        ws |= ({"servers": [], "tensor_servers": [self.url], "tensor_device": "cuda"} if transport == "tensor"
               else {"servers": [self.url], "backend": "nccl"})
        cfg = {"actor": {"path": str(model_dir)}, "fileroot": str(root / "runs"), "weight_sync": ws}
        self.procs.append(start_weight_sync(cfg, root, root / "weight_sync.log"))
        self.pub = WeightPublisher(root / "shm", service_url=self.ws_url, dtype="bfloat16", bucket_bytes=int(0.02 * (1 << 20)))

    def server(self) -> dict[str, Any]:
        return httpx.get(f"{self.ws_url}/servers", timeout=10).json()[0]

    def close(self) -> None:
        self.pub.close()
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def setup(request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path) -> Iterator[Setup]:
    s = Setup(tmp_path, tiny_model_dir, request.param)
    yield s
    s.close()


@pytest.mark.parametrize("setup", ["tensor"], indirect=True)
def test_cuda_ipc_update_into_a_genserver_on_the_same_gpu(setup: Setup, tiny_model_dir: Path) -> None:
    for v in (1, 2):
        w = export(tiny_model_dir, v)
        setup.pub.publish(w, v)
        wait_until(f"version {v}", lambda v=v: setup.server()["version"] == str(v) and setup.server()["ready"], 120, setup.procs)
        server_weights_equal(setup.url, w, torch.bfloat16)
    assert setup.server()["transport"] == "tensor"


@pytest.mark.parametrize("setup", ["distributed"], indirect=True)
def test_nccl_broadcast_to_a_genserver_on_the_same_gpu_or_say_why_not(setup: Setup, tiny_model_dir: Path) -> None:
    w = export(tiny_model_dir, 1)
    setup.pub.publish(w, 1)

    def settled() -> bool:
        s = setup.server()
        return s["state"] == "dropped" or (s["ready"] and s["version"] == "1")
    wait_until("the NCCL update to finish or fail", settled, 180, setup.procs)
    s = setup.server()
    if s["state"] == "dropped":
        pytest.skip(f"NCCL refused a broadcast between two ranks on one GPU: {s['last_error']}")
    server_weights_equal(setup.url, w, torch.bfloat16)
