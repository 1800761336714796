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

    def __init__(self, url: str, fail: set[str]) -> None:
        self.url, self.fail = url, fail
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
        assert self.in_session and load_format == "flattened_bucket" and len(payloads) == 1
        self.weights.update({n: t.clone() for n, t in bucket_tensors(deserialize(payloads[0])).items()})
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


async def _service(tmp: Path, url: str, transport: str, fail: set[str]) -> tuple[WeightSyncService, FakeServer]:
    s = dataclasses.replace(settings_in(tmp), transport_fallback=True, tensor_device="cpu", group_timeout_s=0.5,
                            request_timeout_s=2.0, collective_timeout_s=2.0)
    service = WeightSyncService(s)
    await service.register(url, transport)  # its real client cannot reach the url: the pause is skipped
    fake = FakeServer(url, fail)
    await service.members[url].client.aclose()
    service.members[url].client = fake  # type: ignore[assignment]
    return service, fake


def _fallbacks(url: str, old: str, new: str) -> float:
    return REGISTRY.get_sample_value("asyncgrpo_weight_sync_transport_fallbacks_total",
                                     {"server": url, "from_transport": old, "to_transport": new}) or 0.0


def test_tensor_transport_sends_every_bucket_by_reference_in_one_session(tmp_path: Path) -> None:
    async def main() -> FakeServer:
        service, fake = await _service(tmp_path, "http://fake-tensor:1", "tensor", set())
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
