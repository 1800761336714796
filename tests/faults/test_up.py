"""`asyncgrpo up` as a user runs it: a typo fails before anything starts, a service that dies takes the run
down at once with its last log lines, SIGTERM stops everything and leaves no process and no shared memory,
and a clean run ends with an eval.json, one before -> after line and no ERROR line in any log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from faults.system import write_dataset

pytestmark = pytest.mark.slow


def _config(tmp: Path, model_dir: Path) -> Path:
    data = write_dataset(tmp / "train.jsonl", 200)
    write_dataset(tmp / "test.jsonl", 20)
    cfg = {"experiment_name": "up", "actor": {"path": str(model_dir), "group_size": 4, "dynamic_filtering": False},
           "train_dataset": {"path": str(data), "batch_size": 4},
           "rollout": {"max_new_tokens": 8, "max_concurrent_rollouts": 8}, "trainer": {"checkpoint_interval": 2}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _up(*args: str, **kw) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    return subprocess.Popen([sys.executable, "-m", "asyncgrpo.cli", "up", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True, **kw)


def _children_alive(run_dir: Path) -> list[str]:
    """Processes whose command line names this run directory (its services)."""
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout  # -ww: whole lines
    return [line for line in out.splitlines() if str(run_dir) in line and "ps -eo" not in line]


def _wait_for_step(p: subprocess.Popen[str], run_dir: Path, step: int, timeout: float = 240) -> None:
    """Until the run's trainer logged `step` (the run is up and training)."""
    log = run_dir / "logs" / "trainer.log"
    deadline = time.monotonic() + timeout
    while not (log.exists() and f"step {step}:" in log.read_text(errors="replace")):
        assert p.poll() is None, p.communicate()[0]
        assert time.monotonic() < deadline, f"no step {step} within {timeout:.0f} s"
        time.sleep(0.5)


def _snapshots(run_dir: Path) -> list[Path]:
    return [p for p in Path("/dev/shm/asyncgrpo").glob(f"{run_dir.name}-*")] if Path("/dev/shm/asyncgrpo").exists() else []


def test_a_typo_fails_before_anything_starts(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tmp_path, tiny_model_dir)
    t0 = time.monotonic()
    p = _up("--config", str(cfg), "--steps", "2", "--actor.grup_size=4", "--run-dir", str(tmp_path / "run"))
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and time.monotonic() - t0 < 30
    assert out.strip().splitlines() == ["asyncgrpo up: unknown config key 'actor.grup_size'. Did you mean "
                                        "'actor.group_size'? Valid keys at actor: " + out.split("Valid keys at actor: ")[1].strip()]
    assert not (tmp_path / "run").exists()


def test_a_bad_dataset_fails_before_anything_starts(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tmp_path, tiny_model_dir)
    (tmp_path / "train.jsonl").write_text('{"prompt": "Q: 1+1=?", "answer": "2"}\nthis is not json\n')
    p = _up("--config", str(cfg), "--steps", "2", "--run-dir", str(tmp_path / "run"))
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and len(out.strip().splitlines()) == 1 and "train.jsonl:2: not valid JSON" in out, out
    assert not (tmp_path / "run").exists()


def test_a_service_that_dies_stops_the_run_with_its_last_lines(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The trainer exits at start (TP 2 does not divide its world size of 1: only it can know): up stops
    everything at once and prints the trainer's last log lines, instead of waiting on a health check."""
    cfg = _config(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    p = _up("--config", str(cfg), "--steps", "50", "--run-dir", str(run_dir), "--eval-prompts", "0",
            "--trainer.tensor_parallel_size=2")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 1, out
    assert "trainer exited with code 2" in out and "Last lines of" in out and "tensor_parallel_size" in out, out
    assert not _children_alive(run_dir) and not _snapshots(run_dir)


def test_sigterm_stops_everything_and_a_clean_run_reports(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tmp_path, tiny_model_dir)
    # SIGTERM in the middle of a run
    stopped = tmp_path / "stopped"
    p = _up("--config", str(cfg), "--steps", "500", "--run-dir", str(stopped))
    _wait_for_step(p, stopped, 2)
    assert _snapshots(stopped), "the run's snapshot is in /dev/shm while it runs"
    os.killpg(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 130, out
    assert not _children_alive(stopped), _children_alive(stopped)
    assert not _snapshots(stopped), "shared memory removed"

    # a short clean run
    clean = tmp_path / "clean"
    p = _up("--config", str(cfg), "--steps", "3", "--run-dir", str(clean), "--eval-prompts", "8")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert (clean / "eval.json").is_file() and (clean / "hf" / "version_3" / "config.json").is_file()
    summary = [line for line in out.splitlines() if line.startswith("held-out gsm8k reward")]
    assert len(summary) == 1 and "->" in summary[0], out
    assert "ERROR/traceback" not in out, out
    for log in (clean / "logs").glob("*.log"):
        bad = [line for line in log.read_text(errors="replace").splitlines() if " ERROR " in line or "Traceback" in line]
        assert not bad, f"{log.name}: {bad}"
    assert not _children_alive(clean) and not _snapshots(clean)
    # secrets: the api/admin keys reach the services through the environment only; the Redis password is
    # only in files no other user can read
    conf = (clean / "config.yaml").read_text()
    assert "api_key: null" in conf and "admin_api_key: null" in conf
    password = yaml.safe_load(conf)["redis"]["url"].split("//:", 1)[1].split("@", 1)[0]
    holders = [p for p in clean.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert sorted(p.relative_to(clean).as_posix() for p in holders) == ["config.yaml", "redis/redis.conf"], holders
    assert all(p.stat().st_mode & 0o077 == 0 for p in holders), [oct(p.stat().st_mode) for p in holders]


def test_killing_up_itself_stops_its_services(tmp_path: Path, tiny_model_dir: Path) -> None:
    """kill -9 of `up` (no chance to clean up): the kernel tells every service to stop (PR_SET_PDEATHSIG), they
    stop within seconds, and the last of trainer and weight-sync removes the snapshot."""
    cfg = _config(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "killed"
    p = _up("--config", str(cfg), "--steps", "500", "--run-dir", str(run_dir))
    _wait_for_step(p, run_dir, 1)
    assert _children_alive(run_dir)
    p.kill()  # up alone, not its services
    p.wait(10)
    deadline = time.monotonic() + 90
    while _children_alive(run_dir) or _snapshots(run_dir):
        assert time.monotonic() < deadline, f"left behind: {_children_alive(run_dir)} {_snapshots(run_dir)}"
        time.sleep(0.5)
