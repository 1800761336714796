"""A tiny ORM (random head on the tiny backbone) and a real `asyncgrpo reward-server` serving it, per module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from service_procs import free_port, start_http_service

KEY = "rm-key-123"


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from asyncgrpo.tiny.reward_model import build_reward_model

    return build_reward_model(tiny_model_dir, tmp_path_factory.mktemp("tiny_orm"), seed=3)


def start_reward_server(model_dir: Path, log: Path, *extra: str):  # type: ignore[no-untyped-def]
    """`asyncgrpo reward-server` on a free port with the test key, waited for on /health: (url, process)."""
    port = free_port()
    proc = start_http_service([sys.executable, "-m", "asyncgrpo.cli", "reward-server", "--model", str(model_dir),
                               "--port", str(port), "--api-key", KEY, *extra], f"http://127.0.0.1:{port}/health", log)
    return f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
def server(reward_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    url, proc = start_reward_server(reward_model_dir, tmp_path_factory.mktemp("rm_logs") / "reward_server.log",
                                    "--max-batch-size", "16", "--batch-wait-ms", "50")
    yield url, proc
    proc.stop()
