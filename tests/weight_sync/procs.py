"""Real processes for the weight-sync integration tests: genservers and the weight-sync service."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ASYNCGRPO_LOG_LEVEL="INFO")
    return env


class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._f = log.open("ab")
        self.p = subprocess.Popen(args, stdout=self._f, stderr=subprocess.STDOUT, env=child_env())

    def tail(self, n: int = 4000) -> str:
        self._f.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._f.close()


def wait_until(what: str, cond: Callable[[], Any], timeout: float, procs: list[Proc] = ()) -> Any:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = cond()
        except httpx.HTTPError:
            out = None
        if out:
            return out
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in procs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
        time.sleep(0.1)


def start_genserver(model_dir: Path, port: int, log: Path, dist_timeout_s: float = 30) -> Proc:
    proc = Proc([sys.executable, "-m", "asyncgrpo.cli", "genserver", "--model", str(model_dir), "--port", str(port),
                 "--dist-timeout-s", str(dist_timeout_s), "--weight-version", "0"], log)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.p.poll() is not None:
            raise RuntimeError(f"genserver on {url} exited with {proc.p.returncode}:\n{proc.tail()}")
        return httpx.get(f"{url}/health", timeout=2).status_code == 200

    wait_until(f"genserver {url} healthy", healthy, 120, [proc])
    return proc


def start_weight_sync(cfg: dict[str, Any], workdir: Path, log: Path) -> Proc:
    path = workdir / "weight_sync.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = Proc([sys.executable, "-m", "asyncgrpo.cli", "weight-sync", "--config", str(path)], log)
    url = f"http://127.0.0.1:{cfg['weight_sync']['port']}"
    wait_until("weight-sync healthy", lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 60, [proc])
    return proc
