"""Real processes for the integration tests: genserver and `asyncgrpo rollout` subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ASYNCGRPO_LOG_LEVEL="INFO")
    return env


class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._f = log.open("wb")
        self.p = subprocess.Popen(args, stdout=self._f, stderr=subprocess.STDOUT, env=child_env())

    def tail(self, n: int = 4000) -> str:
        self._f.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.p.args[:4]} still running after {timeout}s; log tail:\n{self.tail()}") from None

    def stop(self, sig: int | None = None) -> None:
        if self.p.poll() is None:
            if sig is None:
                self.p.terminate()
            else:
                self.p.send_signal(sig)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._f.close()


def start_genserver(model_dir: Path, port: int, log: Path, timeout: float = 120) -> Proc:
    proc = Proc([sys.executable, "-m", "asyncgrpo.cli", "genserver", "--model", str(model_dir), "--port", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.p.poll() is not None:
            raise RuntimeError(f"genserver exited with {proc.p.returncode}:\n{proc.tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"genserver on {url} not healthy after {timeout}s:\n{proc.tail()}")
        time.sleep(0.2)


def write_dataset(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Q: {i}+1=?\nA:", "answer": str(i + 1)}) + "\n" for i in range(n)))
    return path


def write_config(path: Path, *, model_dir: Path, dataset: Path, redis_url: str, servers: list[str], trial: str,
                 **rollout: Any) -> Path:
    cfg = {
        "experiment_name": "it", "trial_name": trial, "seed": 1, "total_train_epochs": 1,
        "actor": {"path": str(model_dir), "group_size": 2, "temperature": 1.0},
        "train_dataset": {"path": str(dataset), "batch_size": 2, "prompt_template": "{prompt}"},
        "reward": {"fns": ["gsm8k"], "timeout_s": 10},
        "redis": {"url": redis_url},
        "rollout": {"server_urls": servers, "max_new_tokens": 8, "max_concurrent_rollouts": 2,
                    "max_head_offpolicyness": 0, "log_interval_s": 1.0, **rollout},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_rollout(config: Path, log: Path, *overrides: str) -> Proc:
    return Proc([sys.executable, "-m", "asyncgrpo.cli", "rollout", "--config", str(config), *overrides], log)


def wait_for(pred, timeout: float, what: str, proc: Proc | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.p.poll() is not None:
            raise AssertionError(f"process exited ({proc.p.returncode}) while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f":\n{proc.tail()}" if proc else ""))
        time.sleep(0.05)


def start_router(worker_urls: list[str], port: int, log: Path, timeout: float = 60) -> Proc:
    """sglang-router (Rust, runs on CPU) in front of the genservers; ready when it lists every worker."""
    proc = Proc([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                 "--policy", "round_robin", "--worker-urls", *worker_urls], log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.p.poll() is not None:
            raise RuntimeError(f"sglang-router exited with {proc.p.returncode}:\n{proc.tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"sglang-router on {url} not ready after {timeout}s:\n{proc.tail()}")
        time.sleep(0.2)
