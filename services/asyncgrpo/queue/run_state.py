"""Run state shared through Redis: trainer version, pause flag, prompt cursor and leases, re-queue list,
counters, and the admission rule.

Admission and prompt leasing happen in one Lua script so that the staleness budget is exact across any
number of rollout processes (AReaL's rule, with its accepted/running split):

    start a new group only while accepted + running + 1 <= (version + max_head_offpolicyness + 1) * batch_groups

accepted = groups pushed minus groups the trainer dropped as stale; running = prompt leases held. A lease
is the only record that a prompt is being worked on: a worker that dies leaves its lease, which expires and
is re-issued to another worker (counted once in `running` the whole time), so nothing is lost and the budget
does not leak. Pushing a group removes its lease and adds to `accepted` in the same script.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import redis

from asyncgrpo.queue.keys import RunKeys
from asyncgrpo.queue.schema import Group, PromptRef

AdmitStatus = Literal["ok", "paused", "over_budget", "exhausted"]

# KEYS: version paused accepted leases requeue cursor counters
# ARGV: max_head_offpolicyness batch_groups dataset_size total_epochs lease_ttl_ms
_ADMIT_LUA = """
local ofp = tonumber(ARGV[1]); local bg = tonumber(ARGV[2]); local n = tonumber(ARGV[3])
local epochs = tonumber(ARGV[4]); local ttl = tonumber(ARGV[5])
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
local accepted = tonumber(redis.call('GET', KEYS[3]) or '0')
local running = redis.call('ZCARD', KEYS[4])
local cap = (v + ofp + 1) * bg
if redis.call('GET', KEYS[2]) == '1' then return {'paused', '', v, accepted + running, cap} end
-- a dead worker's lease: already counted in running, so re-issuing it needs no budget
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 1)
if #expired > 0 then
  redis.call('ZADD', KEYS[4], now + ttl, expired[1])
  redis.call('HINCRBY', KEYS[7], 'leases_reissued', 1)
  return {'ok', expired[1], v, accepted + running, cap}
end
if accepted + running + 1 > cap then return {'over_budget', '', v, accepted + running, cap} end
local ref = redis.call('LPOP', KEYS[5])
if not ref then
  local epoch = tonumber(redis.call('HGET', KEYS[6], 'epoch') or '0')
  local pos = tonumber(redis.call('HGET', KEYS[6], 'position') or '0')
  if pos >= n then epoch = epoch + 1; pos = 0 end
  if epoch >= epochs then return {'exhausted', '', v, accepted + running, cap} end
  redis.call('HSET', KEYS[6], 'epoch', epoch, 'position', pos + 1)
  ref = epoch .. ':' .. pos .. ':0'
else
  redis.call('HINCRBY', KEYS[7], 'requeued_taken', 1)
end
redis.call('ZADD', KEYS[4], now + ttl, ref)
redis.call('HINCRBY', KEYS[7], 'groups_started', 1)
return {'ok', ref, v, accepted + running + 1, cap}
"""

# KEYS: leases   ARGV: ref ttl_ms    -> 1 if the lease was still held (and is now extended)
_RENEW_LUA = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# KEYS: leases counters events  ARGV: ref counter_name
_RELEASE_LUA = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 1 and ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
redis.call('PUBLISH', KEYS[3], 'lease')
return removed
"""

