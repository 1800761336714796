"""The transports behind one protocol, with in-process fake servers: the tensor transport's buckets arrive
by reference and in order, inside a session, the version with the last; a server whose transport keeps
failing falls back down its chain (tensor -> distributed -> disk), counted and logged, and ends up synced."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncgrpo.genserver.weights import load_safetensors_dir
from asyncgrpo.sglang.client import SGLangError
from asyncgrpo.sglang.tensor_payload import bucket_tensors, deserialize
from asyncgrpo.utils.metrics import REGISTRY
from asyncgrpo.weight_sync import WeightPublisher
from asyncgrpo.weight_sync.service import WeightSyncService
from asyncgrpo.weight_sync.transports import fallback_chain

from .test_api_security import settings_in


class FakeServer:
    """The SGLang calls weight-sync makes, recorded; `fail` names the transports whose calls fail."""

    def __init__(self, url: str, fail: set[str], tp_size: int = 1) -> None:
        self.url, self.fail, self.tp_size = url, fail, tp_size
        self.version = "0"
        self.calls: list[str] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.in_session = False

    def _err(self, what: str) -> SGLangError:
        return SGLangError(self.url, what, f"{what} refused by the test")

    async def pause(self, mode: str = "abort") -> None:
        self.calls.append("pause")

    async def resume(self) -> None:
        self.calls.append("continue")

    async def begin_weight_update(self) -> dict[str, Any]:
        self.calls.append("begin")
        self.in_session = True
        return {}

    async def end_weight_update(self) -> dict[str, Any]:
        self.calls.append("end")
        self.in_session = False
        return {}

    async def health(self) -> bool:
        return True

    async def model_info(self) -> dict[str, Any]:
        return {"weight_version": self.version}

    async def server_info(self) -> dict[str, Any]:
        return {"tp_size": self.tp_size}

    async def init_weights_update_group(self, *a: Any, **k: Any) -> dict[str, Any]:
        self.calls.append("init_group")
        raise self._err("/init_weights_update_group")

    async def destroy_weights_update_group(self, group_name: str) -> dict[str, Any]:
        return {}

    async def update_weights_from_tensor(self, payloads: list[str], weight_version: str | None = None,
                                         load_format: str | None = None, flush_cache: bool = True) -> dict[str, Any]:
        self.calls.append(f"tensor:{weight_version}")
        if "tensor" in self.fail:
            raise self._err("/update_weights_from_tensor")
        assert self.in_session and load_format == "flattened_bucket" and len(payloads) == self.tp_size
        assert len(set(payloads)) == 1 or self.tp_size > 1  # one payload per TP rank, each its own pickle
        for payload in payloads:  # every rank maps the same bucket
            got = {n: t.clone() for n, t in bucket_tensors(deserialize(payload)).items()}
        self.weights.update(got)
        if weight_version is not None:
            self.version = weight_version
        return {"success": True}

    async def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> dict[str, Any]:
        self.calls.append(f"disk:{weight_version}")
        if "disk" in self.fail:
            raise self._err("/update_weights_from_disk")
        self.weights.update(load_safetensors_dir(model_path))
        self.version = str(weight_version)
        return {"success": True}

    async def aclose(self) -> None:
        pass


def _weights(version: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(version)
    return [("a.weight", torch.randn(8, 8, generator=g)), ("b.weight", torch.randn(16, generator=g)),
            ("c.weight", torch.randn(4, 8, generator=g))]


async def _service(tmp: Path, url: str, transport: str, fail: set[str],
                   tp_size: int = 1) -> tuple[WeightSyncService, FakeServer]:
    s = dataclasses.replace(settings_in(tmp), transport_fallback=True, tensor_device="cpu", group_timeout_s=0.5,
                            request_timeout_s=2.0, collective_timeout_s=2.0)
    service = WeightSyncService(s)
    await service.register(url, transport)  # its real client cannot reach the url: the pause is skipped
    fake = FakeServer(url, fail, tp_size)
    await service.members[url].client.aclose()
    service.members[url].client = fake  # type: ignore[assignment]
    return service, fake


def _fallbacks(url: str, old: str, new: str) -> float:
    return REGISTRY.get_sample_value("asyncgrpo_weight_sync_transport_fallbacks_total",
                                     {"server": url, "from_transport": old, "to_transport": new}) or 0.0


def test_tensor_transport_sends_every_bucket_by_reference_in_one_session(tmp_path: Path) -> None:
    async def main() -> FakeServer:
        service, fake = await _service(tmp_path, "http://fake-tensor:1", "tensor", set(), tp_size=2)
        pub = WeightPublisher(tmp_path / "snapshot", bucket_bytes=100)  # 3 buckets: 256, 64, 128 bytes
        pub.publish(_weights(1), 1)
        async with service._lock:
            await service._catch_up([service.members[fake.url]])
        assert service.members[fake.url].info() | {} == service.servers()[0]
        assert service.members[fake.url].state == "ready" and service.members[fake.url].version == "1"
        return fake

    fake = asyncio.run(main())
    # a catch-up first closes a session an earlier, dropped update may have left open
    assert fake.calls == ["end", "pause", "begin", "tensor:None", "tensor:None", "tensor:1", "end", "continue"]
    for name, t in _weights(1):
        assert torch.equal(fake.weights[name], t), name


def test_a_failing_transport_falls_back_down_the_chain_and_says_so(tmp_path: Path) -> None:
    url = "http://fake-fallback:1"
    before = (_fallbacks(url, "tensor", "distributed"), _fallbacks(url, "distributed", "disk"))

    async def main() -> tuple[FakeServer, list[dict[str, Any]]]:
        service, fake = await _service(tmp_path, url, "tensor", {"tensor"})
        m = service.members[url]
        pub = WeightPublisher(tmp_path / "snapshot", bucket_bytes=1 << 20)
        pub.publish(_weights(1), 1)
        seen = []
        for _ in range(2):  # the resync loop's catch-ups, by hand
            async with service._lock:
                await service._catch_up([m])
            seen.append(m.info())
        return fake, seen

    fake, seen = asyncio.run(main())
    # 1st catch-up: tensor fails 3 times (retried: the server is healthy), falls back to distributed, whose
    # join fails once: dropped. 2nd: the join fails again: falls back to disk, which syncs it.
    assert fake.calls.count("tensor:1") == 3 and fake.calls.count("init_group") == 2
    assert not fake.in_session  # every failed attempt's session was closed before the next
    assert seen[0]["state"] == "dropped" and seen[0]["transport"] == "distributed"
    assert "init_weights_update_group" in seen[0]["last_error"]
    assert seen[1]["state"] == "ready" and seen[1]["transport"] == "disk" and seen[1]["version"] == "1"
    for name, t in _weights(1):
        assert torch.equal(fake.weights[name], t), name
    assert fake.calls[-3:] == ["pause", "disk:1", "continue"]  # no session around a disk load, as SGLang
    after = (_fallbacks(url, "tensor", "distributed"), _fallbacks(url, "distributed", "disk"))
    assert after == (before[0] + 1, before[1] + 1)


def test_chains() -> None:
    assert fallback_chain("tensor", True) == ["tensor", "distributed", "disk"]
    assert fallback_chain("distributed", True) == ["distributed", "disk"]
    assert fallback_chain("disk", True) == ["disk"]
    assert fallback_chain("tensor", False) == ["tensor"]
    with pytest.raises(ValueError, match="carrier"):
        fallback_chain("carrier", True)


def test_a_transport_that_raises_leaves_no_server_paused_ready_or_in_a_session(tmp_path: Path, monkeypatch) -> None:
    """A send that raises (no memory for the staging buffer) and a disk checkpoint that cannot be written
    are failures of the servers' update like any other: sessions closed, no server marked ready, fallback."""
    from asyncgrpo.weight_sync import transports

    async def main() -> tuple[FakeServer, dict[str, Any], FakeServer, dict[str, Any]]:
        service, fake = await _service(tmp_path, "http://fake-raise:1", "tensor", set())
        pub = WeightPublisher(tmp_path / "snapshot", bucket_bytes=1 << 20)
        pub.publish(_weights(1), 1)
        m = service.members[fake.url]
        async with service._lock:
            await service._catch_up([m])
        assert m.ready and m.version == "1"

        def no_memory(self, src):  # noqa: ANN001, ANN202
            raise RuntimeError("CUDA out of memory (from the test)")
        monkeypatch.setattr(transports.TensorTransport, "_stage", no_memory)
        pub.publish(_weights(2), 2)
        async with service._lock:
            await service._update_ready()
        tensor_info = m.info()

        disk_service, disk = await _service(tmp_path / "d", "http://fake-disk:1", "disk", set())
        WeightPublisher(tmp_path / "d" / "snapshot", bucket_bytes=1 << 20).publish(_weights(1), 1)
        monkeypatch.setattr(transports, "write_checkpoint", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        d = disk_service.members[disk.url]
        async with disk_service._lock:
            await disk_service._catch_up([d])
        return fake, tensor_info, disk, d.info()

    fake, tensor_info, disk, disk_info = asyncio.run(main())
    # tensor: 3 attempts fail in send, each session closed; it falls back to distributed, whose join fails
    assert fake.calls.count("tensor:2") == 0 and not fake.in_session
    assert tensor_info["transport"] == "distributed" and tensor_info["state"] == "dropped"
    assert tensor_info["version"] == "1" and not tensor_info["ready"]
    # disk: the checkpoint fails before anything is paused
    assert "pause" not in disk.calls and disk_info["state"] == "dropped" and "disk full" in disk_info["last_error"]


class FakeCollective:
    """A collective transport whose send fails every member while `culprit` is among them."""

    name = "distributed"
    session = False
    collective = True

    def __init__(self, culprit: str) -> None:
        self.culprit, self.sends = culprit, []

    async def prepare(self, members, manifest, data, temporary):  # noqa: ANN001, ANN201
        return members, {}

    async def send(self, members, manifest, data, report):  # noqa: ANN001, ANN201
        self.sends.append([m.url for m in members])
        if any(m.url == self.culprit for m in members):
            return {m.url: "refused" if m.url == self.culprit else "group aborted: another member failed" for m in members}
        for m in members:
            m.client.version = str(manifest.version)
        return {}

    async def finish(self, members, temporary, failed):  # noqa: ANN001, ANN201
        return None

    def state(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None


def test_a_member_that_failed_with_others_is_caught_up_alone_and_only_the_culprit_falls_back(tmp_path: Path) -> None:
    async def main() -> tuple[FakeCollective, dict[str, dict[str, Any]]]:
        service, a = await _service(tmp_path, "http://fake-a:1", "distributed", set())
        await service.register("http://fake-b:1", "distributed")
        b = FakeServer("http://fake-b:1", set())
        await service.members[b.url].client.aclose()
        service.members[b.url].client = b  # type: ignore[assignment]
        fake_t = FakeCollective(culprit=b.url)
        service.transports["distributed"] = fake_t  # type: ignore[assignment]
        WeightPublisher(tmp_path / "snapshot", bucket_bytes=1 << 20).publish(_weights(1), 1)
        ms = [service.members[u] for u in (a.url, b.url)]
        async with service._lock:
            await service._catch_up(ms)  # together: 3 failures of both, nobody falls back
        assert [m.state for m in ms] == ["joining", "joining"] and all(m.solo for m in ms)
        assert [m.transport for m in ms] == ["distributed", "distributed"]
        async with service._lock:
            await service._catch_up(ms)  # alone: a succeeds; b fails 3 times on its own and falls back to disk
        return fake_t, {m.url: m.info() for m in ms}

    fake_t, info = asyncio.run(main())
    assert fake_t.sends[:3] == [["http://fake-a:1", "http://fake-b:1"]] * 3
    assert fake_t.sends[3] == ["http://fake-a:1"] and fake_t.sends[4:] == [["http://fake-b:1"]] * 3
    assert info["http://fake-a:1"]["ready"] and info["http://fake-a:1"]["transport"] == "distributed"
    assert info["http://fake-b:1"]["ready"] and info["http://fake-b:1"]["transport"] == "disk"
