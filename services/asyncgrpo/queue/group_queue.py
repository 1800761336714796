"""The queue of scored groups: one Redis Stream per run, read through a consumer group.

Producer: `push(group, lease=ref)` runs one Lua script that is idempotent on group_id (a re-push returns
the first message id and adds nothing) and drops the prompt's lease, so a crash can never leave a pushed
group whose prompt is still leased or vice versa.

Consumer (trainer), exactly once into the checkpointed model: `consume` / `pending_of` deliver groups;
`commit_step` records a trained batch with the new version (absolute values: safe to repeat) and leaves
the groups pending; `ack_trained` acknowledges them once a durable checkpoint holds their update. A crash
in between replays them from the pending list; `resume` acknowledges what the checkpoint already holds
and sets version and trained count back to the checkpoint's. Groups that will never be trained leave the
stream at once, each through one script that acts only while the message is pending (so only once):
`drop_stale` (prompt re-queued as the next attempt), `dead_letter` (with its reason), `drop_duplicates`.
Acknowledged entries are deleted, so the stream holds exactly the groups pushed and not yet done with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis

from asyncgrpo.queue.keys import RunKeys
from asyncgrpo.queue.schema import DEFAULT_MAX_MESSAGE_BYTES, Group, GroupSchemaError, PromptRef, decode_group, encode_group

log = logging.getLogger(__name__)

DEFAULT_CONSUMER_GROUP = "trainer"
REDIS_PY_SOCKET_TIMEOUT_S = 5.0  # redis-py 8's default, on a client not made by make_redis
_PAGE = 256

# KEYS: stream group_ids leases lease_owners counters events  ARGV: group_id payload lease_ref
_PUSH_LUA = """
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('HDEL', KEYS[4], ARGV[3])
end
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing then
  redis.call('HINCRBY', KEYS[5], 'duplicate_pushes', 1)
  redis.call('PUBLISH', KEYS[6], 'pushed')  -- its lease is gone: a waiting worker may start a group
  return {0, existing}
end
local id = redis.call('XADD', KEYS[1], '*', 'g', ARGV[2], 'gid', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], id)
redis.call('HINCRBY', KEYS[5], 'groups_pushed', 1)
redis.call('PUBLISH', KEYS[6], 'pushed')
return {1, id}
"""

# KEYS: stream requeue counters outcomes events  ARGV: consumer_group, then (msg_id, group_id, retry_ref) triples
_DROP_STALE_LUA = """
local n = 0
for i = 2, #ARGV, 3 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    redis.call('RPUSH', KEYS[2], ARGV[i + 2])
    redis.call('HSET', KEYS[4], ARGV[i + 1], 'stale')
    n = n + 1
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[3], 'stale_requeued', n)
  redis.call('PUBLISH', KEYS[5], 'requeue')
end
return n
"""

# KEYS: stream dead_letter counters outcomes events  ARGV: consumer_group, then (msg_id, group_id, kind, record)
_DEAD_LETTER_LUA = """
local n = 0
for i = 2, #ARGV, 4 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    redis.call('RPUSH', KEYS[2], ARGV[i + 3])
    if ARGV[i + 1] ~= '' then redis.call('HSET', KEYS[4], ARGV[i + 1], 'dead') end
    redis.call('HINCRBY', KEYS[3], 'dead_letters', 1)
    redis.call('HINCRBY', KEYS[3], 'dead_letters:' .. ARGV[i + 2], 1)
    n = n + 1
  end
end
if n > 0 then redis.call('PUBLISH', KEYS[5], 'dead_letter') end
return n
"""

# KEYS: stream counters events  ARGV: consumer_group, msg_ids...  (groups the model already holds, delivered again)
_DROP_DUPLICATES_LUA = """
local n = 0
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[2], 'duplicates_dropped', n)
  redis.call('PUBLISH', KEYS[3], 'duplicates_dropped')  -- fewer accepted groups: admission budget freed
