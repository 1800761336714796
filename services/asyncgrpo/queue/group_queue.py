"""The queue of scored groups: one Redis Stream per run, read through a consumer group (at-least-once).

Producer: `push(group, lease=ref)` runs one Lua script that is idempotent on group_id (a re-push returns
the first message id and adds nothing), appends the message, counts it as accepted and drops the prompt's
lease, so a crash can never leave a pushed group whose prompt is still leased or vice versa.

Consumer (trainer): `consume` -> list of (msg_id, Group); `ack` when the group is trained (or dropped);
`reclaim` takes over what a dead consumer read but never acknowledged (XAUTOCLAIM). Acknowledged entries are
deleted from the stream, so `depth()` = groups pushed and not yet acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import redis

from asyncgrpo.queue.keys import RunKeys
from asyncgrpo.queue.schema import DEFAULT_MAX_MESSAGE_BYTES, Group, GroupSchemaError, PromptRef, decode_group, encode_group

log = logging.getLogger(__name__)

DEFAULT_CONSUMER_GROUP = "trainer"

# KEYS: stream group_ids leases accepted counters events  ARGV: group_id payload lease_ref maxlen
_PUSH_LUA = """
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing then
  if ARGV[3] ~= '' then redis.call('ZREM', KEYS[3], ARGV[3]) end
  redis.call('HINCRBY', KEYS[5], 'duplicate_pushes', 1)
  return {0, existing}
end
local id
if tonumber(ARGV[4]) > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'g', ARGV[2], 'gid', ARGV[1])
else
  id = redis.call('XADD', KEYS[1], '*', 'g', ARGV[2], 'gid', ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], id)
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[3], ARGV[3]) end
redis.call('INCR', KEYS[4])
redis.call('HINCRBY', KEYS[5], 'groups_pushed', 1)
redis.call('PUBLISH', KEYS[6], 'pushed')
return {1, id}
"""

# KEYS: stream requeue accepted counters events  ARGV: consumer_group, then (msg_id, retry_ref) pairs
_DROP_STALE_LUA = """
local n = 0
for i = 2, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    redis.call('RPUSH', KEYS[2], ARGV[i + 1])
    n = n + 1
  end
end
if n > 0 then
  redis.call('DECRBY', KEYS[3], n)
  redis.call('HINCRBY', KEYS[4], 'stale_requeued', n)
  redis.call('PUBLISH', KEYS[5], 'requeue')
end
return n
"""


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


class GroupQueue:
    """Synchronous queue handle (the trainer's loop is synchronous; the rollout service calls it from a
    thread). `consumer_group` is created on first use, reading from the start of the stream."""

    def __init__(self, client: redis.Redis, run_id: str, *, consumer_group: str = DEFAULT_CONSUMER_GROUP,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, maxlen: int = 0) -> None:
        self.r = client
        self.keys = RunKeys(run_id)
        self.run_id = run_id
        self.consumer_group = consumer_group
        self.max_message_bytes = max_message_bytes
        self.maxlen = maxlen  # 0: unbounded (the admission budget bounds it already)
        self._push = client.register_script(_PUSH_LUA)
        self._drop_stale = client.register_script(_DROP_STALE_LUA)
        self._group_ready = False

    @classmethod
    def from_url(cls, url: str, run_id: str, **kw: object) -> "GroupQueue":
        return cls(redis.Redis.from_url(url), run_id, **kw)  # type: ignore[arg-type]

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
        _, msg_id = self._push(
            keys=[k.stream, k.group_ids, k.leases, k.accepted, k.counters, k.events],
            args=[group_id, payload, lease.key() if lease else "", self.maxlen],
        )
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

    def consume(self, consumer: str, count: int = 1, block_ms: int | None = None) -> list[tuple[str, Group]]:
        """Read up to `count` new groups for `consumer` (blocking up to block_ms; None: do not block).
        Messages that do not decode go to the dead-letter list, are acknowledged and counted, and are
        not returned: one bad message must not stall the trainer."""
        self.ensure_consumer_group()
        resp = self.r.xreadgroup(self.consumer_group, consumer, {self.keys.stream: ">"}, count=count, block=block_ms)
        return self._decode_entries([e for _, entries in (resp or []) for e in entries])

    def consume_own_pending(self, consumer: str, count: int = 100) -> list[tuple[str, Group]]:
        """Groups delivered to `consumer` before and not yet acknowledged: a restarted trainer with the same
        consumer name reads these first (XREADGROUP from id 0)."""
        self.ensure_consumer_group()
        resp = self.r.xreadgroup(self.consumer_group, consumer, {self.keys.stream: "0"}, count=count)
        return self._decode_entries([e for _, entries in (resp or []) for e in entries])

    def drop_stale(self, entries: Sequence[tuple[str, Group]]) -> int:
        """The trainer drops these consumed groups as too stale: acknowledge them and re-queue their prompts
        (next attempt) in one script, so a crash in between can neither lose a prompt nor re-queue it
        twice. A message no longer pending (already dropped or acked) is skipped. Returns how many."""
        if not entries:
            return 0
        args: list[str] = [self.consumer_group]
        for msg_id, group in entries:
            args += [msg_id, group.prompt_ref().retry().key()]
        k = self.keys
        return int(self._drop_stale(keys=[k.stream, k.requeue, k.accepted, k.counters, k.events], args=args))

    def _decode_entries(self, entries: Sequence[tuple[bytes, dict[bytes, bytes]] | None]) -> list[tuple[str, Group]]:
        out: list[tuple[str, Group]] = []
        bad: list[str] = []
        for entry in entries:
            if entry is None or entry[1] is None:  # deleted while pending
                continue
            msg_id, fields = _s(entry[0]), entry[1]
            try:
                out.append((msg_id, decode_group(fields[b"g"])))
            except (GroupSchemaError, KeyError) as e:
                log.error("group message %s cannot be decoded, moved to %s: %s", msg_id, self.keys.dead_letter, e)
                self.r.rpush(self.keys.dead_letter, fields.get(b"g", b""))
                bad.append(msg_id)
        if bad:
            self.ack(bad)
            self.r.hincrby(self.keys.counters, "dead_letters", len(bad))
        return out

    def ack(self, msg_ids: Sequence[str]) -> int:
        """Acknowledge and delete; returns how many were pending."""
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
        """Groups in the stream not yet acknowledged (undelivered + pending)."""
        return int(self.r.xlen(self.keys.stream))

    def pushed_ids(self) -> int:
        """How many distinct group ids were ever pushed."""
        return int(self.r.hlen(self.keys.group_ids))
