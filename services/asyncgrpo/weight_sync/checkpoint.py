"""Disk fallback: an HF safetensors checkpoint of a snapshot, for servers that cannot join the group.

Written by the service from the shared-memory snapshot (not by the trainer), so the trainer is never
blocked on disk I/O; config.json and tokenizer files come from the base model dir so the directory loads
with /update_weights_from_disk like any HF checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from asyncgrpo.weight_sync.layout import tensor_views
from asyncgrpo.weight_sync.snapshot import Manifest

# Every file of a HF model dir that is not weights: config, generation config, tokenizer.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def write_checkpoint(manifest: Manifest, data: torch.Tensor, out_root: str | Path, base_model_path: str | None,
                     keep: int = 2) -> Path:
    """Write `out_root/v{version}-{published_at}` (atomically: tmp dir + rename) and delete all but the newest
    `keep`. The publish time is in the name because a trainer resumed from an older checkpoint publishes a
    version number again, with other weights."""
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"v{manifest.version:08d}-{int(manifest.published_at * 1e6):017d}"
    if out.exists():
        return out
    tmp = root / f".tmp-v{manifest.version:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {spec.name: view for spec, view in tensor_views(data, manifest.layout)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "weight_version": str(manifest.version)})
    if base_model_path:
        base = Path(base_model_path)
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(_SKIP_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        cfg_path = tmp / "config.json"
        if cfg_path.exists():
            dtypes = {s.dtype for s in manifest.layout.specs}
            if len(dtypes) == 1:
                cfg = json.loads(cfg_path.read_text())
                key = "torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"
                cfg[key] = next(iter(dtypes))
                cfg_path.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, out)
    for old in sorted((p for p in root.glob("v*") if p.is_dir()), key=lambda p: p.stat().st_mtime)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out
