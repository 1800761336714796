"""A real genserver process for these tests: started on a free port, waited for on /health, always killed."""

from __future__ import annotations

from pathlib import Path

from service_procs import free_port, start_genserver

__all__ = ["GenServer", "free_port"]


class GenServer:
    """Without --api-key/--admin-api-key in `extra` the server runs without keys, whatever ASYNCGRPO_API_KEY /
    ASYNCGRPO_ADMIN_API_KEY say in the environment (an empty key means none)."""

    def __init__(self, model_dir: Path, log: Path, *extra: str, timeout: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        keys = [] if any(a.startswith(("--api-key", "--admin-api-key")) for a in extra) else [
            "--api-key", "", "--admin-api-key", ""]
        self._proc = start_genserver(model_dir, self.port, log, "--threads", "1", *keys, *extra, timeout=timeout)
        self.proc = self._proc.p

    def tail(self, n: int = 4000) -> str:
        return self._proc.tail(n)

    def stop(self) -> None:
        self._proc.stop(grace_s=10)
