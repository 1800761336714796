"""Keys on real genserver processes, as SGLang's --api-key / --admin-api-key: every state-changing endpoint
answers 401 without a key or with a wrong one and 200/400 with the right one; probes and metrics stay open; the
client sends the right key per endpoint; a client that disconnects is still noticed through the middleware; and
a server on a non-loopback address refuses to start without a key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from asyncgrpo.sglang.client import SGLangClient, SGLangError
from asyncgrpo.utils.auth import ENV_ADMIN_API_KEY, ENV_API_KEY

from service_procs import start_genserver

from .procs import GenServer, free_port

pytestmark = pytest.mark.slow
API, ADMIN = "api-key-for-tests", "admin-key-for-tests"
PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]

# SGLang 0.5.23 marks these ADMIN_OPTIONAL (sglang/srt/entrypoints/http_server.py); every other POST is /generate
ADMIN_CALLS = [
    ("POST", "/abort_request", {"rid": "nothing-runs"}, 200),
    ("POST", "/pause_generation", {"mode": "in_place"}, 200),
    ("POST", "/continue_generation", {}, 200),
    ("POST", "/flush_cache", None, 200),
    ("GET", "/flush_cache", None, 200),
    ("POST", "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 5,
                                            "world_size": 2}, 400),  # refused by validation: nothing is joined
    ("POST", "/destroy_weights_update_group", {"group_name": "none"}, 400),
    ("POST", "/begin_weight_update", {}, 200),
    ("POST", "/end_weight_update", {}, 200),
    ("POST", "/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}, 400),
    ("POST", "/update_weights_from_tensor", {"serialized_named_tensors": ["%%%"]}, 400),
    ("POST", "/update_weights_from_disk", {"model_path": "/nonexistent/ckpt"}, 400),
    ("POST", "/update_weight_version", {"new_version": "default", "abort_all_requests": False}, 200),
    ("POST", "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 2}, 200),
    ("GET", "/get_weights_by_name?name=model.norm.weight&truncate_size=2", None, 200),
]
NORMAL_CALLS = [
    ("POST", "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}, 200),
    ("GET", "/model_info", None, 200), ("GET", "/get_model_info", None, 200), ("GET", "/server_info", None, 200),
    ("GET", "/get_server_info", None, 200), ("GET", "/v1/loads", None, 200), ("GET", "/openapi.json", None, 200),
]
OPEN_CALLS = [("GET", "/health", None, 200), ("GET", "/health_generate", None, 200), ("GET", "/metrics", None, 200)]


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    srv = GenServer(tiny_model_dir, tmp_path_factory.mktemp("gs_keys") / "server.log", "--api-key", API,
                    "--admin-api-key", ADMIN)
    try:
        yield srv
    finally:
        srv.stop()


def call(url: str, method: str, path: str, body: dict | None, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.request(method, url + path, json=body, headers=headers, timeout=60)


def test_every_state_changing_endpoint_needs_its_key(keyed) -> None:
    for method, path, body, ok in ADMIN_CALLS:
        for key in (None, "wrong", API):  # with both keys set, admin endpoints take only the admin key
            r = call(keyed.url, method, path, body, key)
            assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"}), (method, path, key, r.text)
        r = call(keyed.url, method, path, body, ADMIN)
        assert r.status_code == ok, (method, path, r.status_code, r.text)
    for method, path, body, ok in NORMAL_CALLS:
        for key in (None, "wrong", ADMIN):  # and normal endpoints only the api key
            assert call(keyed.url, method, path, body, key).status_code == 401, (method, path, key)
        assert call(keyed.url, method, path, body, API).status_code == ok, (method, path)
    for method, path, body, ok in OPEN_CALLS:
        assert call(keyed.url, method, path, body, None).status_code == ok, path
    assert call(keyed.url, "POST", "/no_such_endpoint", {}, None).status_code == 401  # nothing revealed without a key


def test_the_admin_set_is_complete(keyed) -> None:
    """Every operation the server offers is classified above: a new endpoint must choose its level."""
    doc = call(keyed.url, "GET", "/openapi.json", None, API).json()
    listed = {(m, p.split("?")[0]) for m, p, *_ in ADMIN_CALLS + NORMAL_CALLS + OPEN_CALLS}
    offered = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert offered == listed - {("GET", "/openapi.json")}
    def secured(scheme: str) -> set:
        return {(m.upper(), p) for p, ops in doc["paths"].items() for m, op in ops.items()
                if op.get("security") == [{scheme: []}]}

    assert secured("adminBearer") == {(m, p.split("?")[0]) for m, p, *_ in ADMIN_CALLS}
    assert secured("bearer") == {(m, p) for m, p, *_ in NORMAL_CALLS} - {("GET", "/openapi.json")}
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "adminBearer"}


def test_client_sends_the_right_key_per_endpoint(keyed) -> None:
    async def main():
        async with SGLangClient(keyed.url, api_key=API, admin_api_key=ADMIN) as c:
            res = await c.generate(PROMPT, {"max_new_tokens": 3, "ignore_eos": True})
            await c.pause("in_place")
            await c.resume()
            w = await c.get_weights_by_name("model.norm.weight", truncate_size=2)
            info = await c.server_info()
        async with SGLangClient(keyed.url) as anonymous:
            with pytest.raises(SGLangError, match="HTTP 401 Unauthorized: no key was sent; give the server's api_key") as e1:
                await anonymous.generate(PROMPT, {"max_new_tokens": 1})
            assert await anonymous.health()  # open
        async with SGLangClient(keyed.url, api_key=API) as normal_only:
            await normal_only.generate(PROMPT, {"max_new_tokens": 1})
            with pytest.raises(SGLangError, match="HTTP 401 Unauthorized: the key was refused; give the server's "
                                                  r"admin_api_key \(or api_key\)") as e2:
                await normal_only.pause("in_place")
        return res, w, info, e1.value, e2.value

    res, w, info, e1, e2 = asyncio.run(main())
    assert len(res.output_ids) == 3 and w == [1.0, 1.0] and info["internal_states"][0]["paused"] is None
    assert e1.status == e2.status == 401 and API not in str(e2) and ADMIN not in str(e2)


def test_a_disconnected_client_is_still_noticed_through_the_middleware(keyed) -> None:
    async def main():
        async with SGLangClient(keyed.url, api_key=API, admin_api_key=ADMIN) as admin, \
                SGLangClient(keyed.url, api_key=API, timeout_s=0.5, retries=0) as c:
            await admin.pause("in_place")
            try:
                with pytest.raises(SGLangError, match="may have run"):
                    await c.generate([5, 6, 7], {"max_new_tokens": 2}, rid="gone-1")
                for _ in range(100):  # the server notices the client went away and drops the waiting request
                    waiting = (await admin.loads())["loads"][0]["num_waiting_reqs"]
                    if waiting == 0:
                        break
                    await asyncio.sleep(0.05)
            finally:
                await admin.abort("gone-")
                await admin.resume()
            return waiting

    assert asyncio.run(main()) == 0


def test_only_an_api_key_guards_admin_endpoints_too(tiny_model_dir, tmp_path) -> None:
    srv = GenServer(tiny_model_dir, tmp_path / "server.log", "--api-key", API)
    try:
        assert call(srv.url, "POST", "/pause_generation", {"mode": "in_place"}, None).status_code == 401
        assert call(srv.url, "POST", "/pause_generation", {"mode": "in_place"}, API).status_code == 200
        assert call(srv.url, "POST", "/continue_generation", {}, ADMIN).status_code == 401

        async def main():
            async with SGLangClient(srv.url, api_key=API) as c:  # its api key also goes to admin endpoints
                await c.resume()
                return await c.generate(PROMPT, {"max_new_tokens": 2, "ignore_eos": True})

        assert len(asyncio.run(main()).output_ids) == 2
    finally:
        srv.stop()


def test_keys_from_the_environment(tiny_model_dir, tmp_path) -> None:
    port = free_port()
    srv = start_genserver(tiny_model_dir, port, tmp_path / "server.log", "--threads", "1",
                          env={ENV_API_KEY: "", ENV_ADMIN_API_KEY: ADMIN})
    url = f"http://127.0.0.1:{port}"
    try:
        # admin key only: normal endpoints open, admin endpoints need the key
        assert call(url, "GET", "/model_info", None, None).status_code == 200
        assert call(url, "POST", "/pause_generation", {}, None).status_code == 401
        assert call(url, "POST", "/pause_generation", {}, "not-the-key").status_code == 401
        assert call(url, "POST", "/continue_generation", {}, ADMIN).status_code == 200
    finally:
        srv.stop()


def test_non_loopback_without_a_key_refuses_to_start_in_one_line(tiny_model_dir) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_API_KEY, ENV_ADMIN_API_KEY)}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "asyncgrpo.cli", "genserver", "--model", str(tiny_model_dir),
                        "--host", "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 2 and time.monotonic() - t0 < 30
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "refusing to serve on 0.0.0.0 without a key" in lines[0] and "--api-key/--admin-api-key" in lines[0]
    assert ENV_API_KEY in lines[0] and ENV_ADMIN_API_KEY in lines[0]


def test_loopback_without_a_key_warns_once(genserver) -> None:
    lines = [ln for ln in genserver.tail(1 << 20).splitlines() if "no --api-key/--admin-api-key" in ln]
    assert len(lines) == 1 and " WARNING " in lines[0], lines
    assert Path(genserver.log).exists()
