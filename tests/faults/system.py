"""The whole system as real processes, planned exactly as `asyncgrpo up` plans it (redis-server with AOF and a
password, genserver, weight-sync, rollout, trainer, the run's keys), driven by a fault test: kill one process
with SIGKILL, start it again, and account for every group at the end."""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asyncgrpo.config import load_config
from asyncgrpo.launch.procs import Service, Supervisor, tail
from asyncgrpo.launch.up import plan_run
from asyncgrpo.queue import GroupQueue, RunState, make_redis
from rollout.procs import write_dataset

__all__ = ["System", "fault_config", "write_dataset"]


def fault_config(model_dir: Path, dataset: Path, trial: str, steps: int, checkpoint_interval: int) -> Any:
    return load_config(overrides={
        "experiment_name": "faults", "trial_name": trial, "seed": 1,
        # a random tiny model scores 0: without filtering every group is pushed, which is what the accounting needs
        "actor": {"path": str(model_dir), "group_size": 4, "micro_batch_size": 16},
        "optimizer": {"lr": 1e-4},
        "train_dataset": {"path": str(dataset), "batch_size": 4},
        "rollout": {"dynamic_filtering": False, "max_new_tokens": 8, "max_concurrent_rollouts": 8, "max_head_offpolicyness": 1,
                    "worker_id": "faults-rollout", "log_interval_s": 2.0},
        "trainer": {"max_steps": steps, "checkpoint_interval": checkpoint_interval, "poll_timeout_s": 1.0},
        "weight_sync": {"resync_interval_s": 1.0, "group_timeout_s": 20.0, "collective_timeout_s": 20.0,
                        "request_timeout_s": 20.0},
        "redis": {"outage_deadline_s": 120.0},
    })


@dataclass
class Accounting:
    pushed: set[str]
    trained: list[str]  # the final model's lineage, flattened
    stale: set[str]
    dead: set[str]
    pending: set[str]
    counters: dict[str, float]

    @property
    def trained_twice(self) -> list[str]:
        seen: set[str] = set()
        return [g for g in self.trained if g in seen or seen.add(g)]  # type: ignore[func-returns-value]

    @property
    def lost(self) -> set[str]:
        return self.pushed - set(self.trained) - self.stale - self.dead - self.pending

    @property
    def overlaps(self) -> dict[str, set[str]]:
        t = set(self.trained)
        return {"trained&stale": t & self.stale, "trained&dead": t & self.dead, "trained&pending": t & self.pending,
                "stale&pending": self.stale & self.pending, "dead&pending": self.dead & self.pending}

    def summary(self) -> str:
        return (f"pushed {len(self.pushed)} = trained {len(set(self.trained))} + stale {len(self.stale)} + dead "
                f"{len(self.dead)} + pending {len(self.pending)}; lost {len(self.lost)}, trained twice "
                f"{len(self.trained_twice)}; counters {self.counters}")


