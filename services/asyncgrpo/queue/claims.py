"""A role in a run that one live process holds at a time: the trainer, or a rollout process's worker_id.

Without it, a second trainer (a rolling restart, a copy started by mistake) would reset the version and
acknowledge the first one's groups, and two rollout processes that share a worker_id (two on one host with
the default id) would take each other's leases. The holder writes a random token under the role's key with
a TTL and renews it from a heartbeat; a starting process waits up to one TTL for a killed holder's claim to
lapse and refuses to start when the role stays held; a holder that finds its claim taken (it stalled longer
than the TTL and a successor started) stops. A claim lost to a Redis outage is taken again if still free.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

import redis

from asyncgrpo.queue.connection import RedisGuard
from asyncgrpo.queue.keys import RunKeys

log = logging.getLogger(__name__)

# Renewed every TTL / 3. A restart after a SIGKILL waits at most this long for the dead holder's claim; a
# holder stalled longer than this (SIGSTOP, swapping) may be replaced, and then stops.
CLAIM_TTL_S = 10.0

# KEYS: claim  ARGV: token ttl_ms  -> 1: held by this token now (taken or renewed), 0: held by another
_TAKE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: claim  ARGV: token
_DROP_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RoleTaken(RuntimeError):
    """Another live process holds the role."""


class Claim:
    def __init__(self, client: redis.Redis, run_id: str, role: str, guard: RedisGuard, ttl_s: float = CLAIM_TTL_S) -> None:
        self.key = RunKeys(run_id).claim(role)
        self.role = role
        self.guard = guard
        self.ttl_ms = int(ttl_s * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.r = client
        self._take = client.register_script(_TAKE_LUA)
        self._drop = client.register_script(_DROP_LUA)

    @property
    def interval_s(self) -> float:
        """How often the holder renews."""
        return self.ttl_ms / 3000

    def holder(self) -> str | None:
        v = self.r.get(self.key)
        return v.decode() if isinstance(v, bytes) else v

    def acquire(self) -> None:
        """Take the role, waiting up to one TTL (plus a second) for a killed holder's claim to lapse;
        RoleTaken if it stays held by a live process."""
        deadline = time.monotonic() + self.ttl_ms / 1000 + 1.0
        waited = False
        while not self.renew():
            if time.monotonic() > deadline:
                raise RoleTaken(f"{self.role} of this run is held by a live process ({self.holder()}, host:pid); "
                                "stop it first, or give this one another identity (rollout.worker_id, trial_name)")
            if not waited:
                log.info("%s is held by %s; waiting up to %.0fs for it to lapse (a killed predecessor)", self.role,
                         self.holder(), self.ttl_ms / 1000)
                waited = True
            time.sleep(0.25)

    def renew(self) -> bool:
        """Extend the claim (or take it again if it lapsed and is free); False when another process holds it."""
        return bool(self.guard.call(self._take, keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        try:
            self._drop(keys=[self.key], args=[self.token])
        except redis.RedisError:  # Redis down at exit: the claim lapses by itself
            pass
