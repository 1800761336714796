"""argparse pieces the service commands share."""

from __future__ import annotations

import argparse
import os


def at_least_one(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps, rows or threads; 0 or less would silently mean 1)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= 1") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is below 1; give a whole number >= 1")
    return n


def default_threads() -> int:
    """OMP_NUM_THREADS as OpenMP reads it ("4", or "4,2" for nested levels: the first); unset or unusable: 1."""
    head = (os.environ.get("OMP_NUM_THREADS") or "").split(",")[0].strip()
    return int(head) if head.isdigit() and int(head) >= 1 else 1


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """--threads: torch intra-op threads, $OMP_NUM_THREADS by default."""
    p.add_argument("--threads", type=at_least_one, default=default_threads(),
                   help="torch intra-op threads (default: $OMP_NUM_THREADS, else 1)")
