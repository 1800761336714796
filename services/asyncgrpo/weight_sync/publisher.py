"""Trainer side of weight sync: hand a policy version over to the weight-sync service and get back to
training. `publish()` copies the (hf_name, tensor) stream into the shared-memory snapshot and notifies
the service; the time spent there is the only time weight sync blocks the trainer.

Why an HTTP POST for the notification (not a Redis stream): the service must run on the trainer's host
anyway (it maps the same /dev/shm files), it already serves an HTTP API, and a POST tells the trainer at
once whether the service took the version. The snapshot and latest.json stay on disk, so a service that
was down at publish time (the POST fails: logged, not raised) picks the version up when it starts.

On GPU the same API can hand over through CUDA IPC instead of /dev/shm; that stays a detail of this class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from asyncgrpo.sglang.buckets import dtype_from_name
from asyncgrpo.utils.metrics import gauge, histogram
from asyncgrpo.weight_sync.layout import Layout, TensorSpec, dtype_name, plan_layout, tensor_views
from asyncgrpo.weight_sync.snapshot import N_SLOTS, OWNER, Manifest, SnapshotDir

log = logging.getLogger(__name__)

_BLOCKED = histogram("weight_sync_trainer_blocked_seconds", "Seconds the trainer spent in WeightPublisher.publish()",
                     buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
_PUBLISHED = gauge("weight_sync_published_version", "Last policy version handed to the weight-sync service")


@dataclass(frozen=True)
class PublishResult:
    version: int
    slot: int
    bytes: int
    blocked_s: float
    notified: bool


class WeightPublisher:
    """Publish versions of a policy given as any iterable of (hf_name, tensor).

    dtype: the dtype weights travel in (None keeps each tensor's own). bucket_bytes: bucket size.
    service_url: the weight-sync service to notify (None: only write the snapshot).
    """

    def __init__(self, snapshot_dir: str | Path, service_url: str | None = None, dtype: str | torch.dtype | None = None,
                 bucket_bytes: int = 512 << 20, notify_timeout_s: float = 10.0, key: str | None = None) -> None:
        self.snapshot = SnapshotDir(snapshot_dir)
        # The one live writer of this snapshot (SnapshotInUse otherwise). What an earlier process published is
        # not this model's: forget it, but keep the slot cycle so the first write avoids the slot a reader may
        # still be broadcasting from.
        self.snapshot.claim(OWNER)
        stale = self.snapshot.latest()
        self.snapshot.clear()
        self._last_slot = stale["slot"] if stale else N_SLOTS - 1
        self.service_url = service_url.rstrip("/") if service_url else None
        self.dtype = dtype_name(dtype) if dtype is not None else None
        self.bucket_bytes = int(bucket_bytes)
        self.notify_timeout_s = notify_timeout_s
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}  # /publish is an admin endpoint
        # One client for every notification: httpx.post() builds a client, and with it an SSL context that loads
        # the CA bundle (~40 ms of CPU), each time; per step that was 12% of the tiny trainer's CPU.
        self._http: httpx.Client | None = None
        self._layout: Layout | None = None
        # Versions must increase within one publisher; a new one (a restarted trainer, resumed from a
        # checkpoint older than the last published version) may go back: its version is the truth.
        self._last_version: int | None = None

    @classmethod
    def from_config(cls, cfg) -> "WeightPublisher":  # type: ignore[no-untyped-def]
        """From a RunConfig: the snapshot dir, service URL, dtype and bucket size of cfg.weight_sync."""
        from asyncgrpo.weight_sync.settings import resolve

        s = resolve(cfg)
        return cls(s.snapshot_dir, s.service_url, s.wire_dtype, s.bucket_bytes, key=s.admin_api_key or s.api_key)

    def close(self) -> None:
        """Stop owning the snapshot (the weight-sync service, if it outlives us, removes it when it stops)."""
        try:
            self.snapshot.release(OWNER)
        finally:
            if self._http is not None:
                self._http.close()
                self._http = None

    def _spec(self, name: str, t: torch.Tensor) -> TensorSpec:
        return TensorSpec(name, self.dtype or dtype_name(t.dtype), tuple(int(x) for x in t.shape))

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> PublishResult:
        """Copy the weights of `version` into the snapshot and notify the service; returns when the
        trainer may change its weights again."""
        t0 = time.perf_counter()
        version = int(version)
        if self._last_version is not None and version <= self._last_version:
            raise ValueError(f"publish: version {version} is not newer than the last published {self._last_version}; "
                             "versions must increase")
        slot = (self._last_slot + 1) % N_SLOTS
        it = iter(named_tensors)
        layout = self._layout
        if layout is None:
            # First publish (layout unknown): hold the stream once to plan the buckets.
            pending = list(it)
            layout = plan_layout([self._spec(n, t) for n, t in pending], self.bucket_bytes)
            it = iter(pending)
        with self.snapshot.write_slot(slot, layout.total_bytes) as data:
            views = tensor_views(data, layout)
            n = 0
            for n, (name, t) in enumerate(it, start=1):
                if n > len(views):
                    raise ValueError(f"publish: the weight stream has more tensors than the {len(views)} of the layout "
                                     f"(extra {name!r}); the model changed shape, make a new WeightPublisher")
                spec, dst = views[n - 1]
                if (name, tuple(t.shape)) != (spec.name, spec.shape) or (self.dtype is None and dtype_name(t.dtype) != spec.dtype):
                    raise ValueError(f"publish: tensor {n - 1} is {name!r} {tuple(t.shape)} {t.dtype} but the layout "
                                     f"expects {spec.name!r} {spec.shape} {spec.dtype}; the stream must keep its order")
                with torch.no_grad():
                    dst.copy_(t.detach().to(device="cpu", dtype=dtype_from_name(spec.dtype)))
            if n != len(views):
                raise ValueError(f"publish: the weight stream ended after {n} of {len(views)} tensors")
            self._layout = layout
            blocked_so_far = time.perf_counter() - t0
            self.snapshot.commit(Manifest(version=version, slot=slot, layout=layout, published_at=time.time(),
                                          blocked_s=blocked_so_far))
        self._last_slot, self._last_version = slot, version
        notified = self._notify(version, time.perf_counter() - t0)
        blocked = time.perf_counter() - t0
        _BLOCKED.observe(blocked)
        _PUBLISHED.set(version)
        return PublishResult(version=version, slot=slot, bytes=layout.payload_bytes, blocked_s=blocked, notified=notified)

    def _notify(self, version: int, blocked_s: float) -> bool:
        if self.service_url is None:
            return False
        if self._http is None:
            self._http = httpx.Client(headers=self._headers, timeout=self.notify_timeout_s)
        url, body = f"{self.service_url}/publish", {"version": version, "blocked_s": blocked_s}
        try:
            try:
                r = self._http.post(url, json=body)
            except (httpx.RemoteProtocolError, httpx.ConnectError):
                # a kept-alive connection the service closed meanwhile (or a restarted service): once more, on a
                # new one; /publish of a version is idempotent
                r = self._http.post(url, json=body)
            r.raise_for_status()
            return True
        except httpx.HTTPError as e:
            # The service reads latest.json when it (re)starts, so the version is not lost.
            log.warning("weight-sync service %s not notified of version %d: %s", self.service_url, version, e)
            return False
