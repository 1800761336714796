"""The hand-over buffer between the trainer and the weight-sync service: a double-buffered snapshot in
shared memory (files under /dev/shm mapped as torch uint8 tensors).

Files in `snapshot_dir`:
  slot0.bin, slot1.bin  the weights of one version each, laid out as the flattened buckets (layout.py)
  slot0.json, slot1.json the manifest of what a slot holds (version, layout), written under the slot lock
  latest.json           {"slot", "version"}: the newest complete slot (atomic rename)

Locking (fcntl.flock on the .bin file): the writer holds LOCK_EX while it fills a slot, the service holds
LOCK_SH while it broadcasts from one. The writer always fills the slot that is *not* the latest, so it
only waits when the service is still broadcasting a version two behind, i.e. when the trainer publishes
faster than updates complete (back-pressure, visible in the trainer-blocked metric). The reader trusts
the slot's own manifest read under its lock, never latest.json alone, so a slot rewritten between the two
reads is seen consistently.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asyncgrpo.weight_sync.layout import Layout

N_SLOTS = 2


@dataclass(frozen=True)
class Manifest:
    version: int
    slot: int
    layout: Layout
    published_at: float
    blocked_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "slot": self.slot, "published_at": self.published_at,
                "blocked_s": self.blocked_s, "layout": self.layout.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Manifest":
        return cls(version=int(obj["version"]), slot=int(obj["slot"]), layout=Layout.from_json(obj["layout"]),
                   published_at=float(obj["published_at"]), blocked_s=float(obj.get("blocked_s", 0.0)))


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class SnapshotDir:
    """Both sides' view of a snapshot directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Mappings are kept: a fresh mmap per version would page-fault on every page of the model again
        # (measured: the first broadcast from a fresh mapping runs at ~2/3 of the warm speed).
        self._maps: dict[int, tuple[tuple[int, int, int], torch.Tensor]] = {}

    def bin_path(self, slot: int) -> Path:
        return self.path / f"slot{slot}.bin"

    def manifest_path(self, slot: int) -> Path:
        return self.path / f"slot{slot}.json"

    @property
    def latest_path(self) -> Path:
        return self.path / "latest.json"

    def latest(self) -> dict[str, int] | None:
        try:
            obj = json.loads(self.latest_path.read_text())
            return {"slot": int(obj["slot"]), "version": int(obj["version"])}
        except FileNotFoundError:
            return None

    @contextmanager
    def _locked(self, slot: int, mode: int) -> Iterator[int]:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.bin_path(slot), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield fd
        finally:
            os.close(fd)  # closing the fd releases the flock

    def _map(self, slot: int, nbytes: int) -> torch.Tensor:
        # MAP_SHARED mapping of the file: writes land in the page cache (RAM on /dev/shm), no copy.
        st = os.stat(self.bin_path(slot))
        key = (st.st_dev, st.st_ino, nbytes)
        cached = self._maps.get(slot)
        if cached is not None and cached[0] == key:
            return cached[1]
        t = torch.from_file(str(self.bin_path(slot)), shared=True, size=nbytes, dtype=torch.uint8)
        self._maps[slot] = (key, t)
        return t

    @contextmanager
    def write_slot(self, slot: int, nbytes: int) -> Iterator[torch.Tensor]:
        """Exclusive access to a slot sized to `nbytes`; yields its mapped tensor. Commit with commit()."""
        with self._locked(slot, fcntl.LOCK_EX) as fd:
            if os.fstat(fd).st_size != nbytes:
                os.ftruncate(fd, nbytes)
            yield self._map(slot, nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)

    def commit(self, manifest: Manifest) -> None:
        """Publish a filled slot: its manifest, then latest.json (call inside write_slot)."""
        _write_json_atomic(self.manifest_path(manifest.slot), manifest.to_json())
        _write_json_atomic(self.latest_path, {"slot": manifest.slot, "version": manifest.version})

    @contextmanager
    def read_latest(self) -> Iterator[tuple[Manifest, torch.Tensor] | None]:
        """Shared access to the newest slot: (its manifest, its mapped bytes), or None if nothing published.
        Blocks while the writer fills that slot; hold it only for the duration of one update."""
        latest = self.latest()
        if latest is None:
            yield None
            return
        with self._locked(latest["slot"], fcntl.LOCK_SH):
            manifest = Manifest.from_json(json.loads(self.manifest_path(latest["slot"]).read_text()))
            yield manifest, self._map(manifest.slot, manifest.layout.total_bytes)