end
return n
"""

# KEYS: stream version trained trained_in_stream events
# ARGV: consumer_group version trained trained_in_stream ack(0|1) msg_ids...
_COMMIT_STEP_LUA = """
if ARGV[5] == '1' then
  for i = 6, #ARGV do
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
  end
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[4])
redis.call('PUBLISH', KEYS[5], 'version:' .. ARGV[2])
return 1
"""

# KEYS: stream trained_in_stream events  ARGV: consumer_group trained_in_stream msg_ids...
_ACK_TRAINED_LUA = """
local n = 0
for i = 3, #ARGV do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  n = n + redis.call('XDEL', KEYS[1], ARGV[i])
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], 'acked')
return n
"""


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter record: a message the trainer cannot train, and why."""

    msg_id: str
    group_id: str
    kind: str  # schema | run | group_size | vocab | length | version | value
    reason: str
    at: float
    payload: bytes

    def pack(self) -> bytes:
        return msgpack.packb({"msg_id": self.msg_id, "group_id": self.group_id, "kind": self.kind, "reason": self.reason,
                              "at": self.at, "payload": self.payload}, use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> "DeadLetter":
        d = msgpack.unpackb(data, raw=False)
        return cls(str(d["msg_id"]), str(d["group_id"]), str(d["kind"]), str(d["reason"]), float(d["at"]), bytes(d["payload"]))


class GroupQueue:
    """Synchronous queue handle (the trainer's loop is synchronous; the rollout service calls it from a
    thread). `consumer_group` is created on first use, reading from the start of the stream."""

    def __init__(self, client: redis.Redis, run_id: str, *, consumer_group: str = DEFAULT_CONSUMER_GROUP,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.r = client
        self.keys = RunKeys(run_id)
        self.run_id = run_id
        self.consumer_group = consumer_group
        self.max_message_bytes = max_message_bytes
        self._push = client.register_script(_PUSH_LUA)
        self._drop_stale = client.register_script(_DROP_STALE_LUA)
        self._dead_letter = client.register_script(_DEAD_LETTER_LUA)
        self._drop_duplicates = client.register_script(_DROP_DUPLICATES_LUA)
        self._commit_step = client.register_script(_COMMIT_STEP_LUA)
        self._ack_trained = client.register_script(_ACK_TRAINED_LUA)
        self._group_ready = False

    @classmethod
    def from_url(cls, url: str, run_id: str, *, max_block_s: float = 0.0, **kw: Any) -> "GroupQueue":
        from asyncgrpo.queue.connection import make_redis

        return cls(make_redis(url, max_block_s=max_block_s), run_id, **kw)

    # -- producer ------------------------------------------------------------------------------------
    def push(self, group: Group, lease: PromptRef | None = None) -> str:
        """Append a group; returns its stream id. A group_id pushed before is a no-op returning the first id."""
        if group.run_id != self.run_id:
            raise ValueError(f"group {group.group_id} belongs to run {group.run_id!r}, this queue is {self.run_id!r}")
        if not group.created_at:
            group.created_at = time.time()
        payload = encode_group(group, self.max_message_bytes)
        return self.push_encoded(group.group_id, payload, lease)

    def push_encoded(self, group_id: str, payload: bytes, lease: PromptRef | None = None) -> str:
        k = self.keys
        _, msg_id = self._push(keys=[k.stream, k.group_ids, k.leases, k.lease_owners, k.counters, k.events],
                               args=[group_id, payload, lease.key() if lease else ""])
        return _s(msg_id)

    # -- consumer ------------------------------------------------------------------------------------
    def ensure_consumer_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.r.xgroup_create(self.keys.stream, self.consumer_group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def _read(self, consumer: str, start: str, count: int, block_ms: int | None) -> list[Any]:
        """XREADGROUP; a consumer group that vanished (Redis lost its data) is created again."""
        timeout = self.r.connection_pool.connection_kwargs.get("socket_timeout", REDIS_PY_SOCKET_TIMEOUT_S)
        if block_ms and timeout is not None and block_ms / 1000 >= timeout:
            raise ValueError(f"a {block_ms} ms block on a client whose socket timeout is {timeout} s would time out on "
                             "an empty queue; build the client with make_redis(url, max_block_s=...)")
        self.ensure_consumer_group()
        try:
            resp = self.r.xreadgroup(self.consumer_group, consumer, {self.keys.stream: start}, count=count, block=block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("consumer group %s of %s is gone (Redis lost its data?); creating it again",
                        self.consumer_group, self.keys.stream)
            self._group_ready = False
            self.ensure_consumer_group()
            resp = self.r.xreadgroup(self.consumer_group, consumer, {self.keys.stream: start}, count=count, block=block_ms)
        return [e for _, entries in (resp or []) for e in entries]

    def consume(self, consumer: str, count: int = 1, block_ms: int | None = None) -> list[tuple[str, Group]]:
        """Read up to `count` new groups for `consumer` (blocking up to block_ms; None: do not block).
        Messages that do not decode go to the dead-letter list (once, counted) and are not returned: one bad
        message must not stall the trainer."""
        return self._decode_entries(self._read(consumer, ">", count, block_ms))

    def pending_of(self, consumer: str) -> list[tuple[str, Group]]:
        """Every group delivered to `consumer` and not yet acknowledged, oldest first: a restarted trainer
        (same consumer name) replays these; a trainer that lost a reply re-reads them."""
        out: list[tuple[str, Group]] = []
        start = "0"
        while True:
            entries = self._read(consumer, start, _PAGE, None)
            if not entries:
                return out
            out.extend(self._decode_entries(entries))
            start = _s(entries[-1][0])

    def consume_own_pending(self, consumer: str, count: int = 100) -> list[tuple[str, Group]]:
        """The first `count` groups of pending_of (kept for callers that want one page)."""
        return self._decode_entries(self._read(consumer, "0", count, None))

    def _decode_entries(self, entries: Sequence[tuple[bytes, dict[bytes, bytes]] | None]) -> list[tuple[str, Group]]:
        out: list[tuple[str, Group]] = []
        bad: list[DeadLetter] = []
        for entry in entries:
            if entry is None or entry[1] is None:  # deleted while pending
                continue
            msg_id, fields = _s(entry[0]), entry[1]
            try:
                out.append((msg_id, decode_group(fields[b"g"])))
            except (GroupSchemaError, KeyError) as e:
                reason = f"cannot be decoded: {e}" if not isinstance(e, KeyError) else "has no 'g' field"
                bad.append(DeadLetter(msg_id, _s(fields.get(b"gid", b"")), "schema", reason, time.time(), fields.get(b"g", b"")))
        if bad:
            self._move_to_dead_letter(bad)
        return out

    def dead_letter(self, items: Iterable[tuple[str, str, str, str]]) -> int:
        """Move consumed messages the trainer cannot train to the dead-letter list: (msg_id, group_id, kind,
        reason) each. Acts only on messages still pending (so each is counted once); returns how many."""
        letters = []
        for msg_id, group_id, kind, reason in items:
            raw = self.r.xrange(self.keys.stream, msg_id, msg_id)
            payload = raw[0][1].get(b"g", b"") if raw and raw[0][1] else b""
            letters.append(DeadLetter(msg_id, group_id, kind, reason, time.time(), payload))
        return self._move_to_dead_letter(letters)

    def _move_to_dead_letter(self, letters: Sequence[DeadLetter]) -> int:
        if not letters:
            return 0
        args: list[Any] = [self.consumer_group]
        for d in letters:
            args += [d.msg_id, d.group_id, d.kind, d.pack()]
        k = self.keys
        n = int(self._dead_letter(keys=[k.stream, k.dead_letter, k.counters, k.outcomes, k.events], args=args))
        for d in letters:
            log.warning("group %s (message %s) dead-lettered (%s): %s", d.group_id or "?", d.msg_id, d.kind, d.reason)
        return n

    def dead_letters(self, start: int = 0, end: int = -1) -> list[DeadLetter]:
        return [DeadLetter.unpack(x) for x in self.r.lrange(self.keys.dead_letter, start, end)]

    def drop_stale(self, entries: Sequence[tuple[str, Group]]) -> int:
        """The trainer drops these consumed groups as too stale: acknowledge them and re-queue their prompts
        (next attempt) in one script, so a crash in between can neither lose a prompt nor re-queue it
        twice. A message no longer pending (already dropped or acked) is skipped. Returns how many."""
        if not entries:
            return 0
        args: list[str] = [self.consumer_group]
        for msg_id, group in entries:
            args += [msg_id, group.group_id, group.prompt_ref().retry().key()]
        k = self.keys
        return int(self._drop_stale(keys=[k.stream, k.requeue, k.counters, k.outcomes, k.events], args=args))

    def drop_duplicates(self, msg_ids: Sequence[str]) -> int:
        """Acknowledge deliveries of groups the model already holds (e.g. an acknowledgement lost with a Redis
        crash, or a group pushed again after Redis lost its data); returns how many were pending."""
        if not msg_ids:
            return 0
        k = self.keys
        return int(self._drop_duplicates(keys=[k.stream, k.counters, k.events], args=[self.consumer_group, *msg_ids]))

    def commit_step(self, msg_ids: Sequence[str], version: int, trained: int, trained_in_stream: int, ack: bool) -> None:
        """After an optimizer step: the new version and the trained count (absolute, so a retry after a lost
        reply changes nothing), atomically. With ack the batch is acknowledged now (nothing to wait for:
        no checkpoints); else it stays pending, counted in trained_in_stream, until ack_trained."""
        k = self.keys
        self._commit_step(keys=[k.stream, k.version, k.trained, k.trained_in_stream, k.events],
                          args=[self.consumer_group, int(version), int(trained), int(trained_in_stream),
                                "1" if ack else "0", *msg_ids])

    def ack_trained(self, msg_ids: Sequence[str], trained_in_stream: int = 0) -> int:
        """Acknowledge trained groups once a durable checkpoint holds their update; returns how many left the
        stream."""
        k = self.keys
        return int(self._ack_trained(keys=[k.stream, k.trained_in_stream, k.events],
                                     args=[self.consumer_group, int(trained_in_stream), *msg_ids]))

    def resume(self, version: int, trained_ids: set[str]) -> int:
        """A trainer (re)starting from a checkpoint of `version` whose model holds `trained_ids`: entries of
        those groups still in the stream (acknowledgement not done before a crash, or a duplicate push) are
        acknowledged, then version and trained count are set to the checkpoint's, so the admission budget
        follows the model the trainer holds and the groups trained after the checkpoint (still pending)
        count as waiting again. Returns how many entries it acknowledged."""
        self.ensure_consumer_group()
        done: list[str] = []
        start = "-"
        while True:
            page = self.r.xrange(self.keys.stream, start, "+", count=_PAGE)
            for msg_id, fields in page:
                if fields and _s(fields.get(b"gid", b"")) in trained_ids:
                    done.append(_s(msg_id))
            if len(page) < _PAGE:
                break
            start = "(" + _s(page[-1][0])
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        if done:
            pipe.xack(k.stream, self.consumer_group, *done)
            pipe.xdel(k.stream, *done)
        pipe.set(k.version, int(version))
        pipe.set(k.trained, len(trained_ids))
        pipe.set(k.trained_in_stream, 0)
        pipe.publish(k.events, f"version:{int(version)}")
        pipe.execute()
        return len(done)

    def ack(self, msg_ids: Sequence[str]) -> int:
        """Acknowledge and delete (tools and tests; the trainer uses commit_step / ack_trained); returns how
        many were pending."""
        if not msg_ids:
            return 0
        pipe = self.r.pipeline()
        pipe.xack(self.keys.stream, self.consumer_group, *msg_ids)
        pipe.xdel(self.keys.stream, *msg_ids)
        acked, _ = pipe.execute()
        return int(acked)

    def reclaim(self, consumer: str, min_idle_ms: int, count: int = 100) -> list[tuple[str, Group]]:
        """Take over groups other consumers read but did not acknowledge for min_idle_ms (XAUTOCLAIM)."""
        self.ensure_consumer_group()
        out: list[tuple[str, Group]] = []
        start = "0-0"
        while True:
            resp = self.r.xautoclaim(self.keys.stream, self.consumer_group, consumer, min_idle_ms, start, count=count)
            start, entries = _s(resp[0]), resp[1]
            out.extend(self._decode_entries(entries))
            if start == "0-0" or len(out) >= count:
                return out

    def pending(self) -> int:
        """Groups delivered to some consumer and not yet acknowledged."""
        self.ensure_consumer_group()
        return int(self.r.xpending(self.keys.stream, self.consumer_group)["pending"])

    def depth(self) -> int:
        """Groups in the stream not yet acknowledged (undelivered + pending, trained ones awaiting their
        checkpoint included)."""
        return int(self.r.xlen(self.keys.stream))

    def undelivered(self, limit: int = 2000) -> list[Group]:
        """Groups not yet delivered to the trainer (the oldest `limit`), decoded; undecodable ones are skipped
        (the trainer dead-letters them when it reads them)."""
        self.ensure_consumer_group()
        last = "0-0"
        for g in self.r.xinfo_groups(self.keys.stream):
            if _s(g["name"]) == self.consumer_group:
                last = _s(g["last-delivered-id"])
        out: list[Group] = []
        for _, fields in self.r.xrange(self.keys.stream, min=f"({last}", count=limit):
            try:
                out.append(decode_group(fields[b"g"]))
            except (GroupSchemaError, KeyError):
                continue
        return out

    def pushed_ids(self) -> int:
        """How many distinct group ids were ever pushed."""
        return int(self.r.hlen(self.keys.group_ids))

    def outcomes(self) -> dict[str, str]:
        """group_id -> 'stale' | 'dead' for pushed groups that ended without training."""
        return {_s(g): _s(o) for g, o in self.r.hgetall(self.keys.outcomes).items()}
