"""One live process per role of a run (the trainer, a rollout worker_id), against a real redis-server."""

from __future__ import annotations

import threading
import time

import pytest

from asyncgrpo.queue import Claim, RedisGuard, RoleTaken, make_redis

RUN = "exp/t0"


def _claim(url: str, role: str = "trainer", ttl_s: float = 0.6) -> Claim:
    return Claim(make_redis(url), RUN, role, RedisGuard(url, deadline_s=30), ttl_s=ttl_s)


def test_a_second_live_holder_is_refused_with_who_holds_it(redis_server) -> None:
    first, second = _claim(redis_server.url), _claim(redis_server.url)
    first.acquire()
    stop = threading.Event()

    def heartbeat() -> None:  # the first holder stays alive and renews, as its service's heartbeat does
        while not stop.wait(first.interval_s):
            assert first.renew()

    beat = threading.Thread(target=heartbeat)
    beat.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(RoleTaken, match=first.token.rsplit(":", 1)[0]):
            second.acquire()
        assert time.monotonic() - t0 >= 0.6, "it waited a TTL for the claim to lapse before refusing"
    finally:
        stop.set()
        beat.join()
    assert first.holder() == first.token


def test_a_killed_holders_claim_lapses_and_a_successor_takes_it(redis_server) -> None:
    dead, successor = _claim(redis_server.url), _claim(redis_server.url)
    dead.acquire()  # ... and is killed: no more renewals
    successor.acquire()
    assert successor.holder() == successor.token
    assert dead.renew() is False, "the stalled predecessor learns it was replaced"


def test_release_frees_the_role_at_once_and_roles_are_separate(redis_server) -> None:
    a, b = _claim(redis_server.url, ttl_s=30), _claim(redis_server.url, ttl_s=30)
    a.acquire()
    _claim(redis_server.url, role="rollout:host-a", ttl_s=30).acquire()  # another role: no conflict
    a.release()
    t0 = time.monotonic()
    b.acquire()
    assert time.monotonic() - t0 < 5 and b.holder() == b.token


def test_a_claim_lost_to_a_redis_restart_is_taken_again(redis_server) -> None:
    c = _claim(redis_server.url, ttl_s=30)
    c.acquire()
    c.r.flushall()  # Redis lost its data (no persistence)
    assert c.renew() is True and c.holder() == c.token
