"""`asyncgrpo trainer`'s loop against a real redis-server: batches, stale drops, acks, version, weights, resume."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from asyncgrpo.queue import Completion, Group, GroupQueue, RunState
from asyncgrpo.trainer.service import TrainerService, checkpoint_dir
from asyncgrpo.trainer.train_step import GRPOTrainer
from trainer.workers import make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world1")]


def _group(cfg, position: int, version: int, seed: int) -> Group:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    comps = []
    for i in range(cfg.actor.group_size):
        n = rng.randint(2, 6)
        comps.append(Completion([rng.randrange(256) for _ in range(n)], [-5.9] * n, [(version, 0, n)], "stop", float(i % 2)))
    return Group(run_id=cfg.run_id, group_id=f"e0-p{position}-a0", prompt_id=str(position), epoch=0, position=position,
                 attempt=0, prompt_ids=[rng.randrange(256) for _ in range(4)], completions=comps)


def _loop_setup(model_dir: Path, tmp_path: Path, redis_url: str, *, batch_size: int, checkpoint_interval: int,
                poll_timeout_s: float):  # type: ignore[no-untyped-def]
    """A trainer config on this Redis with its checkpoints under tmp_path, and the run's queue and state."""
    cfg = make_config(model_dir)
    cfg.redis.url = redis_url
    cfg.train_dataset.batch_size = batch_size
    cfg.trainer.checkpoint_dir = str(tmp_path / "ckpt")
    cfg.trainer.checkpoint_interval = checkpoint_interval
    cfg.trainer.poll_timeout_s = poll_timeout_s
    return cfg, GroupQueue.from_url(redis_url, cfg.run_id), RunState.from_url(redis_url, cfg.run_id)


def test_loop_trains_drops_stale_acks_and_resumes(tiny_model_dir: Path, tmp_path: Path, redis_server) -> None:  # type: ignore[no-untyped-def]
    cfg, queue, state = _loop_setup(tiny_model_dir, tmp_path, redis_server.url, batch_size=2, checkpoint_interval=2,
                                    poll_timeout_s=0.1)
    cfg.rollout.max_head_offpolicyness = 0
    published: list[tuple[int, list[str]]] = []

    def sink(it, version: int) -> None:  # type: ignore[no-untyped-def]
        published.append((version, [name for name, _ in it]))

    service = TrainerService(cfg, GRPOTrainer(cfg), queue, state, weight_sink=sink)
    assert service.resume() == 0
    for p in range(2):
        queue.push(_group(cfg, p, version=0, seed=p))
    assert service.run(max_steps=1).steps == 1
    assert state.get_version() == 1 and queue.depth() == 0

    # At version 1 with bound 0, a version-0 group is stale: dropped, its prompt re-queued as the next attempt.
    queue.push(_group(cfg, 2, version=0, seed=2))
    for p in (3, 4):
        queue.push(_group(cfg, p, version=1, seed=p))
    stats = service.run(max_steps=1)
    assert (stats.steps, stats.groups_trained, stats.groups_dropped_stale) == (2, 4, 1)
    assert [str(r.key()) for r in state.requeued()] == ["0:2:1"]
    assert state.get_version() == 2 and queue.depth() == 0 and queue.pending() == 0
    assert [v for v, _ in published] == [1, 2]
    assert "model.embed_tokens.weight" in published[0][1] and len(published[0][1]) == len(set(published[0][1]))

    # No full batch: the loop gives up after the idle timeout instead of blocking forever.
    queue.push(_group(cfg, 5, version=2, seed=5))
    assert service.run(max_steps=1, idle_timeout_s=0.3).steps == 2

    # A restarted trainer resumes from the version-2 checkpoint, and re-reads the group consumed but never acked.
    assert (checkpoint_dir(cfg) / "latest").read_text() == "step_00000002"
    state.set_version(0)
    queue.push(_group(cfg, 6, version=2, seed=6))
    restarted = TrainerService(cfg, GRPOTrainer(cfg), queue, state, weight_sink=sink)
    assert restarted.resume() == 2 and state.get_version() == 2
    assert restarted.run(max_steps=1).groups_trained == 2
    assert state.get_version() == 3 and queue.depth() == 0


