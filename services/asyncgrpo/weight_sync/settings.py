"""cfg.weight_sync with its null defaults resolved against the rest of the run config (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SyncSettings:
    servers: list[str]
    disk_servers: list[str]
    tensor_servers: list[str]
    snapshot_dir: Path
    checkpoint_dir: Path
    base_model_path: str | None
    backend: str  # "gloo" | "nccl"
    wire_dtype: str | None  # None: each tensor's own dtype
    bucket_bytes: int
    service_url: str
    # No defaults here: resolve() fills every field from cfg.weight_sync, whose schema holds the one set of defaults.
    host: str
    port: int
    master_address: str
    master_port: int
    pause_mode: str
    group_timeout_s: float
    collective_timeout_s: float
    request_timeout_s: float
    resync_interval_s: float
    transport_fallback: bool
    tensor_device: str
    keep_checkpoints: int
    metrics_port: int
    api_key: str | None  # cfg.auth resolved (env fallback): sent to the servers and required by this service's API
    admin_api_key: str | None


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def synced_servers(servers: list[str] | None, rollout_urls: list[str], disk_servers: list[str],
                   tensor_servers: Sequence[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """(broadcast, disk, tensor) servers of a run: weight_sync.servers, else the rollout's server_urls, are
    broadcast members unless also listed as disk servers (they cannot join the group) or tensor servers
    (on this host: weights by reference). Trailing slashes dropped."""
    disk = [u.rstrip("/") for u in disk_servers]
    tensor = [u.rstrip("/") for u in tensor_servers if u.rstrip("/") not in disk]
    chosen = servers if servers is not None else rollout_urls
    return [u.rstrip("/") for u in chosen if u.rstrip("/") not in disk and u.rstrip("/") not in tensor], disk, tensor


def resolve(cfg) -> SyncSettings:  # type: ignore[no-untyped-def]
    from asyncgrpo.utils.auth import resolve_keys

    ws = cfg.weight_sync
    api_key, admin_api_key = resolve_keys(cfg.auth.api_key, cfg.auth.admin_api_key)
    backend = ws.backend if ws.backend != "auto" else ("nccl" if _cuda() else "gloo")
    dtype = ws.dtype if ws.dtype != "auto" else ("bfloat16" if backend == "nccl" else None)
    servers, disk, tensor = synced_servers(ws.servers, list(cfg.rollout.server_urls), list(ws.disk_servers),
                                           list(ws.tensor_servers))
    snap = Path(ws.snapshot_dir) if ws.snapshot_dir else Path("/dev/shm/asyncgrpo") / cfg.experiment_name / cfg.trial_name
    ckpt = Path(ws.checkpoint_dir) if ws.checkpoint_dir else Path(cfg.fileroot) / cfg.experiment_name / cfg.trial_name / "weight_sync"
    host = "127.0.0.1" if ws.host in ("0.0.0.0", "::") else ws.host
    return SyncSettings(
        servers=servers, disk_servers=disk, tensor_servers=tensor, snapshot_dir=snap, checkpoint_dir=ckpt,
        base_model_path=ws.base_model_path or cfg.actor.path or None, backend=backend, wire_dtype=dtype,
        bucket_bytes=int(ws.bucket_size_mb * (1 << 20)), service_url=f"http://{host}:{ws.port}", host=ws.host,
        port=ws.port, master_address=ws.master_address, master_port=ws.master_port, pause_mode=ws.pause_mode,
        group_timeout_s=ws.group_timeout_s, collective_timeout_s=ws.collective_timeout_s,
        request_timeout_s=ws.request_timeout_s, resync_interval_s=ws.resync_interval_s,
        transport_fallback=ws.transport_fallback, tensor_device=ws.tensor_device, keep_checkpoints=ws.keep_checkpoints, metrics_port=ws.metrics_port,
        api_key=api_key, admin_api_key=admin_api_key)
