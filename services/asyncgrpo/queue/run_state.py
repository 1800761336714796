"""Run state shared through Redis: trainer version, pause flag, prompt cursor and leases, re-queue list,
counters, and the admission rule.

Admission and prompt leasing happen in one Lua script so that the staleness budget is exact across any
number of rollout processes (AReaL's rule, with its accepted/running split):

    start a new group only while accepted + running + 1 <= (version + max_head_offpolicyness + 1) * batch_groups

running = prompt leases held. accepted is derived, never counted, so no restart or lost reply can make it
drift: accepted = trained + (stream length - trained_in_stream), i.e. the groups in the trainer's model plus
the groups waiting in the stream. The trainer sets `version` and `trained` together (absolute values), and
a trainer resumed from an older checkpoint sets both back, so the budget follows the model it holds.

A lease is the only record that a prompt is being worked on, and it names its owner ('worker_id#n'): a
worker that dies leaves its lease, which expires and is re-issued to another worker (counted once in
`running` the whole time), so nothing is lost and the budget does not leak; a restarted process with the
same worker_id takes its own leases back at once. Pushing a group removes its lease in the same script.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from asyncgrpo.queue.keys import RunKeys
from asyncgrpo.queue.schema import PromptRef

AdmitStatus = Literal["ok", "paused", "over_budget", "exhausted", "draining", "stopping"]
KNOB_OFFPOLICYNESS = "rollout.max_head_offpolicyness"

# accepted = trained + XLEN(stream) - trained_in_stream   (KEYS[a] stream, KEYS[b] trained, KEYS[c] trained_in_stream)
_ACCEPTED_LUA = """
local function accepted(stream, trained, in_stream)
  return tonumber(redis.call('GET', trained) or '0') + redis.call('XLEN', stream) - tonumber(redis.call('GET', in_stream) or '0')
end
"""

# The cursor's next prompt (epoch, position) for a dataset of n prompts: past the last position, the next epoch.
# Admission and the exhaustion check read it alike; only admission moves the cursor.
_NEXT_PROMPT_LUA = """
local function next_prompt(cursor, n)
  local epoch = tonumber(redis.call('HGET', cursor, 'epoch') or '0')
  local pos = tonumber(redis.call('HGET', cursor, 'position') or '0')
  if pos >= n then epoch = epoch + 1; pos = 0 end
  return epoch, pos
end
"""

# KEYS: version paused leases requeue cursor counters stream trained trained_in_stream lease_owners mode knobs
# ARGV: max_head_offpolicyness batch_groups dataset_size total_epochs lease_ttl_ms owner
# -> {status, ref, version, started, capacity, knobs (flat HGETALL: the live knob values this admission used)}
_ADMIT_LUA = _ACCEPTED_LUA + _NEXT_PROMPT_LUA + """
local knobs = redis.call('HGETALL', KEYS[12])
local ofp = tonumber(redis.call('HGET', KEYS[12], '""" + KNOB_OFFPOLICYNESS + """') or ARGV[1])
local bg = tonumber(ARGV[2]); local n = tonumber(ARGV[3])
local epochs = tonumber(ARGV[4]); local ttl = tonumber(ARGV[5]); local owner = ARGV[6]
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
local used = accepted(KEYS[7], KEYS[8], KEYS[9]) + redis.call('ZCARD', KEYS[3])
local cap = (v + ofp + 1) * bg
local mode = redis.call('GET', KEYS[11])
if mode == 'stop' then return {'stopping', '', v, used, cap, knobs} end
if mode == 'drain' then return {'draining', '', v, used, cap, knobs} end
if redis.call('GET', KEYS[2]) == '1' then return {'paused', '', v, used, cap, knobs} end
-- a dead worker's lease: already counted in running, so re-issuing it needs no budget
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1)
if #expired > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, expired[1])
  redis.call('HSET', KEYS[10], expired[1], owner)
  redis.call('HINCRBY', KEYS[6], 'leases_reissued', 1)
  return {'ok', expired[1], v, used, cap, knobs}
end
if used + 1 > cap then return {'over_budget', '', v, used, cap, knobs} end
local ref = redis.call('LPOP', KEYS[4])
if not ref then
  local epoch, pos = next_prompt(KEYS[5], n)
  if epoch >= epochs then return {'exhausted', '', v, used, cap, knobs} end
  redis.call('HSET', KEYS[5], 'epoch', epoch, 'position', pos + 1)
  ref = epoch .. ':' .. pos .. ':0'
else
  redis.call('HINCRBY', KEYS[6], 'requeued_taken', 1)