# KEYS: leases requeue counters events  ARGV: ref   -> 1 if the lease was held and the prompt is re-queued
_ABANDON_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'leases_abandoned', 1)
redis.call('PUBLISH', KEYS[4], 'requeue')
return 1
"""

# KEYS: requeue accepted counters events   ARGV: ref keys (already with attempt + 1)
_REQUEUE_LUA = """
for i = 1, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('DECRBY', KEYS[2], #ARGV)
redis.call('HINCRBY', KEYS[3], 'stale_requeued', #ARGV)
redis.call('PUBLISH', KEYS[4], 'requeue')
return #ARGV
"""


@dataclass(frozen=True)
class Admission:
    """Answer of one admission attempt. `ref` is set only when status == 'ok'."""

    status: AdmitStatus
    ref: PromptRef | None
    version: int  # trainer version the decision used
    started: int  # accepted + running, counting this group when admitted
    capacity: int  # (version + max_head_offpolicyness + 1) * batch_groups


class CursorMismatchError(RuntimeError):
    """The dataset or seed changed under a run whose cursor lives in Redis."""


def _s(x: bytes | str | None) -> str | None:
    return x.decode() if isinstance(x, bytes) else x


class RunState:
    """Synchronous handle on a run's state; cheap to create, safe to share between threads."""

    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.r = client
        self.keys = RunKeys(run_id)
        self.run_id = run_id
        self._admit = client.register_script(_ADMIT_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._requeue = client.register_script(_REQUEUE_LUA)
        self._abandon = client.register_script(_ABANDON_LUA)

    @classmethod
    def from_url(cls, url: str, run_id: str) -> "RunState":
        return cls(redis.Redis.from_url(url), run_id)

    # -- trainer version and pause (control plane) --------------------------------------------------
    def get_version(self) -> int:
        v = self.r.get(self.keys.version)
        return int(v) if v is not None else 0

    def set_version(self, version: int) -> None:
        """The trainer calls this after each optimizer step; rollout waiters wake on the event."""
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        pipe = self.r.pipeline()
        pipe.set(self.keys.version, int(version))
        pipe.publish(self.keys.events, f"version:{int(version)}")
        pipe.execute()

    def is_paused(self) -> bool:
        return self.r.get(self.keys.paused) == b"1"

    def set_paused(self, paused: bool) -> None:
        """Pause stops admission of new groups; groups already running finish and are queued."""
        pipe = self.r.pipeline()
        pipe.set(self.keys.paused, "1" if paused else "0")
        pipe.publish(self.keys.events, "paused" if paused else "resumed")
        pipe.execute()

    # -- counters ------------------------------------------------------------------------------------
    def incr(self, name: str, amount: int | float = 1) -> None:
        if isinstance(amount, float):
            self.r.hincrbyfloat(self.keys.counters, name, amount)
        else:
            self.r.hincrby(self.keys.counters, name, amount)

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.r.hgetall(self.keys.counters).items():
            f = float(v)
            out[_s(k) or ""] = int(f) if f.is_integer() else f
        return out

    # -- dataset cursor ------------------------------------------------------------------------------
    def init_cursor(self, dataset_size: int, seed: int, fingerprint: str = "") -> None:
        """Record the dataset a run reads; a restart with another dataset or seed is an error, since the
        stored position would point into a different order."""
        if dataset_size < 1:
            raise ValueError("dataset_size must be >= 1")
        want = {"size": str(dataset_size), "seed": str(seed), "fingerprint": fingerprint}
        for k, v in want.items():
            self.r.hsetnx(self.keys.cursor, k, v)
        have = {k: _s(self.r.hget(self.keys.cursor, k)) for k in want}
        if have != want:
            raise CursorMismatchError(
                f"run {self.run_id}: Redis holds a cursor for dataset {have}, this process has {want}; "
                "use a new trial_name for a different dataset or seed, or delete the run's keys"
            )

    def cursor(self) -> tuple[int, int]:
        """(epoch, next position)."""
        h = self.r.hgetall(self.keys.cursor)
        return int(h.get(b"epoch", 0)), int(h.get(b"position", 0))

    # -- admission and leases ------------------------------------------------------------------------
    def admit(self, *, max_head_offpolicyness: int, batch_groups: int, dataset_size: int, total_epochs: int,
              lease_ttl_s: float) -> Admission:
        """Try to start one group: checks pause and the staleness budget, then leases the next prompt
        (an expired lease first, then a re-queued prompt, then the cursor)."""
        k = self.keys
        status, ref, v, started, cap = self._admit(
            keys=[k.version, k.paused, k.accepted, k.leases, k.requeue, k.cursor, k.counters],
            args=[max_head_offpolicyness, batch_groups, dataset_size, total_epochs, int(lease_ttl_s * 1000)],
        )
        status = _s(status)
        return Admission(status, PromptRef.parse(ref) if status == "ok" else None, int(v), int(started), int(cap))  # type: ignore[arg-type]

    def renew_lease(self, ref: PromptRef, lease_ttl_s: float) -> bool:
        """Extend a held lease; False when it is gone (pushed, released, or never held)."""
        return bool(self._renew(keys=[self.keys.leases], args=[ref.key(), int(lease_ttl_s * 1000)]))

    def release_lease(self, ref: PromptRef, counter: str = "") -> bool:
        """Give up a lease without a group (e.g. dynamic filtering dropped it); frees its budget."""
        k = self.keys
        return bool(self._release(keys=[k.leases, k.counters, k.events], args=[ref.key(), counter]))

    def abandon_lease(self, ref: PromptRef) -> bool:
        """Give a prompt back for another worker to run now (e.g. every generation server failed), instead
        of letting its lease expire. Same attempt: if this group somehow was pushed, the re-run dedups."""
        k = self.keys
        return bool(self._abandon(keys=[k.leases, k.requeue, k.counters, k.events], args=[ref.key()]))

    def leases(self) -> dict[PromptRef, float]:
        """Leases held now -> deadline (unix seconds)."""
        return {PromptRef.parse(m): s / 1000 for m, s in self.r.zrange(self.keys.leases, 0, -1, withscores=True)}

    def running(self) -> int:
        return int(self.r.zcard(self.keys.leases))

    def accepted(self) -> int:
        v = self.r.get(self.keys.accepted)
        return int(v) if v is not None else 0

    # -- stale drops (trainer) -----------------------------------------------------------------------
    def requeue_prompts(self, items: Iterable[Group | PromptRef]) -> int:
        """These groups were dropped as stale: their prompts come back (as a new attempt) and their budget
        is freed. Returns how many were re-queued. A trainer holding stream entries should prefer
        GroupQueue.drop_stale, which also acknowledges them atomically."""
        refs = [(i.prompt_ref() if isinstance(i, Group) else i).retry().key() for i in items]
        if not refs:
            return 0
        k = self.keys
        return int(self._requeue(keys=[k.requeue, k.accepted, k.counters, k.events], args=refs))

    def requeued(self) -> list[PromptRef]:
        return [PromptRef.parse(m) for m in self.r.lrange(self.keys.requeue, 0, -1)]

    def snapshot(self) -> dict[str, object]:
        """Everything a person or the control plane wants to see about the run, JSON-ready."""
        epoch, pos = self.cursor()
        return {
            "run_id": self.run_id, "version": self.get_version(), "paused": self.is_paused(),
            "accepted": self.accepted(), "running": self.running(), "requeued": len(self.requeued()),
            "cursor": {"epoch": epoch, "position": pos}, "queue_depth": int(self.r.xlen(self.keys.stream)),
            "counters": self.counters(),
        }

    def dump(self) -> str:
        return json.dumps(self.snapshot(), sort_keys=True)
