"""Real processes for the weight-sync integration tests: genservers and the weight-sync service."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from service_procs import Proc, start_http_service, wait_until
from service_procs import start_genserver as _start_genserver

__all__ = ["Proc", "start_genserver", "start_weight_sync", "wait_until"]


def start_genserver(model_dir: Path, port: int, log: Path, dist_timeout_s: float = 30) -> Proc:
    # Appends: a server restarted on the same port keeps one log.
    return _start_genserver(model_dir, port, log, "--dist-timeout-s", str(dist_timeout_s), "--weight-version", "0",
                            append=True)


def start_weight_sync(cfg: dict[str, Any], workdir: Path, log: Path) -> Proc:
    path = workdir / "weight_sync.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = [sys.executable, "-m", "asyncgrpo.cli", "weight-sync", "--config", str(path)]
    return start_http_service(args, f"http://127.0.0.1:{cfg['weight_sync']['port']}/health", log, 60, append=True)