end
redis.call('ZADD', KEYS[3], now + ttl, ref)
redis.call('HSET', KEYS[10], ref, owner)
redis.call('HINCRBY', KEYS[6], 'groups_started', 1)
return {'ok', ref, v, used + 1, cap, knobs}
"""

# KEYS: leases lease_owners   ARGV: ref ttl_ms owner   -> 1 if `owner` still holds the lease (now extended)
_RENEW_LUA = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then return 0 end
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# KEYS: leases lease_owners counters events  ARGV: ref owner counter_name
_RELEASE_LUA = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if removed == 1 and ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[3], 1) end
redis.call('PUBLISH', KEYS[4], 'lease')
return removed
"""

# KEYS: leases lease_owners requeue counters events  ARGV: ref owner -> 1 if the owner held it and it is re-queued
_ABANDON_LUA = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'leases_abandoned', 1)
redis.call('PUBLISH', KEYS[5], 'requeue')
return 1
"""

# KEYS: leases lease_owners counters events  ARGV: owner prefix ('worker_id#'), then refs to keep
# -> leases expired now
_RECLAIM_LUA = """
local keep = {}
for i = 2, #ARGV do keep[ARGV[i]] = true end
local owners = redis.call('HGETALL', KEYS[2])
local n = 0
for i = 1, #owners, 2 do
  local ref = owners[i]
  if string.sub(owners[i + 1], 1, #ARGV[1]) == ARGV[1] and not keep[ref] and redis.call('ZSCORE', KEYS[1], ref) then
    redis.call('ZADD', KEYS[1], 0, ref)
    n = n + 1
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[3], 'leases_taken_back', n)
  redis.call('PUBLISH', KEYS[4], 'lease')
end
return n
"""

# KEYS: leases  -> leases whose deadline has not passed (Redis' clock, as the deadlines)
_LIVE_LEASES_LUA = """
local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

# KEYS: cursor requeue leases  ARGV: total_epochs -> 1 when no group can come any more: the cursor is past the
# last epoch (as admission counts it), nothing is re-queued and no lease is held, live or expired
_EXHAUSTED_LUA = _NEXT_PROMPT_LUA + """
local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
if size < 1 then return 0 end
if next_prompt(KEYS[1], size) < tonumber(ARGV[1]) then return 0 end
if redis.call('LLEN', KEYS[2]) > 0 or redis.call('ZCARD', KEYS[3]) > 0 then return 0 end
return 1
"""

# KEYS: stream trained trained_in_stream leases   -> {accepted, running} read atomically
_USAGE_LUA = _ACCEPTED_LUA + """
return {accepted(KEYS[1], KEYS[2], KEYS[3]), redis.call('ZCARD', KEYS[4])}
"""


