"""Staleness, defined once: how many policy versions a sample lags the model it is trained into.

A sample trained at policy version v (the version before the step; the step makes v + 1) whose oldest token
came from version o has staleness v - o. AReaL's bound: trainable while staleness <= max_head_offpolicyness.
The trainer's filter, its metrics and the control plane's histogram of queued groups all use these.
"""

from __future__ import annotations

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 8)  # histogram bucket upper bounds (metrics, control plane)


def staleness(trained_version: int, oldest_version: int) -> int:
    return trained_version - oldest_version


def is_stale(trained_version: int, oldest_version: int, max_head_offpolicyness: int) -> bool:
    return staleness(trained_version, oldest_version) > max_head_offpolicyness


def bucket(value: int) -> str:
    """The histogram bucket of a staleness: 'le_0', 'le_1', ..., 'le_8' or 'gt_8'."""
    for b in STALENESS_BUCKETS:
        if value <= b:
            return f"le_{b}"
    return f"gt_{STALENESS_BUCKETS[-1]}"
