"""What the control plane reads and writes about a run, in Redis: the run's registration (config, status,
times), its mode (run / drain / stop; pause is RunState's flag), live knobs with their audit list, the
trainer's step metrics (a capped stream), recent completions and the rollout processes' last reports.

Every record lives under the run's keys (keys.py), so the control plane is stateless: restarted, it serves the
same run; down, the services go on reading the same keys. Services write here; the control plane's handler
layer (control/handlers.py) reads through this class and never touches a key itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Literal

import redis

from asyncgrpo.queue.connection import redact
from asyncgrpo.queue.keys import RUNS_KEY, RunKeys

Mode = Literal["run", "drain", "stop"]
STEP_METRICS_KEPT = 10_000  # steps of history kept in the stream (approximate trimming)
COMPLETIONS_KEPT = 50
EVALS_KEPT = 1_000
AUDIT_KEPT = 1_000


def _s(x: bytes | str | None) -> str | None:
    return x.decode() if isinstance(x, bytes) else x


def redacted_config(cfg: Any) -> dict[str, Any]:
    """A RunConfig as JSON for others to read: tokens and the Redis password replaced by '***'."""
    d = cfg.model_dump(mode="json")
    for section, key in (("auth", "api_key"), ("auth", "admin_api_key"), ("control", "token")):
        if d.get(section, {}).get(key):
            d[section][key] = "***"
    for server in ("orm", "prm"):
        if d.get("reward", {}).get(server, {}).get("api_key"):
            d["reward"][server]["api_key"] = "***"
    d["redis"]["url"] = redact(d["redis"]["url"])
    return d


class RunControl:
    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.r = client
        self.run_id = run_id
        self.keys = RunKeys(run_id)

    # -- registration ---------------------------------------------------------------------------------
    @staticmethod
    def list_runs(client: redis.Redis) -> list[str]:
        return sorted(_s(m) or "" for m in client.smembers(RUNS_KEY))

    def exists(self) -> bool:
        return bool(self.r.sismember(RUNS_KEY, self.run_id))

    def register(self, config: Mapping[str, Any]) -> None:
        """Called by the trainer on start: the run appears in the list with its (redacted) config and keeps its
        first start time. A run that had stopped cleanly (its services started again to continue it) runs:
        mode 'run', not paused. A trainer restarted after a crash keeps the run's mode and pause flag: a drain,
        stop or pause asked for before the crash still holds."""
        now = time.time()
        stopped = _s(self.r.hget(self.keys.info, "status")) == "stopped"
        pipe = self.r.pipeline()
        pipe.sadd(RUNS_KEY, self.run_id)
        pipe.hset(self.keys.info, mapping={"config": json.dumps(config, sort_keys=True), "status": "running",
                                           "updated_at": now})
        pipe.hsetnx(self.keys.info, "started_at", now)
        if stopped:
            pipe.set(self.keys.mode, "run")
            pipe.set(self.keys.paused, "0")
        pipe.publish(self.keys.events, "status:running")
        pipe.execute()

    def set_status(self, status: str) -> None:
        pipe = self.r.pipeline()
        pipe.hset(self.keys.info, mapping={"status": status, "updated_at": time.time()})
        pipe.publish(self.keys.events, f"status:{status}")
        pipe.execute()

    def role_held(self, role: str) -> bool:
        """A live process holds `role` (its claim, queue/claims.py, has not lapsed)."""
        return bool(self.r.exists(self.keys.claim(role)))

    def set_trainer_state(self, state: str) -> None:
        """training / paused (at a step boundary) / draining / stopped."""
        pipe = self.r.pipeline()
        pipe.hset(self.keys.info, mapping={"trainer_state": state, "updated_at": time.time()})
        pipe.publish(self.keys.events, f"trainer:{state}")
        pipe.execute()

    def info(self) -> dict[str, Any]:
        h = {_s(k) or "": _s(v) for k, v in self.r.hgetall(self.keys.info).items()}
        out: dict[str, Any] = {"status": h.get("status") or "unknown"}
        out["config"] = json.loads(h["config"]) if h.get("config") else {}
        out["trainer_state"] = h.get("trainer_state") or "unknown"
        for k in ("started_at", "updated_at"):
            out[k] = float(h[k]) if h.get(k) else None
        return out

    # -- mode ------------------------------------------------------------------------------------------
    def mode(self) -> Mode:
        m = _s(self.r.get(self.keys.mode))
        return m if m in ("drain", "stop") else "run"  # type: ignore[return-value]

    def set_mode(self, mode: Mode) -> None:
        pipe = self.r.pipeline()
        pipe.set(self.keys.mode, mode)
        pipe.hset(self.keys.info, "updated_at", time.time())
        pipe.publish(self.keys.events, f"mode:{mode}")
        pipe.execute()

    # -- live knobs and the audit list ------------------------------------------------------------------
    def knobs(self) -> dict[str, Any]:
        return {_s(k) or "": json.loads(v) for k, v in self.r.hgetall(self.keys.knobs).items()}

    def set_knobs(self, changes: Mapping[str, tuple[Any, Any]], who: str) -> list[dict[str, Any]]:
        """Apply `changes` (key -> (old, new)) and record each in the audit list, in one transaction."""
        now = time.time()
        records = [{"at": now, "who": who, "action": "set", "key": k, "old": old, "new": new}
                   for k, (old, new) in changes.items()]
        pipe = self.r.pipeline()
        pipe.hset(self.keys.knobs, mapping={k: json.dumps(new) for k, (_, new) in changes.items()})
        for rec in records:
            pipe.lpush(self.keys.audit, json.dumps(rec))
        pipe.ltrim(self.keys.audit, 0, AUDIT_KEPT - 1)
        pipe.hset(self.keys.info, "updated_at", now)
        pipe.publish(self.keys.events, "knobs")
        pipe.execute()
        return records

    def audit_action(self, who: str, action: str, old: Any = None, new: Any = None) -> dict[str, Any]:
        rec = {"at": time.time(), "who": who, "action": action, "key": None, "old": old, "new": new}
        self._push_capped(self.keys.audit, rec, AUDIT_KEPT)
        return rec

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._newest(self.keys.audit, limit)

    # -- capped JSON lists, newest first (audit, completions, evaluations) ------------------------------
    def _push_capped(self, key: str, record: Mapping[str, Any], kept: int) -> None:
        pipe = self.r.pipeline()
        pipe.lpush(key, json.dumps(dict(record)))
        pipe.ltrim(key, 0, kept - 1)
        pipe.execute()

    def _newest(self, key: str, limit: int) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(key, 0, max(0, limit - 1))]

    # -- what the services report ----------------------------------------------------------------------
    def record_step(self, metrics: Mapping[str, Any]) -> None:
        """The trainer's metrics of one step (JSON-ready: version, time, loss, reward_mean, ...)."""
        pipe = self.r.pipeline()
        pipe.xadd(self.keys.step_metrics, {"m": json.dumps(dict(metrics))}, maxlen=STEP_METRICS_KEPT, approximate=True)
        pipe.hset(self.keys.info, "updated_at", time.time())
        pipe.execute()

    def step_metrics(self, limit: int = 500) -> list[dict[str, Any]]:
        """The last `limit` steps, oldest first, one row per version: after a crash the trainer replays the steps
        since its checkpoint, and the replayed row (the one in the model) replaces the first."""
        rows = self.r.xrevrange(self.keys.step_metrics, count=max(1, limit))
        by_version: dict[Any, dict[str, Any]] = {}
        for _, fields in reversed(rows):
            row = json.loads(fields[b"m"])
            by_version.pop(row.get("version"), None)
            by_version[row.get("version")] = row
        # each step row carries the held-out accuracy measured at its version, where there was an evaluation
        for ev in self.evals(EVALS_KEPT):
            row = by_version.get(ev.get("version"))
            if row is not None and "eval_accuracy" not in row:
                row["eval_accuracy"] = ev.get("reward")
                row["eval_greedy_accuracy"] = ev.get("greedy_reward")
        return sorted(by_version.values(), key=lambda r: r.get("version") or 0)

    def record_eval(self, row: Mapping[str, Any]) -> None:
        """One held-out evaluation (rollout/evaluation.py's HeldOutResult.row())."""
        self._push_capped(self.keys.evals, row, EVALS_KEPT)

    def evals(self, limit: int = 100) -> list[dict[str, Any]]:
        """Held-out evaluations, newest first."""
        return self._newest(self.keys.evals, limit)

    def record_completion(self, record: Mapping[str, Any]) -> None:
        self._push_capped(self.keys.completions, record, COMPLETIONS_KEPT)

    def completions(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._newest(self.keys.completions, limit)

    def record_rollout_stats(self, worker_id: str, stats: Mapping[str, Any]) -> None:
        self.r.hset(self.keys.rollout_stats, worker_id, json.dumps({**stats, "at": time.time()}))

    def rollout_stats(self) -> dict[str, dict[str, Any]]:
        return {_s(k) or "": json.loads(v) for k, v in self.r.hgetall(self.keys.rollout_stats).items()}
