"""The real sglang-router (PyPI sglang-router, Rust) in front of two genservers routes /generate to both."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest

from asyncgrpo.sglang.client import SGLangClient

from .procs import GenServer, free_port

pytestmark = pytest.mark.slow
PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]


@pytest.fixture
def router(genserver, tiny_model_dir, tmp_path):
    pytest.importorskip("sglang_router", reason="sglang-router is a test dependency; pip install sglang-router")
    second = GenServer(tiny_model_dir, tmp_path / "second.log")
    port = free_port()
    log = open(tmp_path / "router.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port",
                             str(port), "--policy", "round_robin", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), "--worker-urls", genserver.url, second.url],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "router.log").read_text()[-3000:]
            try:
                workers = httpx.get(f"{url}/workers", timeout=2).json()["workers"]
                if len(workers) == 2 and all(w["is_healthy"] for w in workers):
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, "router did not register both workers in 60 s"
            time.sleep(0.2)
        yield url, [genserver.url, second.url]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        second.stop()


def test_router_spreads_generate_over_both_genservers(router) -> None:
    url, workers = router

    def tokens() -> list[int]:
        return [httpx.get(f"{w}/server_info").json()["internal_states"][0]["tokens"] for w in workers]

    before = tokens()

    async def main():
        async with SGLangClient(url) as c:
            return [await c.generate(PROMPT, {"max_new_tokens": 5, "ignore_eos": True}, rid=f"via-router-{i}")
                    for i in range(6)]

    results = asyncio.run(main())
    assert all(len(r.output_ids) == 5 and len(r.output_logprobs) == 5 and r.rid == f"via-router-{i}"
               for i, r in enumerate(results))
    gained = [a - b for a, b in zip(tokens(), before)]
    assert sum(gained) == 30 and all(g > 0 for g in gained), gained
