"""Real service processes for the integration tests: started with their output in a log file, waited for
on an HTTP health endpoint, always stopped. Every test area builds on these instead of its own copy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """One intra-op thread per child: the tests run several processes on two cores."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ASYNCGRPO_LOG_LEVEL="INFO")
    return env


class Proc:
    """A subprocess whose stdout+stderr go to `log` (appended when `append`, e.g. a server restarted on one log)."""

    def __init__(self, args: Sequence[str], log: Path, append: bool = False, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._f = log.open("ab" if append else "wb")
        self.p = subprocess.Popen(list(args), stdout=self._f, stderr=subprocess.STDOUT, env={**child_env(), **(env or {})})

    def tail(self, n: int = 4000) -> str:
        if not self._f.closed:  # stopped processes have closed theirs
            self._f.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.p.args[:4]} still running after {timeout}s; log tail:\n{self.tail()}") from None

    def stop(self, sig: int | None = None, grace_s: float = 20) -> None:
        if self.p.poll() is None:
            if sig is None:
                self.p.terminate()
            else:
                self.p.send_signal(sig)
            try:
                self.p.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._f.close()


def wait_until(what: str, cond: Callable[[], Any], timeout: float, procs: Sequence[Proc] = (),
               watch: Proc | None = None, interval: float = 0.1) -> Any:
    """Poll `cond` (an HTTP error counts as not yet) until it is truthy and return its value. On timeout the
    logs of `procs` are in the error; if `watch` exits first, the wait fails at once with its log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = cond()
        except httpx.HTTPError:
            out = None
        if out:
            return out
        if watch is not None and watch.p.poll() is not None:
            raise AssertionError(f"process exited ({watch.p.returncode}) while waiting for {what}:\n{watch.tail()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in (*procs, *([watch] if watch else [])))
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
        time.sleep(interval)


def start_http_service(args: Sequence[str], health_url: str, log: Path, timeout: float = 120, append: bool = False,
                       env: dict[str, str] | None = None) -> Proc:
    """Start `args` (with `env` over the children's environment) and return once `health_url` answers 200;
    the process is stopped if it never does."""
    proc = Proc(args, log, append, env)
    try:
        wait_until(f"{health_url} healthy", lambda: httpx.get(health_url, timeout=2).status_code == 200,
                   timeout, watch=proc)
    except AssertionError as e:
        proc.stop()
        raise RuntimeError(str(e)) from None
    return proc


def start_genserver(model_dir: Path, port: int, log: Path, *extra: str, timeout: float = 120,
                    append: bool = False, env: dict[str, str] | None = None) -> Proc:
    """`asyncgrpo genserver` on 127.0.0.1:port, healthy."""
    args = [sys.executable, "-m", "asyncgrpo.cli", "genserver", "--model", str(model_dir), "--port", str(port), *extra]
    return start_http_service(args, f"http://127.0.0.1:{port}/health", log, timeout, append, env)