@dataclass
class System:
    root: Path
    cfg: Any
    history: list[tuple[float, int]] = field(default_factory=list)  # (time, policy version) as polled
    killed: set[str] = field(default_factory=set)
    may_exit: set[str] = field(default_factory=set)  # services a test expects to exit 0 on their own (a drain)

    def __post_init__(self) -> None:
        self.plan = plan_run(self.cfg, self.root / "run")
        self.plan.write()
        self.sup = Supervisor({**os.environ, **self.plan.env})
        c = self.plan.cfg
        self.redis = make_redis(c.redis.url)
        self.state, self.queue = RunState(self.redis, c.run_id), GroupQueue(self.redis, c.run_id)

    def start(self) -> None:
        for svc in self.plan.services:
            self.sup.start(svc)

    def svc(self, name: str) -> Service:
        return self.plan.service(name)

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} ({s.log})\n{tail(s.log, 40)}" for s in self.plan.services)

    def _check_alive(self) -> None:
        for s in self.sup.exited():
            if s.name in self.killed or (s.name in {"trainer", *self.may_exit} and s.proc.returncode == 0):
                continue
            raise AssertionError(f"{s.name} exited with {s.proc.returncode} on its own\n{self.logs()}")

    def version(self) -> int | None:
        try:
            return self.state.get_version()
        except Exception:  # noqa: BLE001 - Redis down while we poll
            return None

    def wait_version(self, at_least: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            v = self.version()
            if v is not None:
                if not self.history or self.history[-1][1] != v:
                    self.history.append((time.monotonic(), v))
                if v >= at_least:
                    return v
            if time.monotonic() > deadline:
                raise AssertionError(f"version {v} after {timeout:.0f}s, waiting for {at_least}\n{self.logs()}")
            time.sleep(0.1)

    def leases_held_by(self, worker_id: str) -> int:
        """Leases held now (pushed or released ones are gone) whose owner is one of `worker_id`'s workers."""
        held = self.state.leases()
        return sum(1 for ref, owner in self.state.lease_owners().items()
                   if ref in held and owner.startswith(f"{worker_id}#"))

    def wait_for_lease(self, worker_id: str, timeout: float) -> None:
        """Until a worker of `worker_id` holds a lease: a kill then leaves one behind for the restart to take back."""
        deadline = time.monotonic() + timeout
        while self.leases_held_by(worker_id) == 0:
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"no lease held by {worker_id} within {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.02)

    def kill(self, name: str) -> None:
        s = self.svc(name)
        self.killed.add(name)
        s.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        s.proc.wait(10)  # type: ignore[union-attr]

    def restart(self, name: str) -> None:
        self.sup.restart(self.svc(name))
        self.killed.discard(name)

    def finish(self, timeout: float) -> None:
        """Until the trainer has taken every step and exited 0."""
        trainer = self.svc("trainer")
        deadline = time.monotonic() + timeout
        while trainer.proc.poll() is None:  # type: ignore[union-attr]
            self.wait_version(0, 5)
            if time.monotonic() > deadline:
                raise AssertionError(f"the trainer did not finish within {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.2)
        assert trainer.proc.returncode == 0, self.logs()  # type: ignore[union-attr]
        self.wait_version(self.cfg.trainer.max_steps, 5)

    def longest_step_gap(self) -> float:
        """Longest time between two successive versions seen (restarts included)."""
        times = [t for t, _ in self.history]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def accounting(self, steps: int | None = None) -> Accounting:
        """Every pushed group by id; `steps`: the version the final checkpoint holds (default: max_steps)."""
        c = self.plan.cfg
        ckpt = Path(c.trainer.checkpoint_dir)
        step = (ckpt / "latest").read_text().strip()
        lineage = torch.load(ckpt / step / "rank_00000.pt", map_location="cpu", weights_only=False)["data_position"]["lineage"]
        assert len(lineage) == (c.trainer.max_steps if steps is None else steps)
        k = self.state.keys
        outcomes = self.queue.outcomes()
        return Accounting(
            pushed={g.decode() for g in self.redis.hkeys(k.group_ids)},
            trained=[g for batch in lineage for g in batch],
            stale={g for g, o in outcomes.items() if o == "stale"},
            dead={g for g, o in outcomes.items() if o == "dead"},
            pending={f[b"gid"].decode() for _, f in self.redis.xrange(k.stream) if f},
            counters=self.state.counters(),
        )

    def stop(self) -> None:
        self.sup.stop_all()
        shutil.rmtree(self.plan.snapshot_dir, ignore_errors=True)

    def log_problems(self) -> dict[str, list[str]]:
        """ERROR lines and tracebacks per log (a fault is weather: nothing should be an ERROR but the fault)."""
        out = {}
        for s in self.plan.services:
            lines = [l for l in s.log.read_text(errors="replace").splitlines() if " ERROR " in l or l.startswith("Traceback")]
            if lines:
                out[s.name] = lines
        return out
