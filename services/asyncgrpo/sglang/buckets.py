"""Flattened buckets for weight sync: many tensors packed into one flat uint8 tensor, so a bucket is one
broadcast instead of one per tensor (SGLang's load_format="flattened_bucket").

Layout: SGLang 0.5.23's (FlattenedTensorBucket.empty in sglang/srt/weight_sync/tensor_bucket.py): tensors in
the given order, back to back, with no padding. The receiver views each tensor's bytes as its dtype without
a copy, so it refuses a tensor whose byte offset is not a multiple of its element size; so do we. A bucket
mixing dtypes must therefore be ordered or split by the sender so every offset is aligned
(weight_sync.layout.plan_layout splits), never padded. Sender and receiver compute the same layout from
(dtypes, shapes) alone, so only names/dtypes/shapes travel over HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'torch.float32' / torch.float16 -> torch.dtype; a clear error for anything else."""
    if isinstance(name, torch.dtype):
        return name
    d = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype (use names like 'float32', 'bfloat16')")
    return d


class UnalignedBucket(ValueError):
    """A tensor of a flattened bucket would start at a byte offset its dtype cannot be viewed at."""


def bucket_layout(dtypes: Sequence[str | torch.dtype], shapes: Sequence[Sequence[int]],
                  names: Sequence[str] | None = None) -> tuple[list[int], int]:
    """Byte offset of each tensor (back to back, no padding) and the total bucket size in bytes;
    UnalignedBucket when a tensor's offset is not a multiple of its element size, as SGLang refuses it."""
    if len(dtypes) != len(shapes):
        raise ValueError(f"dtypes ({len(dtypes)}) and shapes ({len(shapes)}) must have the same length")
    offsets, pos = [], 0
    for i, (d, s) in enumerate(zip(dtypes, shapes)):
        dt = dtype_from_name(d)
        dims = [int(x) for x in s]
        if any(x < 0 for x in dims):
            raise ValueError(f"tensor {names[i] if names else i}: negative dimension in shape {dims}")
        if pos % dt.itemsize:
            raise UnalignedBucket(
                f"tensor {names[i] if names else i} ({dt}) would start at byte {pos}, not a multiple of its "
                f"{dt.itemsize}-byte elements: order the bucket's tensors by falling element size or split it by dtype")
        offsets.append(pos)
        pos += dt.itemsize * math.prod(dims)
    return offsets, pos


def is_aligned_after(nbytes: int, dtype: str | torch.dtype) -> bool:
    """Whether a tensor of `dtype` may follow `nbytes` bytes of a bucket."""
    return nbytes % dtype_from_name(dtype).itemsize == 0


def pack_bucket(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous uint8 tensor holding every tensor back to back (on the first tensor's device)."""
    if not tensors:
        raise ValueError("pack_bucket needs at least one tensor")
    offsets, total = bucket_layout([t.dtype for t in tensors], [tuple(t.shape) for t in tensors])
    flat = torch.empty(total, dtype=torch.uint8, device=tensors[0].device)
    for t, off in zip(tensors, offsets):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        flat[off:off + raw.numel()] = raw
    return flat


def unpack_bucket(flat: torch.Tensor, dtypes: Sequence[str | torch.dtype], shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Views into `flat` with the given dtypes and shapes (clone them if `flat` is reused)."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"bucket must be a 1-D uint8 tensor, got {flat.dtype} with shape {tuple(flat.shape)}")
    offsets, total = bucket_layout(dtypes, shapes)
    if flat.numel() != total:
        raise ValueError(f"bucket has {flat.numel()} bytes but dtypes/shapes describe {total}")
    out = []
    for d, s, off in zip(dtypes, shapes, offsets):
        dt = dtype_from_name(d)
        n = torch.empty((), dtype=dt).element_size() * math.prod(int(x) for x in s)
        out.append(flat[off:off + n].view(dt).reshape([int(x) for x in s]))
    return out
