"""Where every weight lives in a snapshot: tensors grouped into buckets, each bucket a flattened_bucket.

Pure functions and plain data. The snapshot (a shared-memory file) is laid out exactly as the buckets
go over the wire: bucket k occupies bytes [offset, offset + nbytes) of the file, and inside it each tensor
sits at the offset `asyncgrpo.sglang.buckets.bucket_layout` gives (back to back, no padding), which is the
same layout the server computes from (dtypes, shapes). So the broadcast of a bucket is a zero-copy view of the snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asyncgrpo.sglang.buckets import bucket_layout, dtype_from_name, is_aligned_after

# Bucket starts are aligned to this many bytes so every dtype view of a bucket is aligned too.
BUCKET_ALIGN = 64


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, as SGLang's HTTP API spells it
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.empty((), dtype=dtype_from_name(self.dtype)).element_size() * math.prod(self.shape)


@dataclass(frozen=True)
class Bucket:
    offset: int  # byte offset of the bucket in the snapshot
    nbytes: int
    specs: tuple[TensorSpec, ...]
    tensor_offsets: tuple[int, ...]  # byte offset of each tensor inside the bucket

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def dtypes(self) -> list[str]:
        return [s.dtype for s in self.specs]

    @property
    def shapes(self) -> list[list[int]]:
        return [list(s.shape) for s in self.specs]


@dataclass(frozen=True)
class Layout:
    buckets: tuple[Bucket, ...]
    total_bytes: int

    @property
    def specs(self) -> list[TensorSpec]:
        return [s for b in self.buckets for s in b.specs]

    @property
    def payload_bytes(self) -> int:
        """Bytes that cross the wire: every bucket (a bucket has no gaps; the gaps between buckets stay home)."""
        return sum(b.nbytes for b in self.buckets)

    def to_json(self) -> dict[str, Any]:
        return {"bucket_align": BUCKET_ALIGN, "total_bytes": self.total_bytes, "buckets": [
            {"offset": b.offset, "nbytes": b.nbytes, "tensor_offsets": list(b.tensor_offsets),
             "names": b.names, "dtypes": b.dtypes, "shapes": b.shapes} for b in self.buckets]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Layout":
        buckets = tuple(
            Bucket(offset=int(b["offset"]), nbytes=int(b["nbytes"]), tensor_offsets=tuple(int(o) for o in b["tensor_offsets"]),
                   specs=tuple(TensorSpec(n, d, tuple(int(x) for x in s)) for n, d, s in zip(b["names"], b["dtypes"], b["shapes"])))
            for b in obj["buckets"])
        return cls(buckets=buckets, total_bytes=int(obj["total_bytes"]))


def dtype_name(d: str | torch.dtype) -> str:
    return str(dtype_from_name(d)).removeprefix("torch.")


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _close(specs: list[TensorSpec], start: int) -> Bucket:
    offsets, nbytes = bucket_layout([s.dtype for s in specs], [s.shape for s in specs], [s.name for s in specs])
    return Bucket(offset=start, nbytes=nbytes, specs=tuple(specs), tensor_offsets=tuple(offsets))


def plan_layout(specs: Sequence[TensorSpec], bucket_bytes: int) -> Layout:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a tensor larger than that gets a
    bucket of its own). A bucket is packed back to back (SGLang's flattened_bucket has no padding), so a
    tensor that would start at an offset its dtype cannot be viewed at (a float32 after an odd number of
    bfloat16 elements) starts a new bucket instead; with one wire dtype that never happens. Order is kept:
    the publisher streams tensors in it."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    if not specs:
        raise ValueError("plan_layout: no tensors to publish (the weight stream was empty)")
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"tensor name {s.name!r} appears twice in the weight stream")
        seen.add(s.name)
    buckets: list[Bucket] = []
    cur: list[TensorSpec] = []
    start = 0
    pos = 0  # bytes used in the open bucket
    for s in specs:
        if cur and (pos + s.nbytes > bucket_bytes or not is_aligned_after(pos, s.dtype)):
            buckets.append(_close(cur, start))
            start = _align(buckets[-1].offset + buckets[-1].nbytes, BUCKET_ALIGN)
            cur, pos = [], 0
        cur.append(s)
        pos += s.nbytes
    buckets.append(_close(cur, start))
    return Layout(buckets=tuple(buckets), total_bytes=_align(buckets[-1].offset + buckets[-1].nbytes, BUCKET_ALIGN))


def tensor_views(data: torch.Tensor, layout: Layout) -> list[tuple[TensorSpec, torch.Tensor]]:
    """(spec, typed view) for every tensor of a snapshot tensor `data` (1-D uint8)."""
    out = []
    for b in layout.buckets:
        for s, off in zip(b.specs, b.tensor_offsets):
            start = b.offset + off
            out.append((s, data[start:start + s.nbytes].view(dtype_from_name(s.dtype)).view(s.shape)))
    return out
