"""The generation pod's readiness gate: deploy/healthcheck.py --weight-sync-ready (the chart's register sidecar runs
it as its readinessProbe) passes only when weight-sync lists this pod's server ready, asks with the api key (from
the environment or a NAME_FILE), and keeps its last answer while weight-sync cannot tell; against a stand-in of
weight-sync's GET /servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .tools import ROOT

SERVER = "http://10.0.0.7:30000"
KEY = "the-api-key"


class FakeWeightSync:
    """GET /servers as weight-sync answers it (api.py), behind the api key."""

    def __init__(self) -> None:
        self.members: list[dict[str, Any]] = []
        self.status = 200
        self.auth: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                fake.auth.append(self.headers.get("Authorization"))
                if self.path != "/servers":
                    self.send_error(404)
                    return
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    self.send_response(401)
                    self.end_headers()
                    self.wfile.write(b'{"error":"Unauthorized"}')
                    return
                body = json.dumps(fake.members).encode()
                self.send_response(fake.status)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def member(self, state: str, url: str = SERVER) -> None:
        self.members = [{"url": url, "transport": "distributed", "state": state, "ready": state == "ready",
                         "version": "3", "failures": 0, "last_error": None}]


@pytest.fixture
def ws() -> Iterator[FakeWeightSync]:
    fake = FakeWeightSync()
    yield fake
    fake.httpd.shutdown()


def gate(ws_url: str, state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCGRPO_")}
    env = {"SERVER_URL": SERVER + "/", "WEIGHT_SYNC_URL": ws_url, "ASYNCGRPO_API_KEY": KEY,
           "ASYNCGRPO_READY_STATE": str(state), **env}
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py"), "--weight-sync-ready"],
                          env={**base, **env}, capture_output=True, text=True, timeout=30)


def test_ready_only_when_weight_sync_lists_the_server_ready(ws: FakeWeightSync, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ws.member("joining")  # registered, paused until it holds the current version
    out = gate(ws.url, state)
    assert out.returncode == 1 and "'joining'" in out.stderr
    ws.member("ready", url="http://10.0.0.8:30000")  # another pod is ready, not this one
    assert gate(ws.url, state).returncode == 1
    ws.member("ready")
    assert gate(ws.url, state).returncode == 0 and state.is_file()
    assert ws.auth[-1] == f"Bearer {KEY}"
    ws.member("dropped")  # a failed update: out of the router until re-synced, whatever was before
    assert gate(ws.url, state).returncode == 1 and not state.exists()


def test_the_key_comes_from_the_environment_or_its_file(ws: FakeWeightSync, tmp_path: Path) -> None:
    ws.member("ready")
    keyfile = tmp_path / "api_key"
    keyfile.write_text(KEY + "\n")
    assert gate(ws.url, tmp_path / "s1", ASYNCGRPO_API_KEY="", ASYNCGRPO_API_KEY_FILE=str(keyfile)).returncode == 0
    # only an admin key: weight-sync's ordinary endpoints then want it (utils/auth.py)
    assert gate(ws.url, tmp_path / "s2", ASYNCGRPO_API_KEY="", ASYNCGRPO_ADMIN_API_KEY=KEY).returncode == 0
    out = gate(ws.url, tmp_path / "s3", ASYNCGRPO_API_KEY="wrong")
    assert out.returncode == 1 and "refuses the key" in out.stderr
    # a wrong key is never "unknown": a pod that was ready turns unready
    state = tmp_path / "s4"
    assert gate(ws.url, state).returncode == 0
    assert gate(ws.url, state, ASYNCGRPO_API_KEY="wrong").returncode == 1 and not state.exists()


def test_the_last_answer_stands_while_weight_sync_cannot_tell(ws: FakeWeightSync, tmp_path: Path) -> None:
    state = tmp_path / "state"
    down = "http://127.0.0.1:9"  # nothing listens: weight-sync restarting, its pod not scheduled
    assert gate(down, state).returncode == 1  # a pod that never was ready stays out
    ws.member("ready")
    assert gate(ws.url, state).returncode == 0
    out = gate(down, state)
    assert out.returncode == 0 and "stays ready" in out.stderr
    ws.members = []  # a restarted weight-sync before the sidecar registers the server again
    assert gate(ws.url, state).returncode == 0
    ws.status = 503
    assert gate(ws.url, state).returncode == 0
    assert gate(down, state, ASYNCGRPO_READY_KEEP="0").returncode == 1  # strict: unknown is not ready


def test_the_default_mode_is_unchanged(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCGRPO_")}
    script = [sys.executable, str(ROOT / "deploy" / "healthcheck.py")]
    assert subprocess.run(script, env=env, timeout=30).returncode == 0  # no endpoint: the process is the check
    env["ASYNCGRPO_HEALTH_URL"] = "http://127.0.0.1:9/health"
    assert subprocess.run(script, env=env, capture_output=True, timeout=30).returncode == 1
