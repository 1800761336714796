"""The hand-over buffer between the trainer and the weight-sync service: a double-buffered snapshot in
shared memory (files under /dev/shm mapped as torch uint8 tensors).

Files in `snapshot_dir`:
  slot0.bin, slot1.bin  the weights of one version each, laid out as the flattened buckets (layout.py)
  slot0.json, slot1.json the manifest of what a slot holds (version, layout), written under the slot lock
  latest.json           {"slot", "version"}: the newest complete slot (atomic rename)
  owner.lock            flock'ed (exclusive) by the live trainer that writes this snapshot
  reader.lock           flock'ed (exclusive) by the live weight-sync service that reads it

A snapshot belongs to one run: a second live trainer or weight-sync on the same directory is refused
(SnapshotInUse, naming the holder's pid), a starting trainer clears what an earlier process left (its
versions are not this model's), the reader trusts a snapshot only while its trainer holds owner.lock (a
dead run's weights are never served to a new run's servers), and whoever of the two stops last removes
the directory, so nothing stays behind in /dev/shm. Locks held by a killed process are released by the
kernel, so a restarted trainer or service takes its role back at once.

Locking (fcntl.flock on the .bin file): the writer holds LOCK_EX while it fills a slot, the service holds
LOCK_SH while it broadcasts from one. The writer always fills the slot that is *not* the latest, so it
only waits when the service is still broadcasting a version two behind, i.e. when the trainer publishes
faster than updates complete (back-pressure, visible in the trainer-blocked metric). The reader trusts
the slot's own manifest read under its lock, never latest.json alone, so a slot rewritten between the two
reads is seen consistently.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asyncgrpo.weight_sync.layout import Layout

N_SLOTS = 2
OWNER, READER = "owner", "reader"
CLAIM_RETRY_S = 1.0  # a claim that meets a held lock retries this long: a peer's alive() probe holds it briefly


class SnapshotInUse(RuntimeError):
    """Another live process holds this snapshot directory's role (another run with the same names?)."""


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


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


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
        self._roles: dict[str, int] = {}  # role -> fd holding its flock

    # -- ownership -------------------------------------------------------------------------------------
    def lock_path(self, role: str) -> Path:
        return self.path / f"{role}.lock"

    def claim(self, role: str) -> None:
        """Hold `role` (OWNER: the trainer, READER: the weight-sync service) for this process's life, or
        raise SnapshotInUse if another live process holds it."""
        if role in self._roles:
            return
        deadline = time.monotonic() + CLAIM_RETRY_S
        while True:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path(role), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() < deadline:  # maybe a peer's alive() probe holding it for an instant
                    time.sleep(0.05)
                    continue
                who = "trainer" if role == OWNER else "weight-sync service"
                raise SnapshotInUse(
                    f"weight snapshot {self.path} is in use by a live {who} (pid {holder}): another run with the same "
                    "experiment_name/trial_name on this host? Use another trial_name or set weight_sync.snapshot_dir"
                ) from None
            if _same_file(fd, self.lock_path(role)):
                break
            os.close(fd)  # the file was removed (a peer's remove()) between open and flock: a lock on nothing
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._roles[role] = fd

    def alive(self, role: str) -> bool:
        """True while a live process (this one included) holds `role`."""
        if role in self._roles:
            return True
        try:
            fd = os.open(self.lock_path(role), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return True
            raise
        finally:
            os.close(fd)  # releases the probe's lock, if it got one
        return False

    def owner_alive(self) -> bool:
        return self.alive(OWNER)

    def clear(self) -> None:
        """Forget every published version (a new trainer process: versions of an earlier one are not its model's)."""
        for p in [self.latest_path, *(self.manifest_path(i) for i in range(N_SLOTS))]:
            p.unlink(missing_ok=True)

    def release(self, role: str) -> None:
        """Give `role` up; the last of trainer and service to leave removes the snapshot. The lock file stays
        until then (unlinking a locked file would let a newcomer lock a different inode of the same name)."""
        fd = self._roles.pop(role, None)
        if fd is None:
            return
        os.close(fd)
        self._maps.clear()
        if not self.alive(READER if role == OWNER else OWNER):
            self.remove()

    def remove(self) -> None:
        """Delete the snapshot's own files (never anything else in a directory the user chose), then the
        directory and its parents up to the first that is not empty."""
        for pattern in ("slot*.bin", "slot*.json", "latest.json", "*.tmp*", "*.lock"):
            for p in self.path.glob(pattern):
                p.unlink(missing_ok=True)
        parent = self.path
        while parent != parent.parent:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def bin_path(self, slot: int) -> Path:
        return self.path / f"slot{slot}.bin"

    def manifest_path(self, slot: int) -> Path:
        return self.path / f"slot{slot}.json"

    @property
    def latest_path(self) -> Path:
        return self.path / "latest.json"

    def latest(self) -> dict[str, int] | None:
        """The newest published {slot, version}, or None (nothing published, or the trainer that published
        it is gone: a reader never serves a dead run's weights)."""
        if not self.owner_alive():
            return None
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
            try:
                manifest = Manifest.from_json(json.loads(self.manifest_path(latest["slot"]).read_text()))
            except FileNotFoundError:  # a new trainer cleared the snapshot meanwhile
                manifest = None
            yield None if manifest is None else (manifest, self._map(manifest.slot, manifest.layout.total_bytes))
