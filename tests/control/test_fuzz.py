"""Schemathesis over the control plane's OpenAPI, served by uvicorn against a real redis-server holding a
registered run: every operation gets positive and negative bodies, paths and parameters and must answer
without a 5xx, with a status and body its OpenAPI documents, reject schema-violating requests, and refuse a
missing or wrong token on every mutation (schemathesis' ignored_auth check). Derandomized, no example
database. positive_data_acceptance is not checked: a well-formed request is rightly refused for the run's
state (409 after a stop) or for an unknown run (404)."""

from __future__ import annotations

import threading

import httpx
import pytest
import redis
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from asyncgrpo.config import load_config
from asyncgrpo.control.api import create_app
from asyncgrpo.control.handlers import ControlPlane
from asyncgrpo.queue.run_control import RunControl, redacted_config
from asyncgrpo.utils.net import free_port
from service_procs import wait_until

pytestmark = pytest.mark.slow
TOKEN = "fuzz-control-token"


@pytest.fixture(scope="module")
def control_url(tmp_path_factory):
    from conftest import RedisServer

    srv = RedisServer(tmp_path_factory.mktemp("redis_fuzz"))
    r = redis.Redis.from_url(srv.url)
    cfg = load_config(overrides={"experiment_name": "exp", "trial_name": "t1",
                                 "rollout": {"server_urls": ["http://127.0.0.1:9"]}})
    RunControl(r, cfg.run_id).register(redacted_config(cfg))
    port = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(create_app(ControlPlane(r, server_timeout_s=0.5), token=TOKEN),
                                           host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    wait_until("the control plane", lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, 30)
    try:
        yield url
    finally:
        server.should_exit = True
        t.join(10)
        srv.stop()


@pytest.fixture(scope="module")
def control_api(control_url):
    return schemathesis.openapi.from_url(f"{control_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("control_api")


@schema.parametrize()
@settings(max_examples=25, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_control_api(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=[positive_data_acceptance],
                           timeout=30)
