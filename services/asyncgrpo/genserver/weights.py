"""Receiving and loading weights for genserver: broadcast from the trainer (per tensor or one flattened
bucket) into staging tensors, or safetensors from disk. Nothing here touches the live model; the engine
validates the staged tensors and applies them all at once, so a failed transfer leaves the old weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from asyncgrpo.sglang.buckets import bucket_layout, dtype_from_name, unpack_bucket


def receive_broadcast(group: object, names: list[str], dtypes: list[str], shapes: list[list[int]],
                      load_format: str | None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Receive `names` from rank 0 of `group` in order (blocking; the group's timeout bounds every call).
    `device` must suit the backend: cpu for gloo, the model's GPU for nccl."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) differ in length")
    if load_format in (None, "", "direct"):
        out = {}
        for name, d, s in zip(names, dtypes, shapes):
            t = torch.empty([int(x) for x in s], dtype=dtype_from_name(d), device=device)
            dist.broadcast(t, src=0, group=group)
            out[name] = t
        return out
    if load_format == "flattened_bucket":
        _, total = bucket_layout(dtypes, shapes)
        flat = torch.empty(total, dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=group)
        return dict(zip(names, unpack_bucket(flat, dtypes, shapes)))
    raise ValueError(f"load_format {load_format!r} is not supported; use null or 'flattened_bucket'")


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
