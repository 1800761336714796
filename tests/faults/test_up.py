"""`asyncgrpo up` as a user runs it: a typo fails before anything starts, a service that dies takes the run
down at once with its last log lines, SIGTERM stops everything and leaves no process and no shared memory,
and a clean run ends with an eval.json, one before -> after line and no ERROR line in any log."""

from __future__ import annotations

import contextlib
import json
import os
import re
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
    cfg = {"experiment_name": "up", "total_train_epochs": 20,  # 500 steps x 4 prompts: the runs that are stopped
           "actor": {"path": str(model_dir), "group_size": 4},
           "train_dataset": {"path": str(data), "batch_size": 4},
           "rollout": {"dynamic_filtering": False, "max_new_tokens": 8, "max_concurrent_rollouts": 8}, "trainer": {"checkpoint_interval": 2}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


_spawned: list[subprocess.Popen[str]] = []


def _up(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    p = subprocess.Popen([sys.executable, "-m", "asyncgrpo.cli", "up", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                         start_new_session=True, **kw)
    _spawned.append(p)
    return p


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A test that fails (or times out) mid-run must not leave its `up` and services running behind it: they
    would load the machine for every later test. SIGTERM is up's clean stop; SIGKILL if it does not."""
    yield
    while _spawned:
        p = _spawned.pop()
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


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


def test_a_run_longer_than_its_data_fails_before_anything_starts(tmp_path: Path, tiny_model_dir: Path) -> None:
    """It would wait for prompts forever once the epochs are used up."""
    cfg = _config(tmp_path, tiny_model_dir)
    p = _up("--config", str(cfg), "--steps", "1001", "--run-dir", str(tmp_path / "run"))  # 4004 prompts > 200 x 20
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and len(out.strip().splitlines()) == 1, out
    assert "need 4004 prompts, but 200 records x total_train_epochs 20 give 4000; raise total_train_epochs to 21" in out, out
    assert not (tmp_path / "run").exists()


def test_a_run_whose_prompts_run_out_ends_and_says_why(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The untrained model scores 0 on every completion, so dynamic filtering drops every group: the one epoch
    of 12 prompts runs out before a batch. The run ends (it used to wait forever) and up names cause and fix."""
    cfg = _config(tmp_path, tiny_model_dir)
    data = write_dataset(tmp_path / "twelve.jsonl", 12)
    run_dir = tmp_path / "run"
    p = _up("--config", str(cfg), "--steps", "2", "--run-dir", str(run_dir), "--evaluator.prompts=0",
            f"--train_dataset.path={data}", "--total_train_epochs=1", "--rollout.dynamic_filtering=true")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 1, out
    assert "the run ended at version 0 of 2: the prompts ran out at version 0" in out, out
    assert "12 groups filtered" in out and "Raise total_train_epochs" in out, out
    assert not _children_alive(run_dir) and not _snapshots(run_dir)


def test_external_servers_are_used_with_their_own_keys(tmp_path: Path, tiny_model_dir: Path) -> None:
    """launch.engine external: up starts no generation server. The rollout samples from the running one and
    weight-sync updates it, with the keys it was started with (from the environment); it outlives the run."""
    import httpx

    from genserver.procs import GenServer

    cfg = _config(tmp_path, tiny_model_dir)
    server = GenServer(tiny_model_dir, tmp_path / "external.log", "--api-key", "k-ext", "--admin-api-key", "a-ext")
    run_dir = tmp_path / "run"
    try:
        p = _up("--config", str(cfg), "--steps", "2", "--run-dir", str(run_dir), "--evaluator.prompts=0",
                "--launch.engine=external", f"--rollout.server_urls=[{server.url}]",
                env={"ASYNCGRPO_API_KEY": "k-ext", "ASYNCGRPO_ADMIN_API_KEY": "a-ext"})
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
        assert not (run_dir / "logs" / "genserver.log").exists() and server.proc.poll() is None, out
        info = httpx.get(f"{server.url}/model_info", headers={"Authorization": "Bearer k-ext"}, timeout=10).json()
        # weight-sync reached it with the admin key (the last version may not land before up stops weight-sync)
        assert int(info["weight_version"]) >= 1, info
        # started without its keys, up names the server that does not answer and starts nothing
        p = _up("--config", str(cfg), "--steps", "2", "--run-dir", str(tmp_path / "nothing"), "--launch.engine=external",
                "--rollout.server_urls=[http://127.0.0.1:9]")
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 2 and "rollout.server_urls[0] http://127.0.0.1:9 does not answer" in out, out
        assert not (tmp_path / "nothing").exists()
    finally:
        server.stop()


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
    p = _up("--config", str(cfg), "--steps", "50", "--run-dir", str(run_dir), "--evaluator.prompts=0",
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
    p = _up("--config", str(cfg), "--steps", "3", "--run-dir", str(clean), "--evaluator.prompts=8",
            "--evaluator.freq_steps=1")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert (clean / "eval.json").is_file() and (clean / "hf" / "version_3" / "config.json").is_file()
    summary = [line for line in out.splitlines() if line.startswith("held-out gsm8k reward")]
    assert len(summary) == 1 and "->" in summary[0], out
    # not a terminal: one plain line per step; the held-out evaluations during the run (through the
    # genserver) and the final one are in evals.jsonl, and the curves are drawn
    assert [int(m) for m in re.findall(r"^step (\d+)/3\b", out, re.M)] == [1, 2, 3], out
    evals = [json.loads(line) for line in (clean / "evals.jsonl").read_text().splitlines()]
    served = [e for e in evals if e.get("source") != "final"]
    # the first at point 0 (under load the trainer may have stepped before the thread asked the server, so the
    # versions it saw are not asserted; the final rows below are the warm start and the final model)
    assert served and served[0]["point"] == 0 and served[0]["prompts"] == 8, evals
    assert re.search(r"^held-out at version \d+: sampled", out, re.M), out
    assert [e["version"] for e in evals if e.get("source") == "final"] == [0, 3], evals
    assert (clean / "curves" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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


def test_resume_after_up_itself_was_killed_loses_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    """kill -9 of `up` mid-run, then `up --resume RUN_DIR`: the run continues from its last checkpoint and its
    Redis data (the private redis-server's AOF) to the end. The final model's lineage holds every step's batch
    once, and every group ever pushed is trained once, dropped as stale, dead-lettered or still queued."""
    cfg = _config(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "resumed"
    p = _up("--config", str(cfg), "--steps", "6", "--run-dir", str(run_dir), "--evaluator.prompts=0")
    _wait_for_step(p, run_dir, 3)
    p.kill()
    p.wait(10)
    deadline = time.monotonic() + 90
    while _children_alive(run_dir):
        assert time.monotonic() < deadline, f"left behind: {_children_alive(run_dir)}"
        time.sleep(0.5)
    # a run that is still running is refused, by name; a directory that is no run too
    bad = _up("--resume", str(tmp_path), "--evaluator.prompts=0")
    out, _ = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "no config.yaml there" in out, out

    p = _up("--resume", str(run_dir), "--evaluator.prompts=4")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert "held-out gsm8k reward" in out and (run_dir / "hf" / "version_6" / "config.json").is_file(), out
    assert not _children_alive(run_dir) and not (run_dir / "up.pid").exists()
    steps = [int(m) for m in re.findall(r"^step (\d+)/", out, re.M)]
    assert steps and steps[-1] == 6 and steps[0] > 1, f"the resumed run re-trained from the start: {steps}"

    import torch

    ckpt = run_dir / "checkpoints"
    lineage = torch.load(ckpt / (ckpt / "latest").read_text().strip() / "rank_00000.pt", map_location="cpu",
                         weights_only=False)["data_position"]["lineage"]
    trained = [g for batch in lineage for g in batch]
    assert len(lineage) == 6 and len(trained) == len(set(trained)) == 6 * 4, lineage
    pushed, stale, dead, queued = _run_groups(run_dir)
    lost = pushed - set(trained) - stale - dead - queued
    assert not lost and not set(trained) & (stale | dead), (sorted(lost), len(pushed), len(stale), len(dead), len(queued))


def _run_groups(run_dir: Path) -> tuple[set[str], set[str], set[str], set[str]]:
    """(pushed, stale, dead, queued) group ids, read from the run's Redis data: its redis-server started again
    on the run's AOF, privately, on a unix socket."""
    import redis

    from asyncgrpo.queue import GroupQueue, RunKeys

    conf = run_dir / "redis" / "redis.conf"
    sock = run_dir / "redis" / "inspect.sock"
    srv = subprocess.Popen(["redis-server", str(conf), "--port", "0", "--unixsocket", str(sock), "--dir", str(conf.parent),
                            "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        password = conf.read_text().split()[1]
        r = redis.Redis(unix_socket_path=str(sock), password=password)
        deadline = time.monotonic() + 60
        while True:  # answering, not just bound: the socket file exists a moment before it listens
            try:
                if sock.exists() and r.ping():
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start on the run's AOF"
            time.sleep(0.1)
        run_id = yaml.safe_load((run_dir / "config.yaml").read_text())
        run_id = f"{run_id['experiment_name']}/{run_id['trial_name']}"
        k = RunKeys(run_id)
        outcomes = GroupQueue(r, run_id).outcomes()
        return ({g.decode() for g in r.hkeys(k.group_ids)}, {g for g, o in outcomes.items() if o == "stale"},
                {g for g, o in outcomes.items() if o == "dead"},
                {f[b"gid"].decode() for _, f in r.xrange(k.stream) if f})
    finally:
        srv.terminate()
        srv.wait(10)