def test_trainer_command_end_to_end(tiny_model_dir: Path, tmp_path: Path, redis_server) -> None:  # type: ignore[no-untyped-def]
    """The real `asyncgrpo trainer` process: two steps from the queue, version in Redis, a checkpoint at exit."""
    import os
    import subprocess
    import sys

    cfg = make_config(tiny_model_dir)
    cfg.redis.url = redis_server.url
    queue = GroupQueue.from_url(cfg.redis.url, cfg.run_id)
    for p in range(4):
        queue.push(_group(cfg, p, version=0, seed=p))
    proc = subprocess.run(
        [sys.executable, "-m", "asyncgrpo.cli", "trainer", f"--actor.path={tiny_model_dir}", f"--redis.url={redis_server.url}",
         f"--fileroot={tmp_path}", "--actor.group_size=4", "--train_dataset.batch_size=2", "--max-steps", "2",
         "--idle-timeout-s", "2", "--no-weight-sync"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trainer done: 2 steps, 4 groups trained" in proc.stderr
    assert RunState.from_url(cfg.redis.url, cfg.run_id).get_version() == 2 and queue.depth() == 0
    assert (tmp_path / cfg.experiment_name / cfg.trial_name / "checkpoints" / "latest").read_text() == "step_00000002"


def test_service_under_data_parallelism(tiny_model_dir: Path, tmp_path: Path, redis_server) -> None:  # type: ignore[no-untyped-def]
    """DP=2 (spawned, gloo): rank 0 consumes and broadcasts; both ranks step in lockstep to the same weights."""
    import socket

    import torch.multiprocessing as mp

    from trainer.workers import service_worker

    cfg = make_config(tiny_model_dir)
    queue = GroupQueue.from_url(redis_server.url, cfg.run_id)
    for p in range(4):
        queue.push(_group(cfg, p, version=0, seed=p))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(service_worker, args=(2, port, str(tiny_model_dir), redis_server.url, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["steps"] == r1["steps"] == 2 and r0["loss"] == r1["loss"]
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    assert RunState.from_url(redis_server.url, cfg.run_id).get_version() == 2 and queue.depth() == 0


def test_control_plane_reaches_a_trainer_waiting_for_groups(tiny_model_dir: Path, tmp_path: Path, redis_server) -> None:  # type: ignore[no-untyped-def]
    """The trainer spends most of its time waiting for a batch: a pause, a knob and a stop must reach it there.
    Pause: it stops collecting and parks (trainer_state 'paused') with what it collected kept pending. A new
    temperature while groups of the old one wait: they are dropped as stale at once (no livelock waiting for
    a batch of the old temperature). Stop: run() returns while the queue stays short of a batch."""
    import json
    import threading
    import time

    from asyncgrpo.queue.run_control import RunControl, redacted_config

    cfg, queue, state = _loop_setup(tiny_model_dir, tmp_path, redis_server.url, batch_size=4, checkpoint_interval=0,
                                    poll_timeout_s=0.2)
    control = RunControl(state.r, cfg.run_id)
    control.register(redacted_config(cfg))
    service = TrainerService(cfg, GRPOTrainer(cfg), queue, state, control=control)
    service.resume()
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(service.run()), daemon=True)
    t.start()

    def until(what: str, cond, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline and t.is_alive(), what
            time.sleep(0.05)

    t0 = cfg.actor.temperature
    for p in range(2):  # half a batch, sampled at the trainer's temperature
        g = _group(cfg, p, version=0, seed=p)
        g.temperature = t0
        queue.push(g)
    until("the trainer holds the two groups", lambda: queue.pending() == 2)
    state.set_paused(True)
    until("parked", lambda: control.info()["trainer_state"] == "paused")
    assert len(service._pending) == 2 and state.get_version() == 0
    control.set_knobs({"actor.temperature": (t0, 0.5)}, "test")
    state.set_paused(False)
    until("the old-temperature groups dropped", lambda: queue.pending() == 0 and len(state.requeued()) == 2)
    assert service.cfg.actor.temperature == 0.5 and state.get_version() == 0
    control.set_mode("stop")
    t.join(30)
    assert not t.is_alive() and done and done[0].steps == 0  # type: ignore[attr-defined]
    assert json.loads(state.r.hget(control.keys.counters, "stale_requeued") or b"0") == 2


def test_trainer_stops_when_the_prompts_ran_out(tiny_model_dir: Path, tmp_path: Path, redis_server, caplog) -> None:  # type: ignore[no-untyped-def]
    """Dynamic filtering used up the last prompts: the trainer, one group short of a batch with nothing running
    or re-queued, ends its run (checkpoint and HF model saved) and says why, instead of waiting forever."""
    import logging

    cfg, queue, state = _loop_setup(tiny_model_dir, tmp_path, redis_server.url, batch_size=2, checkpoint_interval=5,
                                    poll_timeout_s=0.1)
    cfg.total_train_epochs = 1
    state.init_cursor(4, seed=0)
    refs = [state.admit(max_head_offpolicyness=5, batch_groups=2, dataset_size=4, total_epochs=1, lease_ttl_s=60).ref
            for _ in range(4)]
    for ref in refs[:3]:  # three pushed, the fourth filtered; one lease still held while the trainer starts
        queue.push(_group(cfg, ref.position, version=0, seed=ref.position))
        state.release_lease(ref, "groups_pushed")
    service = TrainerService(cfg, GRPOTrainer(cfg), queue, state)
    service.resume()
    assert service.run(max_steps=1).steps == 1  # a full batch; one group left pending, the lease still held
    assert state.prompts_exhausted(1) is False
    state.release_lease(refs[3], "groups_filtered")
    with caplog.at_level(logging.WARNING, logger="asyncgrpo"):
        stats = service.run(max_steps=10, idle_timeout_s=60)
    assert stats.steps == 1 and state.get_version() == 1
    assert "the prompts ran out at version 1" in caplog.text and "1 groups filtered" in caplog.text, caplog.text
    assert "batch is 1 groups short" in caplog.text and "total_train_epochs" in caplog.text
    assert (checkpoint_dir(cfg) / "latest").read_text() == "step_00000001"  # the clean end checkpoints


def test_resumed_at_its_last_step_the_final_hf_model_is_written(tiny_model_dir: Path, tmp_path: Path, redis_server) -> None:  # type: ignore[no-untyped-def]
    """A run killed after its last checkpoint but before that step's HF model (seen in CI: `up` killed mid-run
    while the trainer finished) resumes with nothing to train and still leaves its final model."""
    import shutil

    cfg, queue, state = _loop_setup(tiny_model_dir, tmp_path, redis_server.url, batch_size=2, checkpoint_interval=2,
                                    poll_timeout_s=0.1)
    cfg.trainer.hf_save_interval = 1000  # only the end-of-run model
    hf = checkpoint_dir(cfg).parent / "hf"
    idle = TrainerService(cfg, GRPOTrainer(cfg), queue, state)
    assert idle.resume() == 0 and idle.run(max_steps=0).steps == 0
    assert not hf.exists()  # no step taken, no model: version 0 is the initial one
    for p in range(4):
        queue.push(_group(cfg, p, version=0, seed=p))
    service = TrainerService(cfg, GRPOTrainer(cfg), queue, state)
    assert service.resume() == 0 and service.run(max_steps=2).steps == 2
    assert (hf / "version_2" / "config.json").exists()
    shutil.rmtree(hf)  # the kill came between the checkpoint and the HF model
    restarted = TrainerService(cfg, GRPOTrainer(cfg), queue, state)
    assert restarted.resume() == 2 and restarted.run(max_steps=0).steps == 0
    assert (hf / "version_2" / "model.safetensors").exists(), sorted(hf.rglob("*")) if hf.exists() else "no hf dir"
