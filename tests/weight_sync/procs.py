"""Real processes for the weight-sync integration tests (genservers and the weight-sync service), the
trainer export they publish, and the check of a server's weights against it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml
from service_procs import Proc, start_http_service, wait_until
from service_procs import start_genserver as _start_genserver

__all__ = ["Proc", "export", "server_weights_equal", "start_genserver", "start_weight_sync", "wait_until"]


def start_genserver(model_dir: Path, port: int, log: Path, dist_timeout_s: float = 30) -> Proc:
    # Appends: a server restarted on the same port keeps one log.
    return _start_genserver(model_dir, port, log, "--dist-timeout-s", str(dist_timeout_s), "--weight-version", "0",
                            append=True)


def start_weight_sync(cfg: dict[str, Any], workdir: Path, log: Path) -> Proc:
    path = workdir / "weight_sync.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = [sys.executable, "-m", "asyncgrpo.cli", "weight-sync", "--config", str(path)]
    return start_http_service(args, f"http://127.0.0.1:{cfg['weight_sync']['port']}/health", log, 60, append=True)


def export(model_dir: Path, version: int) -> list[tuple[str, torch.Tensor]]:
    """The "trainer export" of `version`: the tiny model's parameters plus a version-seeded perturbation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(version)
    return [(n, (p.detach() + 0.05 * torch.randn(p.shape, generator=g)).contiguous()) for n, p in model.named_parameters()]


def server_weights_equal(url: str, named: list[tuple[str, torch.Tensor]], dtype: torch.dtype = torch.float32) -> None:
    """Every tensor of `named` on the server at `url`, exactly, once rounded to `dtype` (the wire's and the server's)."""
    for name, t in named:
        r = httpx.post(f"{url}/get_weights_by_name", json={"name": name, "truncate_size": 1 << 20}, timeout=30)
        r.raise_for_status()
        got = torch.tensor(r.json(), dtype=torch.float32)
        assert torch.equal(got, t.to(dtype).float()), f"{url}: {name} differs from the trainer's export"
