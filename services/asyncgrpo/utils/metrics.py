"""The one Prometheus registry of a process and get-or-create helpers for its metrics.

Services declare metrics where they use them (`counter("rollout_groups_total", "...")`); asking twice
for the same name returns the same collector instead of failing on duplicate registration.
"""

from __future__ import annotations

import threading
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

REGISTRY = CollectorRegistry(auto_describe=True)
PREFIX = "asyncgrpo_"
_lock = threading.Lock()
_metrics: dict[str, MetricWrapperBase] = {}


def _get(kind: type[MetricWrapperBase], name: str, doc: str, labels: Sequence[str], **kw: object) -> MetricWrapperBase:
    full = PREFIX + name
    with _lock:
        m = _metrics.get(full)
        if m is None:
            m = kind(full, doc, labelnames=tuple(labels), registry=REGISTRY, **kw)
            _metrics[full] = m
        elif not isinstance(m, kind) or tuple(m._labelnames) != tuple(labels):
            raise ValueError(f"metric {full} already registered as {type(m).__name__}{m._labelnames}")
        return m


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    return _get(Counter, name, doc, labels)  # type: ignore[return-value]


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    return _get(Gauge, name, doc, labels)  # type: ignore[return-value]


def histogram(name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] | None = None) -> Histogram:
    kw = {"buckets": tuple(buckets)} if buckets is not None else {}
    return _get(Histogram, name, doc, labels, **kw)  # type: ignore[return-value]


def serve_metrics(port: int, host: str) -> None:
    """Expose REGISTRY on http://host:port/metrics from a background thread (port 0 disables); `host` is
    the configured interface (bind_host), never every interface by default."""
    if port:
        start_http_server(port, addr=host, registry=REGISTRY)
