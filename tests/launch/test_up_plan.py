"""What `up` plans to start for each launch.engine: commands, GPUs, keys (never on a command line)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from asyncgrpo.config import ConfigError, load_config
from asyncgrpo.launch.up import _check_launch, plan_run


def _cfg(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return load_config([], ["--actor.path=/models/qwen", "--trainer.max_steps=5", f"--fileroot={tmp_path}",
                            *(f"--{o}" for o in overrides)])


def test_sglang_servers_get_their_gpus_and_keys_in_a_private_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("ASYNCGRPO_API_KEY", raising=False)
    monkeypatch.delenv("ASYNCGRPO_ADMIN_API_KEY", raising=False)
    cfg = _cfg(tmp_path, "launch.engine=sglang", "launch.servers=2", "launch.gpus_per_server=2", "launch.trainer_gpus=2",
               "launch.sglang_args=[--mem-fraction-static, '0.7']")
    plan = plan_run(cfg, tmp_path / "run", redis_url="redis://127.0.0.1:1/0")
    by_name = {s.name: s for s in plan.services}
    assert list(by_name) == ["sglang0", "sglang1", "weight-sync", "rollout", "control", "trainer"]
    s0 = by_name["sglang0"]
    assert s0.argv[1:3] == ["-m", "sglang.launch_server"] and s0.argv[-2:] == ["--mem-fraction-static", "0.7"]
    assert s0.argv[s0.argv.index("--tp-size") + 1] == "2" and s0.argv[s0.argv.index("--model-path") + 1] == "/models/qwen"
    assert [by_name[n].env["CUDA_VISIBLE_DEVICES"] for n in ("trainer", "weight-sync", "sglang0", "sglang1")] == \
        ["0,1", "0", "2,3", "4,5"]
    assert by_name["trainer"].argv[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in by_name["trainer"].argv
    assert plan.cfg.rollout.server_urls == [f"http://127.0.0.1:{s.argv[s.argv.index('--port') + 1]}" for s in (s0, by_name["sglang1"])]

    plan.write()
    conf = Path(s0.argv[s0.argv.index("--config") + 1])
    keys = yaml.safe_load(conf.read_text())
    assert keys == {"api_key": plan.env["ASYNCGRPO_API_KEY"], "admin_api_key": plan.env["ASYNCGRPO_ADMIN_API_KEY"]}
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    everywhere = " ".join(" ".join(s.argv) for s in plan.services) + (plan.run_dir / "config.yaml").read_text()
    assert keys["api_key"] not in everywhere and keys["admin_api_key"] not in everywhere


def test_genserver_default_keeps_the_trainer_off_gpus(tmp_path: Path) -> None:
    plan = plan_run(_cfg(tmp_path), tmp_path / "run", redis_url="redis://127.0.0.1:1/0")
    assert [s.name for s in plan.services][:2] == ["genserver", "weight-sync"]
    assert plan.service("trainer").env == {"CUDA_VISIBLE_DEVICES": ""}
    assert plan.service("trainer").argv[1:4] == ["-m", "asyncgrpo.cli", "trainer"]


def test_external_servers_are_not_started_and_keep_their_keys(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("ASYNCGRPO_API_KEY", raising=False)
    monkeypatch.setenv("ASYNCGRPO_ADMIN_API_KEY", "adm")
    cfg = _cfg(tmp_path, "launch.engine=external", "rollout.server_urls=[http://gpu-node:30000]")
    plan = plan_run(cfg, tmp_path / "run", redis_url="redis://127.0.0.1:1/0")
    assert [s.name for s in plan.services] == ["weight-sync", "rollout", "control", "trainer"]
    assert plan.cfg.rollout.server_urls == ["http://gpu-node:30000"]
    # no fresh keys invented for servers started elsewhere: the ones they have, or none
    assert "ASYNCGRPO_API_KEY" not in plan.env and plan.env["ASYNCGRPO_ADMIN_API_KEY"] == "adm"


def test_launch_is_checked_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="launch.trainer_gpus >= 1"):
        _check_launch(_cfg(tmp_path, "launch.engine=sglang").launch, [], probe=False)
    import torch

    if torch.cuda.device_count() < 64:
        with pytest.raises(ConfigError, match=r"launch asks for 65 GPUs .* lower them"):
            _check_launch(_cfg(tmp_path, "launch.trainer_gpus=65").launch, [], probe=True)
    with pytest.raises(ConfigError, match=r"rollout.server_urls\[0\] http://127.0.0.1:9 does not answer"):
        _check_launch(_cfg(tmp_path, "launch.engine=external").launch, ["http://127.0.0.1:9"], probe=True)
    with pytest.raises(ConfigError, match="unknown config key|Input should be"):
        _cfg(tmp_path, "launch.engine=vllm")
