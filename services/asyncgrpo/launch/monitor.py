"""What `asyncgrpo up` shows while a run trains: the trainer's step rows (metrics.jsonl in the run
directory, appended once per optimizer step) and the run's state in Redis (mode, queue, stale drops, the
rollout processes' last reports), folded into one ProgressSnapshot per refresh.

Reading is best effort: a Redis outage or a half-written line leaves the last values in place (the
services report outages themselves), so the display never takes the run down.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

from asyncgrpo.launch.curves import load_rows, parse_rows, step_rows
from asyncgrpo.launch.progress import ProgressSnapshot

REDIS_TIMEOUT_S = 0.5  # a hung Redis must not hold up the loop that also watches the services and Ctrl-C
RATE_WINDOW = 20  # steps the ETA's rate is measured over: recent enough to follow a pause or a knob change


class RunMonitor:
    def __init__(self, run_dir: Path, redis_url: str, run_id: str, total_steps: int, *, redis_every_s: float = 1.0) -> None:
        self.metrics = run_dir / "metrics.jsonl"
        # a resumed run: its earlier rows are history, its step count and last evaluation are where it stands
        history = step_rows(self.metrics)
        self.pos = self.metrics.stat().st_size if self.metrics.exists() else 0
        self.start_step = int(history[-1]["version"]) if history else 0
        evals = [e for e in load_rows(run_dir / "evals.jsonl") if e.get("source") != "final"]
        self.eval: dict[str, Any] | None = evals[-1] if evals else None
        self.redis_url, self.run_id, self.total = redis_url, run_id, total_steps
        self.redis_every_s = redis_every_s
        self.t0 = time.monotonic()
        self.last: dict[str, Any] = history[-1] if history else {}
        self.step_times: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)
        self.redis: dict[str, Any] = {}
        self._redis_at = 0.0
        self._clients: tuple[Any, Any] | None = None

    def new_rows(self) -> list[dict[str, Any]]:
        """Step rows appended since the last call (whole lines only)."""
        try:
            with self.metrics.open("rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.pos += end
        return [row for row in parse_rows(data[:end].splitlines()) if isinstance(row.get("version"), int)]

    def _read_redis(self) -> None:
        from asyncgrpo.queue import make_redis
        from asyncgrpo.queue.run_control import RunControl
        from asyncgrpo.queue.run_state import RunState

        if self._clients is None:
            client = make_redis(self.redis_url, timeout_s=REDIS_TIMEOUT_S)
            self._clients = RunState(client, self.run_id), RunControl(client, self.run_id)
        state, ctl = self._clients
        try:
            from asyncgrpo.control.handlers import run_status

            info = ctl.info()
            stats = ctl.rollout_stats().values()
            fresh = [s for s in stats if time.time() - float(s.get("at", 0)) < 60]  # a dead worker's last report is not "now"
            rewards = [s["reward_mean"] for s in fresh if s.get("reward_mean") is not None]
            self.redis = {
                "state": run_status(info.get("status") or "running", ctl.mode(), state.is_paused()),
                "queue_depth": max(0, state.accepted() - state.trained()),
                "stale_dropped": int(state.counters().get("stale_requeued", 0)),
                "gen_tokens_per_s": sum(float(s.get("tokens_per_s") or 0.0) for s in fresh) if fresh else None,
                "rollout_reward": sum(rewards) / len(rewards) if rewards else None,
            }
        except Exception:  # noqa: BLE001 - display only; keep the last values
            pass

    def poll(self) -> list[ProgressSnapshot]:
        """One snapshot per step row appended since the last call (the plain display prints each step), or
        the current one when no step was taken."""
        rows = self.new_rows()
        now = time.monotonic()
        if now - self._redis_at >= self.redis_every_s:
            self._redis_at = now
            self._read_redis()
        snaps = []
        for row in rows:
            self.last = row
            self.step_times.append((now, int(row["version"])))
            snaps.append(self._snapshot(now))
        return snaps or [self._snapshot(now)]

    def _snapshot(self, now: float) -> ProgressSnapshot:
        rate = None
        if len(self.step_times) >= 2:
            (ta, va), (tb, vb) = self.step_times[0], self.step_times[-1]
            if tb > ta and vb > va:
                rate = (vb - va) / (tb - ta)
        r, ev = self.last, self.eval or {}
        step = int(r.get("version", 0))
        if rate is None and step > self.start_step and now > self.t0:  # the steps this `up` took, not a resumed run's
            rate = (step - self.start_step) / (now - self.t0)
        return ProgressSnapshot(
            step=step, total_steps=self.total, elapsed_s=now - self.t0,
            state=self.redis.get("state", "running"), reward=r.get("reward_mean"),
            rollout_reward=self.redis.get("rollout_reward"), eval_reward=ev.get("reward"),
            eval_greedy=ev.get("greedy_reward"), eval_step=ev.get("version"), queue_depth=self.redis.get("queue_depth"),
            staleness_mean=r.get("staleness_mean"), staleness_max=r.get("staleness_max"),
            stale_dropped=self.redis.get("stale_dropped"), gen_tokens_per_s=self.redis.get("gen_tokens_per_s"),
            train_tokens_per_s=r.get("tokens_per_s"), step_time_s=r.get("step_time_s"), steps_per_s=rate or 0.0)
