"""Receiving and loading weights for genserver: broadcast from the trainer (per tensor or one flattened
bucket) into a persistent receive buffer, or safetensors from disk. Nothing here touches the live model;
the engine validates the received tensors and copies them all at once into the parameters (the only copy
on the path), so a failed transfer leaves the old weights.

Why a persistent buffer: a fresh multi-hundred-MB tensor per bucket is a fresh mmap, so every page is
faulted in and zeroed by the kernel while the broadcast writes into it; that more than halves the receive
bandwidth (docs/benchmarks.md, weight-sync row). One buffer per (group, device) is allocated on the first
receive, grown when a larger bucket arrives, reused by every later bucket and update, and freed when the
group object goes away (destroy_weights_update_group drops it) or on release_receive_buffers().
"""

from __future__ import annotations

import math
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from asyncgrpo.sglang.buckets import bucket_layout, dtype_from_name

# group -> {device string -> uint8 buffer}. Weak keys: the buffer lives exactly as long as the group object.
_BUFFERS: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()
_BUFFERS_LOCK = threading.Lock()


def receive_buffer(group: object, nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A 1-D uint8 view of `nbytes` bytes of the group's persistent receive buffer on `device` (allocated
    on first use, regrown when too small). Its previous contents are overwritten by the next receive, so the
    caller must be done with earlier views before receiving again (genserver holds its weight lock)."""
    key = str(torch.device(device))
    with _BUFFERS_LOCK:
        per_group = _BUFFERS.setdefault(group, {})
        buf = per_group.get(key)
        if buf is None or buf.numel() < nbytes:
            per_group.pop(key, None)  # free the old one before allocating the larger one
            buf = per_group[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    return buf[:nbytes]


def release_receive_buffers(group: object) -> int:
    """Free the group's receive buffers now; returns the bytes released."""
    with _BUFFERS_LOCK:
        bufs = _BUFFERS.pop(group, {})
    return sum(b.numel() for b in bufs.values())


def receive_buffer_bytes(group: object | None = None) -> int:
    """Bytes held in receive buffers for `group` (0 once it was released or collected), or for all groups."""
    with _BUFFERS_LOCK:
        groups = list(_BUFFERS.values()) if group is None else [_BUFFERS.get(group, {})]
        return sum(b.numel() for bufs in groups for b in bufs.values())


def _views(flat: torch.Tensor, dtypes: list[torch.dtype], shapes: list[list[int]], offsets: list[int]) -> list[torch.Tensor]:
    out = []
    for dt, s, off in zip(dtypes, shapes, offsets):
        n = dt.itemsize * math.prod(s)
        out.append(flat[off:off + n].view(dt).view(s))
    return out


def receive_broadcast(group: object, names: list[str], dtypes: list[str], shapes: list[list[int]],
                      load_format: str | None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Receive `names` from rank 0 of `group` in order (blocking; the group's timeout bounds every call).
    `device` must suit the backend: cpu for gloo, the model's GPU for nccl.

    The returned tensors are views into the group's receive buffer: valid until the next receive on the
    same group (apply or copy them first)."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) differ in length")
    if load_format not in (None, "", "direct", "flattened_bucket"):
        raise ValueError(f"load_format {load_format!r} is not supported; use null or 'flattened_bucket'")
    tdtypes = [dtype_from_name(d) for d in dtypes]
    ishapes = [[int(x) for x in s] for s in shapes]
    offsets, total = bucket_layout(tdtypes, ishapes)
    flat = receive_buffer(group, total, device)
    if load_format == "flattened_bucket":
        # post the receive first: rank 0 is already waiting; the views cost ~0.4 ms per 100 tensors
        dist.broadcast(flat, src=0, group=group)
        return dict(zip(names, _views(flat, tdtypes, ishapes, offsets)))
    tensors = _views(flat, tdtypes, ishapes, offsets)
    for t in tensors:  # one broadcast per tensor, each into its slot of the same buffer
        dist.broadcast(t, src=0, group=group)
    return dict(zip(names, tensors))


def all_finite(t: torch.Tensor) -> bool:
    """True when `t` holds no NaN or inf; integer/bool tensors always are. One reduction pass in the
    tensor's own dtype (min and max propagate NaN, and are +-inf exactly when an inf is present), without
    the bool tensor of isfinite() or a float() copy."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.is_complex():
        return all_finite(torch.view_as_real(t))
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def load_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files of an HF checkpoint directory."""
    from safetensors.torch import load_file

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"no *.safetensors under {p}; give an HF checkpoint directory")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
