"""The one logging setup every service uses: `setup_logging("trainer")` at process start."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_FMT = "%(asctime)s %(levelname)s [{service}] %(name)s: %(message)s"


class _JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(service: str, level: str | None = None, json_logs: bool | None = None) -> logging.Logger:
    """Configure the root logger once per process; level and format also come from
    ASYNCGRPO_LOG_LEVEL and ASYNCGRPO_LOG_JSON=1 so that subprocesses inherit them."""
    level = (level or os.environ.get("ASYNCGRPO_LOG_LEVEL", "INFO")).upper()
    if json_logs is None:
        json_logs = os.environ.get("ASYNCGRPO_LOG_JSON", "0") == "1"
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(_JsonFormatter(service))
    else:
        fmt = logging.Formatter(_FMT.format(service=service), datefmt="%H:%M:%S")
        fmt.converter = time.gmtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter that drowns our own lines at INFO.
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return logging.getLogger(f"asyncgrpo.{service}")
