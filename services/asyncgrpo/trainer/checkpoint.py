"""Trainer checkpoints: model shard, optimizer, LR schedule, policy version, RNG and data position.

Layout: DIR/step_00000012/rank_00000.pt per global rank, DIR/step_00000012/meta.json, and DIR/latest
holding the name of the newest COMPLETE step directory (written last, after a barrier, then renamed
into place, so a crash mid-save leaves the previous checkpoint as the latest). Every file is fsynced
before the rename that publishes it: the trainer acknowledges the groups a checkpoint holds only after
save_checkpoint returns, so the checkpoint must survive the machine, not only the process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from asyncgrpo.trainer.model import load_megatron_state, unwrap


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, dst: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, dst)
    _fsync(dst.parent)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(trainer: Any, ckpt_dir: str | Path, data_position: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Save `trainer` (a GRPOTrainer) at its current version; collective over all ranks."""
    root = Path(ckpt_dir)
    step_dir = root / f"step_{trainer.version:08d}"
    if _rank() == 0:
        step_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = {
        "model": {k: v.detach().cpu().clone() for k, v in unwrap(trainer.model).state_dict().items() if not k.endswith("_extra_state")},
        "optimizer": _clone(trainer.optimizer.state_dict()),
        # The distributed optimizer keeps parameter state (main params, Adam moments) outside state_dict():
        # each rank saves its own shard, so a resume needs the same world size and TP.
        "dist_param_state": [_clone(o.get_parameter_state_dp_reshardable()) for o in _distributed(trainer.optimizer)],
        "scheduler": trainer.scheduler.state_dict(),
        "version": trainer.version,
        "rng": rng_state(),
        "data_position": data_position or {},
    }
    tmp = step_dir / f"rank_{_rank():05d}.pt.tmp"
    torch.save(state, tmp)
    _replace_durably(tmp, step_dir / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        meta = {"version": trainer.version, "world_size": world, "tp": trainer.cfg.trainer.tensor_parallel_size}
        meta_tmp = step_dir / "meta.json.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=1))
        _replace_durably(meta_tmp, step_dir / "meta.json")
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(step_dir.name)
        _replace_durably(latest_tmp, root / "latest")
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return step_dir


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    p = Path(ckpt_dir) / "latest"
    if not p.exists():
        return None
    step_dir = Path(ckpt_dir) / p.read_text().strip()
    return step_dir if step_dir.is_dir() else None


def load_checkpoint(trainer: Any, step_dir: str | Path) -> dict[str, Any]:
    """Restore `trainer` from step_dir (same world size and TP); returns the saved data position."""
    step_dir = Path(step_dir)
    meta = json.loads((step_dir / "meta.json").read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world_size"] != world or meta["tp"] != trainer.cfg.trainer.tensor_parallel_size:
        raise ValueError(
            f"checkpoint {step_dir} was written with world size {meta['world_size']} and TP {meta['tp']}; "
            f"this run has world size {world} and trainer.tensor_parallel_size={trainer.cfg.trainer.tensor_parallel_size}"
        )
    state = torch.load(step_dir / f"rank_{_rank():05d}.pt", map_location="cpu", weights_only=False)
    gpt = unwrap(trainer.model)
    load_megatron_state(gpt, {k: v for k, v in state["model"].items() if k in dict(gpt.named_parameters())})
    trainer.optimizer.load_state_dict(state["optimizer"])
    dist_opts = _distributed(trainer.optimizer)
    if len(dist_opts) != len(state.get("dist_param_state", [])):
        raise ValueError(f"checkpoint {step_dir} and this run disagree on trainer.use_distributed_optimizer; use the saved setting")
    for opt, param_state in zip(dist_opts, state["dist_param_state"]):
        _mark_unpadded(param_state)
        with torch.no_grad():
            opt.load_parameter_state_from_dp_reshardable(param_state)
        # megatron's load_state_dict gives every parameter the SAME step tensor; torch's Adam then bumps
        # it once per parameter per step, which breaks bias correction. Give each its own.
        for st in opt.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.version = int(state["version"])
    set_rng_state(state["rng"])
    return state["data_position"]


def _distributed(optimizer: Any) -> list[Any]:
    """The megatron DistributedOptimizer instances inside (a chained) optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def _clone(x: Any) -> Any:
    """A detached copy of a nested state (the optimizer hands out live references to its tensors)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _mark_unpadded(param_state: dict[Any, Any]) -> None:
    """load_parameter_state_from_dp_reshardable filters on a 'padding' flag that the matching getter
    does not write; every entry it wrote is a real parameter."""
    for key, per_dtype in param_state.items():
        if isinstance(key, int):
            for buckets in per_dtype.values():
                for bucket in buckets:
                    for entry in bucket:
                        entry.setdefault("padding", False)
