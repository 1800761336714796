"""Real processes for the integration tests: genserver and `asyncgrpo rollout` subprocesses."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from service_procs import Proc, free_port, start_http_service, wait_until
from service_procs import start_genserver as _start_genserver

__all__ = ["Proc", "free_port", "start_genserver", "start_rollout", "start_router", "wait_for", "write_config",
           "write_dataset"]


def start_genserver(model_dir: Path, port: int, log: Path, timeout: float = 120) -> Proc:
    return _start_genserver(model_dir, port, log, timeout=timeout)


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
    wait_until(what, pred, timeout, watch=proc, interval=0.05)


def start_router(worker_urls: list[str], port: int, log: Path, timeout: float = 60) -> Proc:
    """sglang-router (Rust, runs on CPU) in front of the genservers."""
    args = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--policy", "round_robin", "--worker-urls", *worker_urls]
    return start_http_service(args, f"http://127.0.0.1:{port}/health", log, timeout)