@dataclass(frozen=True)
class Admission:
    """Answer of one admission attempt. `ref` is set only when status == 'ok'."""

    status: AdmitStatus
    ref: PromptRef | None
    version: int  # trainer version the decision used
    started: int  # accepted + running, counting this group when admitted
    capacity: int  # (version + max_head_offpolicyness + 1) * batch_groups
    knobs: dict[str, Any] = field(default_factory=dict)  # live knob values (control plane) when admitted


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
        self._abandon = client.register_script(_ABANDON_LUA)
        self._reclaim = client.register_script(_RECLAIM_LUA)
        self._usage = client.register_script(_USAGE_LUA)
        self._live = client.register_script(_LIVE_LEASES_LUA)
        self._exhausted = client.register_script(_EXHAUSTED_LUA)

    @classmethod
    def from_url(cls, url: str, run_id: str) -> "RunState":
        from asyncgrpo.queue.connection import make_redis

        return cls(make_redis(url), run_id)

    # -- trainer version and pause (control plane) --------------------------------------------------
    def get_version(self) -> int:
        v = self.r.get(self.keys.version)
        return int(v) if v is not None else 0

    def set_version(self, version: int) -> None:
        """Set the version alone (tests, tools); the trainer sets it with its trained count through
        GroupQueue.commit_step. Rollout waiters wake on the event."""
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
              lease_ttl_s: float, owner: str = "") -> Admission:
        """Try to start one group for `owner` ('worker_id#n'): checks pause and the staleness budget, then
        leases the next prompt (an expired lease first, then a re-queued prompt, then the cursor)."""
        k = self.keys
        status, ref, v, started, cap, flat = self._admit(
            keys=[k.version, k.paused, k.leases, k.requeue, k.cursor, k.counters, k.stream, k.trained,
                  k.trained_in_stream, k.lease_owners, k.mode, k.knobs],
            args=[max_head_offpolicyness, batch_groups, dataset_size, total_epochs, int(lease_ttl_s * 1000), owner],
        )
        status = _s(status)
        knobs = {_s(flat[i]) or "": json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}
        return Admission(status, PromptRef.parse(ref) if status == "ok" else None, int(v), int(started), int(cap),  # type: ignore[arg-type]
                         knobs)

    def renew_lease(self, ref: PromptRef, lease_ttl_s: float, owner: str = "") -> bool:
        """Extend a lease `owner` holds; False when it is gone (pushed, released, re-issued to another owner)."""
        k = self.keys
        return bool(self._renew(keys=[k.leases, k.lease_owners], args=[ref.key(), int(lease_ttl_s * 1000), owner]))

    def release_lease(self, ref: PromptRef, counter: str = "", owner: str = "") -> bool:
        """Give up a lease without a group (e.g. dynamic filtering dropped it); frees its budget. Only the
        owner can: a lease re-issued to another worker stays with it."""
        k = self.keys
        return bool(self._release(keys=[k.leases, k.lease_owners, k.counters, k.events], args=[ref.key(), owner, counter]))

    def abandon_lease(self, ref: PromptRef, owner: str = "") -> bool:
        """Give a prompt back for another worker to run now (e.g. every generation server failed), instead
        of letting its lease expire. Same attempt: if this group somehow was pushed, the re-run dedups."""
        k = self.keys
        return bool(self._abandon(keys=[k.leases, k.lease_owners, k.requeue, k.counters, k.events], args=[ref.key(), owner]))

    def reclaim_leases(self, worker_id: str, keep: Iterable[PromptRef] = ()) -> int:
        """A restarted worker process takes back its leases: every lease owned by 'worker_id#...' (except those
        in `keep`, still being worked on) expires now, so the next admissions re-issue them at once (no new
        budget) instead of after lease_ttl_s."""
        k = self.keys
        return int(self._reclaim(keys=[k.leases, k.lease_owners, k.counters, k.events],
                                 args=[f"{worker_id}#", *(r.key() for r in keep)]))

    def leases(self) -> dict[PromptRef, float]:
        """Leases held now -> deadline (unix seconds)."""
        return {PromptRef.parse(m): s / 1000 for m, s in self.r.zrange(self.keys.leases, 0, -1, withscores=True)}

    def lease_owners(self) -> dict[PromptRef, str]:
        return {PromptRef.parse(m): _s(o) or "" for m, o in self.r.hgetall(self.keys.lease_owners).items()}

    def running(self) -> int:
        return int(self.r.zcard(self.keys.leases))

    def live_leases(self) -> int:
        """Leases still being renewed (deadline not passed): groups that may yet be pushed. An expired lease (its
        worker died) counts in running() until re-issued, but no group will come from it."""
        return int(self._live(keys=[self.keys.leases]))

    def prompts_exhausted(self, total_epochs: int) -> bool:
        """Every prompt of `total_epochs` epochs was admitted and finished, and none is re-queued or leased: no
        group will be pushed any more (what is in the stream is all there is)."""
        k = self.keys
        return bool(self._exhausted(keys=[k.cursor, k.requeue, k.leases], args=[int(total_epochs)]))

    def budget_usage(self) -> tuple[int, int]:
        """(accepted, running), read atomically: what the admission rule counts against its capacity."""
        k = self.keys
        acc, run = self._usage(keys=[k.stream, k.trained, k.trained_in_stream, k.leases])
        return int(acc), int(run)

    def accepted(self) -> int:
        """Groups trained into the current model plus groups waiting in the stream (AReaL's 'accepted')."""
        return self.budget_usage()[0]

    def trained(self) -> int:
        v = self.r.get(self.keys.trained)
        return int(v) if v is not None else 0

    def requeued(self) -> list[PromptRef]:
        return [PromptRef.parse(m) for m in self.r.lrange(self.keys.requeue, 0, -1)]

    def snapshot(self) -> dict[str, object]:
        """Everything a person or the control plane wants to see about the run, JSON-ready."""
        epoch, pos = self.cursor()
        return {
            "run_id": self.run_id, "version": self.get_version(), "paused": self.is_paused(),
            "accepted": self.accepted(), "trained": self.trained(), "running": self.running(), "requeued": len(self.requeued()),
            "cursor": {"epoch": epoch, "position": pos}, "queue_depth": int(self.r.xlen(self.keys.stream)),
            "counters": self.counters(),
        }

    def dump(self) -> str:
        return json.dumps(self.snapshot(), sort_keys=True)
