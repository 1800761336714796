"""Fault tests on the real processes of a run (planned as `asyncgrpo up` plans it: redis-server with AOF,
genserver, weight-sync, rollout, trainer): SIGKILL one process mid-run, start it again, and the run finishes
its steps with nothing restarted but the killed process. Every pushed group is accounted for by group id
(pushed = trained into the final model + dropped stale + dead-lettered + pending), none is trained twice
into the final model, and the longest gap between two policy versions is bounded and reported."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from faults.system import System, fault_config, write_dataset

pytestmark = pytest.mark.slow

# victim: (steps, checkpoint_interval, kill at version, seconds down)
FAULTS = {
    "genserver": (8, 4, 3, 0.0),
    "rollout": (8, 4, 3, 0.0),
    "trainer": (14, 6, 10, 0.0),  # SIGKILL 4 steps after the version-6 checkpoint
    "weight-sync": (8, 4, 3, 0.0),
    "redis": (8, 4, 3, 1.0),
}
MAX_STEP_GAP_S = 90.0  # restarting the trainer (torch + megatron import, model build, resume) is the slowest case


@pytest.mark.parametrize("victim", list(FAULTS))
def test_kill_one_process_and_restart_it(victim: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    steps, interval, at, down_s = FAULTS[victim]
    data = write_dataset(tmp_path / "train.jsonl", 400)
    run = System(tmp_path, fault_config(tiny_model_dir, data, victim, steps, interval))
    try:
        run.start()
        killed_at = run.wait_version(at, 240)
        rollout_id = run.cfg.rollout.worker_id
        if victim in ("rollout", "genserver"):
            # killed while the rollout is idle (waiting on the staleness budget) a rollout would leave nothing to
            # take back, and a genserver would be back before any request noticed it had gone
            run.wait_for_lease(rollout_id, 60)
        run.kill(victim)
        # the dead process can neither push nor release them (Redis itself may be the victim: not read then)
        left_behind = run.leases_held_by(rollout_id) if victim == "rollout" else 0
        time.sleep(down_s)
        run.restart(victim)
        run.finish(300)
        acc = run.accounting()
        gap = run.longest_step_gap()
        print(f"\n[{victim}] killed at version {killed_at}; {acc.summary()}; longest step gap {gap:.1f}s; "
              f"versions seen {[v for _, v in run.history]}")
        assert not acc.lost, f"lost groups {sorted(acc.lost)}: {acc.summary()}"
        assert not acc.trained_twice, f"trained twice into the final model: {acc.trained_twice}"
        assert not any(acc.overlaps.values()), acc.overlaps
        assert len(acc.trained) == steps * run.cfg.train_dataset.batch_size
        assert gap < MAX_STEP_GAP_S, f"longest gap between versions {gap:.1f}s"
        _check_victim(run, victim, left_behind)
    finally:
        run.stop()
    problems = {k: v for k, v in run.log_problems().items() if k != victim}
    assert not problems, f"ERROR lines or tracebacks outside the killed process's log: {problems}"


def _check_victim(run: System, victim: str, left_behind: int) -> None:
    """What the logs must say about the fault: each service noticed it and said so, once."""
    log = {s.name: s.log.read_text(errors="replace") for s in run.plan.services}
    if victim == "trainer":
        assert "resumed from" in log["trainer"] and "at version 6" in log["trainer"], log["trainer"][-3000:]
        assert "replaying" in log["trainer"], "the groups trained after the checkpoint are replayed"
    elif victim == "rollout":
        # the restarted process takes its leases back at once instead of waiting lease_ttl_s (120 s); the lease
        # seen before the kill can, rarely, be pushed in the milliseconds before SIGKILL lands
        if left_behind:
            assert f"took back {left_behind} leases" in log["rollout"], log["rollout"][-3000:]
        else:
            assert "took back" not in log["rollout"], log["rollout"][-3000:]
    elif victim == "genserver":
        assert log["rollout"].count("generation on") >= 1 and "works again" in log["rollout"], log["rollout"][-3000:]
        assert "dropped" in log["weight-sync"], log["weight-sync"][-3000:]
    elif victim == "redis":
        for name in ("trainer", "rollout"):
            assert log[name].count("unreachable") == 1 and "answers again" in log[name], log[name][-3000:]
    elif victim == "weight-sync":
        assert log["weight-sync"].count("weight-sync on") == 2  # it came back and served the rest of the run
