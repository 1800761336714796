"""Fixtures shared by every test area: a tiny HF model built offline, and a real redis-server."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_procs import free_port

# Two cores in CI: keep each process to one intra-op thread so parallel processes do not thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Qwen2 checkpoint (tied embeddings), built once per session."""
    from asyncgrpo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), preset="tiny", arch="qwen2", seed=0)


class RedisServer:
    """A private redis-server on a unix socket (and a loopback port) in a temp dir. `aof=True` runs it with
    appendonly (fsync always, so a kill -9 loses nothing the clients were told is written); `kill()` and
    `start()` restart it on the same socket, port and data."""

    def __init__(self, workdir: Path, aof: bool = False) -> None:
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            raise RuntimeError("redis-server not found; install it (apt-get install redis-server), as .ci/run does")
        self.workdir = workdir
        self.socket = workdir / "redis.sock"
        self.port = free_port()
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--save", "", *persistence, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        # Ready means it answers: the socket file exists from bind(), a moment before listen(), and a client
        # connecting in between is refused (seen under load as "Connection refused" in a test's first call).
        import redis

        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit code {self.proc.poll()})")
            if self.socket.exists():
                try:
                    if redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5).ping():
                        break
                except redis.ConnectionError:
                    pass
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash: clients see their connections reset."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self.socket.unlink(missing_ok=True)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server per test (starting one takes ~10 ms)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_aof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server with AOF (appendfsync always), for tests that kill and restart it."""
    server = RedisServer(tmp_path_factory.mktemp("redis_aof"), aof=True)
    yield server
    server.stop()
