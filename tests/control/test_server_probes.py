"""The control plane asks each generation server its state once per PROBE_TTL_S, however many requests want it
(the dashboard asks for a run's detail and its inspection at once), and a request that goes away does not take
a shared probe with it."""

from __future__ import annotations

import asyncio

from asyncgrpo.control import handlers
from asyncgrpo.control.handlers import ControlPlane
from asyncgrpo.control.models import ServerState


class Counting(ControlPlane):
    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no Redis: only the probes are used
        self.calls: list[str] = []

    async def _server(self, url: str) -> ServerState:
        self.calls.append(url)
        await asyncio.sleep(0.05)
        return ServerState(url=url, healthy=True, weight_version="3")


def test_concurrent_and_repeated_requests_share_one_probe(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(handlers, "PROBE_TTL_S", 0.5)
    cp = Counting()

    async def scenario() -> None:
        urls = ["http://a", "http://b"]
        a, b = await asyncio.gather(cp.servers(urls), cp.servers(urls))
        assert [s.url for s in a] == urls and a == b and sorted(cp.calls) == urls
        await cp.servers(urls)  # within the TTL: no new probe
        assert len(cp.calls) == 2
        # a request cancelled mid-probe leaves the shared probe running for the other one
        await asyncio.sleep(0.6)
        gone = asyncio.ensure_future(cp.servers(["http://a"]))
        stays = asyncio.ensure_future(cp.servers(["http://a"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert (await stays)[0].healthy and cp.calls.count("http://a") == 2
        await asyncio.sleep(0.6)
        await cp.servers(["http://b"])  # after the TTL: asked again
        assert cp.calls.count("http://b") == 2

    asyncio.run(scenario())
