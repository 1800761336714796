"""End to end with real processes: genservers, the `asyncgrpo weight-sync` service, real gloo, and a
plain HF model's parameters (perturbed per version) as the trainer's export."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from asyncgrpo.weight_sync import WeightPublisher

from asyncgrpo.utils.net import free_port
from .procs import Proc, export, server_weights_equal, start_genserver, start_weight_sync, wait_until

pytestmark = pytest.mark.slow


def model_version(url: str) -> str:
    return str(httpx.get(f"{url}/model_info", timeout=10).json()["weight_version"])


class Env:
    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root, self.model_dir = root, model_dir
        self.procs: list[Proc] = []
        self.genservers: dict[str, Proc] = {}

    def genserver(self, name: str, port: int | None = None) -> str:
        port = port or free_port()
        proc = start_genserver(self.model_dir, port, self.root / f"{name}.log")
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        self.genservers[url] = proc
        return url

    def servers(self) -> dict[str, dict[str, Any]]:
        return {s["url"]: s for s in httpx.get(f"{self.ws_url}/servers", timeout=10).json()}

    def wait_versions(self, want: dict[str, str], timeout: float = 90) -> None:
        def ok() -> bool:
            s = self.servers()
            return all(u in s and s[u]["ready"] and s[u]["version"] == v for u, v in want.items())
        wait_until(f"servers at versions {want}", ok, timeout, self.procs)

    def start_service(self, servers: list[str], disk_servers: list[str], port: int | None = None,
                      tensor_servers: Sequence[str] = ()) -> Proc:
        port = port or free_port()
        self.ws_url = f"http://127.0.0.1:{port}"
        cfg = {"actor": {"path": str(self.model_dir)}, "fileroot": str(self.root / "runs"),
               "weight_sync": {"port": port, "servers": servers, "disk_servers": disk_servers,
                               "tensor_servers": list(tensor_servers), "tensor_device": "cpu",
                               "snapshot_dir": str(self.root / "shm"), "bucket_size_mb": 0.02,
                               "group_timeout_s": 20, "collective_timeout_s": 20, "request_timeout_s": 20,
                               "resync_interval_s": 0.5}}
        proc = start_weight_sync(cfg, self.root, self.root / "weight_sync.log")
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def env(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Env]:
    e = Env(tmp_path, tiny_model_dir)
    yield e
    e.close()


def test_update_kill_rejoin_join_and_disk_fallback(env: Env, tiny_model_dir: Path) -> None:
    a, b, d = env.genserver("a"), env.genserver("b"), env.genserver("disk")
    service = env.start_service([a, b], [d])
    env.wait_versions({a: "0", b: "0", d: "0"})  # nothing published: every server holds the base (version 0)
    pub = WeightPublisher(env.root / "shm", service_url=env.ws_url, bucket_bytes=int(0.02 * (1 << 20)))

    # 1. an update reaches every server: weights equal the export, /model_info reports the version
    v1 = export(tiny_model_dir, 1)
    res = pub.publish(v1, 1)
    assert res.notified and res.blocked_s > 0
    env.wait_versions({a: "1", b: "1", d: "1"})
    for url in (a, b, d):
        server_weights_equal(url, v1)
        assert model_version(url) == "1"
    status = httpx.get(f"{env.ws_url}/status", timeout=10).json()
    assert status["last_update"]["bytes"] == res.bytes and status["last_update"]["gbps"] > 0
    assert status["last_trainer_blocked_s"] > 0
    assert len([x for x in status["servers"] if x["ready"]]) == 3

    # 2. a server dies during an update: the others get the version, the trainer keeps publishing
    proc_b = env.genservers[b]
    os.kill(proc_b.p.pid, signal.SIGSTOP)  # frozen: the update cannot finish until b is gone
    v2 = export(tiny_model_dir, 2)
    pub.publish(v2, 2)
    wait_until("update in progress", lambda: httpx.get(f"{env.ws_url}/status", timeout=10).json()["updating"], 30, env.procs)
    proc_b.p.kill()
    proc_b.p.wait(10)
    os.kill(proc_b.p.pid, signal.SIGCONT) if proc_b.p.poll() is None else None
    env.wait_versions({a: "2", d: "2"})
    server_weights_equal(a, v2)
    assert env.servers()[b]["state"] == "dropped" and env.servers()[b]["version"] == "1"
    v3 = export(tiny_model_dir, 3)
    pub.publish(v3, 3)  # the group is rebuilt without b
    env.wait_versions({a: "3", d: "3"})
    server_weights_equal(a, v3)
    metrics = httpx.get(f"{env.ws_url}/metrics", timeout=10).text
    assert f'asyncgrpo_weight_sync_failures_total{{server="{b}",stage="update"}} 1.0' in metrics

    # 3. the dead server comes back on its port: it is re-synced to the current version before it is ready
    port_b = int(b.rsplit(":", 1)[1])
    env.genserver("b2", port_b)
    env.wait_versions({b: "3"})
    server_weights_equal(b, v3)
    assert model_version(b) == "3"

    # 4. a new server registers mid-run: it serves the current version once ready
    c = env.genserver("c")
    r = httpx.post(f"{env.ws_url}/servers", json={"url": c}, timeout=30)
    r.raise_for_status()
    assert r.json()["ready"] is False
    env.wait_versions({c: "3"})
    server_weights_equal(c, v3)
    assert model_version(c) == "3"
    out = httpx.post(f"{c}/generate", json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}, timeout=30).json()
    assert out["meta_info"]["weight_version"] == "3"

    # 5. the next version reaches the whole rebuilt group and the disk server
    v4 = export(tiny_model_dir, 4)
    pub.publish(v4, 4)
    env.wait_versions({a: "4", b: "4", c: "4", d: "4"})
    for url in (a, b, c, d):
        server_weights_equal(url, v4)

    # 6. a server leaves: it is no longer updated
    assert httpx.delete(f"{env.ws_url}/servers", params={"url": c}, timeout=30).status_code == 200
    pub.publish(export(tiny_model_dir, 5), 5)
    env.wait_versions({a: "5", b: "5", d: "5"})
    assert c not in env.servers() and model_version(c) == "4"

    # 7. the service restarts: servers already at the newest snapshot are ready again without an update
    service.stop()
    env.start_service([a, b], [d], port=int(env.ws_url.rsplit(":", 1)[1]))
    env.wait_versions({a: "5", b: "5", d: "5"})
    assert httpx.get(f"{env.ws_url}/status", timeout=10).json()["last_update"] is None

    # 8. the trainer restarts from an older checkpoint and publishes version 5 again, with other weights: the
    # servers' "5" is a dead branch's, so they are updated although the label is the same
    pub.close()
    pub = WeightPublisher(env.root / "shm", service_url=env.ws_url, bucket_bytes=int(0.02 * (1 << 20)))
    v5b = export(tiny_model_dir, 6)
    pub.publish(v5b, 5)

    def updated() -> bool:
        try:
            for url in (a, b, d):
                server_weights_equal(url, v5b)
        except AssertionError:
            return False
        return True

    wait_until("the republished version 5 on every server", updated, 90, env.procs)
    env.wait_versions({a: "5", b: "5", d: "5"})


def test_tensor_transport_beside_a_broadcast_group_and_through_a_restart(env: Env, tiny_model_dir: Path) -> None:
    """A server on this host gets each bucket by reference (/update_weights_from_tensor, shared memory on CPU:
    the code path CUDA IPC takes on a GPU) while another is in the broadcast group; killed and restarted, it is
    caught up over the same transport."""
    a, t = env.genserver("a"), env.genserver("t")
    env.start_service([a], [], tensor_servers=[t])
    env.wait_versions({a: "0", t: "0"})
    assert env.servers()[t]["transport"] == "tensor" and env.servers()[t]["chain"] == ["tensor", "distributed", "disk"]
    pub = WeightPublisher(env.root / "shm", service_url=env.ws_url, bucket_bytes=int(0.02 * (1 << 20)))
    for v in (1, 2):
        w = export(tiny_model_dir, v)
        pub.publish(w, v)
        env.wait_versions({a: str(v), t: str(v)})
        server_weights_equal(t, w)
        server_weights_equal(a, w)
    proc_t = env.genservers[t]
    proc_t.p.kill()
    proc_t.p.wait(10)
    w3 = export(tiny_model_dir, 3)
    pub.publish(w3, 3)
    env.wait_versions({a: "3"})
    env.genserver("t2", int(t.rsplit(":", 1)[1]))
    env.wait_versions({t: "3"})
    server_weights_equal(t, w3)
    assert env.servers()[t]["transport"] == "tensor"
    metrics = httpx.get(f"{env.ws_url}/metrics", timeout=10).text
    assert "asyncgrpo_weight_sync_transport_fallbacks_total{" not in metrics
    pub.close()


def test_a_server_restarted_between_updates_is_caught_up_without_a_new_version(env: Env, tiny_model_dir: Path) -> None:
    """A server killed and restarted on its URL after its update landed (CI saw it killed right after
    end_weight_update) serves its base weights while weight-sync still counts it at the version it gave it. Its
    groups are all stale, so the trainer publishes nothing new: only the periodic version check can catch it up."""
    a = env.genserver("a")
    env.start_service([a], [])
    env.wait_versions({a: "0"})
    pub = WeightPublisher(env.root / "shm", service_url=env.ws_url, bucket_bytes=int(0.02 * (1 << 20)))
    v1 = export(tiny_model_dir, 1)
    pub.publish(v1, 1)
    env.wait_versions({a: "1"})
    proc = env.genservers[a]
    proc.p.kill()
    proc.p.wait(10)
    env.genserver("a2", int(a.rsplit(":", 1)[1]))  # same URL, the base weights
    wait_until("the restarted server back at version 1 (nothing new published)", lambda: model_version(a) == "1", 90,
               env.procs)
    server_weights_equal(a, v1)
    env.wait_versions({a: "1"})
    metrics = httpx.get(f"{env.ws_url}/metrics", timeout=10).text
    assert f'asyncgrpo_weight_sync_failures_total{{server="{a}",stage="version"}} 1.0' in metrics
    pub.close()


def test_real_megatron_trainer_export_reaches_genserver(env: Env, tiny_model_dir: Path) -> None:
    """The megatron-core trainer's HF export, published through WeightPublisher.from_config as the trainer
    command does, lands bit-exactly on a genserver."""
    from asyncgrpo.config import load_config
    from asyncgrpo.trainer.model import destroy_parallel, init_parallel
    from asyncgrpo.trainer.train_step import GRPOTrainer

    a = env.genserver("a")
    env.start_service([a], [])
    env.wait_versions({a: "0"})
    port = int(env.ws_url.rsplit(":", 1)[1])
    cfg = load_config([], [f"--actor.path={tiny_model_dir}", f"--weight_sync.port={port}",
                           f"--weight_sync.snapshot_dir={env.root / 'shm'}", "--weight_sync.bucket_size_mb=0.02"])
    torch.set_num_threads(1)
    init_parallel(1, seed=0)
    try:
        trainer = GRPOTrainer(cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # stands in for an optimizer step: every megatron parameter moves
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        publish = WeightPublisher.from_config(cfg).publish
        res = publish(trainer.export_hf(), 1)
        exported = list(trainer.export_hf())
    finally:
        destroy_parallel()
    assert res.notified
    env.wait_versions({a: "1"})
    server_weights_equal(a, exported)
    assert model_version(a) == "1"
