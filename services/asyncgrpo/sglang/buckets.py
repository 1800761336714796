"""Flattened buckets for weight sync: many tensors packed into one flat uint8 tensor, so a bucket is one
broadcast instead of one per tensor (SGLang's load_format="flattened_bucket").

Layout: tensors in the given order, each starting at an offset that is a multiple of its dtype's element
size (so the receiver can view the bytes as that dtype without a copy); the gaps are zero bytes. Sender and
receiver compute the same layout from (dtypes, shapes) alone, so only names/dtypes/shapes travel over HTTP.
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


def bucket_layout(dtypes: Sequence[str | torch.dtype], shapes: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Byte offset of each tensor and the total bucket size in bytes."""
    if len(dtypes) != len(shapes):
        raise ValueError(f"dtypes ({len(dtypes)}) and shapes ({len(shapes)}) must have the same length")
    offsets, pos = [], 0
    for d, s in zip(dtypes, shapes):
        size = torch.empty((), dtype=dtype_from_name(d)).element_size()
        pos = (pos + size - 1) // size * size
        offsets.append(pos)
        pos += size * math.prod(int(x) for x in s)
    return offsets, pos


def pack_bucket(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous uint8 tensor holding every tensor at its aligned offset (on the first tensor's device)."""
    if not tensors:
        raise ValueError("pack_bucket needs at least one tensor")
    offsets, total = bucket_layout([t.dtype for t in tensors], [tuple(t.shape) for t in tensors])
    flat = torch.zeros(total, dtype=torch.uint8, device=tensors[0].device)
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
