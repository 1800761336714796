"""The Redis client factory and RedisGuard against a real redis-server: blocking reads longer than redis-py's
default socket timeout, a server killed and restarted (AOF) under a client, and the outage deadline."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import redis

from asyncgrpo.queue import GroupQueue, RedisGuard, RedisUnavailable, make_redis

from .helpers import make_group

RUN = "exp/t0"  # the run of helpers.make_group


def test_blocking_read_longer_than_redis_py_default_timeout(redis_server) -> None:
    """Finding 1: XREADGROUP BLOCK 5 s on an empty queue raised TimeoutError (redis-py 8's default
    socket_timeout is 5 s). A client made for a 6 s block must wait it out and return nothing."""
    q = GroupQueue(make_redis(redis_server.tcp_url, max_block_s=6.0), RUN)
    t0 = time.monotonic()
    assert q.consume("trainer-0", count=1, block_ms=6000) == []
    assert time.monotonic() - t0 >= 5.9


def test_default_client_would_have_timed_out(redis_server) -> None:
    """The same read on redis-py's default client times out (the test above is not vacuous); the queue now
    refuses such a block up front instead of failing on the first quiet moment."""
    r = redis.Redis.from_url(redis_server.tcp_url)
    r.xgroup_create("plain", "g", id="0", mkstream=True)
    with pytest.raises(redis.TimeoutError):
        r.xreadgroup("g", "c", {"plain": ">"}, count=1, block=6000)
    with pytest.raises(ValueError, match="make_redis"):
        GroupQueue(r, RUN).consume("trainer-0", count=1, block_ms=6000)


def test_guard_rides_out_a_killed_and_restarted_server(redis_aof, caplog) -> None:
    """Finding 2: a Redis restart killed every client ("Connection closed by server"). Through the guard the
    same call waits for the restarted server, logs one warning and one recovery line, and the data written
    before the crash (AOF) is still there."""
    client = make_redis(redis_aof.url)
    q = GroupQueue(client, RUN)
    q.push(make_group())
    guard = RedisGuard(redis_aof.url, deadline_s=30, backoff_s=0.05, max_backoff_s=0.2)
    redis_aof.kill()
    restarter = threading.Timer(1.0, redis_aof.start)
    restarter.start()
    with caplog.at_level(logging.INFO, logger="asyncgrpo.redis"):
        t0 = time.monotonic()
        depth = guard.call(q.depth)
        elapsed = time.monotonic() - t0
    restarter.join()
    assert depth == 1, "the group pushed before the crash survives in the AOF"
    assert elapsed >= 0.9 and guard.episodes == 1 and not guard.down
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage(), [r.getMessage() for r in caplog.records]
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_guard_gives_up_past_the_deadline_with_one_line(redis_server) -> None:
    client = make_redis(redis_server.url)
    guard = RedisGuard(redis_server.url, deadline_s=0.5, backoff_s=0.05, max_backoff_s=0.1)
    redis_server.kill()
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable) as e:
        guard.call(client.ping)
    assert time.monotonic() - t0 >= 0.5  # gave up only past the deadline (and did give up: no hang)
    msg = str(e.value)
    assert "\n" not in msg and "redis.outage_deadline_s" in msg and redis_server.url in msg


def test_async_guard_keeps_the_loop_running(redis_aof) -> None:
    """acall retries off the event loop: other tasks keep running during the outage."""
    client = make_redis(redis_aof.url)
    guard = RedisGuard(redis_aof.url, deadline_s=30, backoff_s=0.05, max_backoff_s=0.2)

    async def main() -> tuple[bool, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        t = asyncio.create_task(ticker())
        redis_aof.kill()
        asyncio.get_running_loop().call_later(1.0, redis_aof.start)
        ok = await guard.acall(client.ping)
        t.cancel()
        return ok, ticks

    ok, ticks = asyncio.run(main())
    assert ok is True and ticks >= 10


def test_bug_errors_are_not_retried(redis_server) -> None:
    """Only transient errors are retried: a script or type error is raised at once."""
    client = make_redis(redis_server.url)
    client.set("k", "v")
    guard = RedisGuard(redis_server.url, deadline_s=30)
    with pytest.raises(redis.ResponseError):
        guard.call(client.lpush, "k", "x")
    assert guard.episodes == 0


def test_bad_url_is_one_clear_line() -> None:
    from asyncgrpo.config import ConfigError

    with pytest.raises(ConfigError, match="is not a Redis URL"):
        make_redis("http://127.0.0.1:6379")


def test_password_is_redacted_in_errors(redis_server) -> None:
    guard = RedisGuard("redis://user:secret@127.0.0.1:1/0", deadline_s=0.2, backoff_s=0.05)
    with pytest.raises(RedisUnavailable) as e:
        guard.call(make_redis("redis://user:secret@127.0.0.1:1/0").ping)
    assert "secret" not in str(e.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://user:pw@[::1]:6379/0", "redis://user:***@[::1]:6379/0"),
    ("redis://host:6379/0?password=pw&db=1", "redis://host:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=***"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_redact_hides_the_password_wherever_the_url_carries_it(url: str, shown: str) -> None:
    from asyncgrpo.queue.connection import redact

    assert redact(url) == shown


def test_a_late_reply_from_before_the_outage_does_not_end_it(caplog) -> None:
    """CI saw one Redis restart logged as four outages: a call answered before the kill but returning after
    another call had failed reported success and ended the outage. Only a call begun since the failure ends it."""
    guard = RedisGuard("redis://127.0.0.1:1/0", deadline_s=30, backoff_s=0.01, max_backoff_s=0.01)
    in_flight = threading.Event()
    release = threading.Event()

    def slow_ok() -> str:  # sent before the outage; its reply arrives after another call failed
        in_flight.set()
        release.wait(5)
        return "ok"

    fails = iter([redis.ConnectionError("reset by peer"), redis.ConnectionError("refused")])

    def flaky() -> str:
        e = next(fails, None)
        if e is not None:
            raise e
        return "back"

    with caplog.at_level(logging.INFO, logger="asyncgrpo.redis"):
        t = threading.Thread(target=lambda: guard.call(slow_ok))
        t.start()
        in_flight.wait(5)
        time.sleep(0.01)  # the late call started strictly before the outage below
        other = threading.Thread(target=lambda: guard.call(flaky))
        guard._failed(redis.ConnectionError("reset by peer"), "first")  # the outage begins
        release.set()
        t.join(5)
        assert guard.down, "a reply to a call sent before the outage must not end it"
        other.start()
        other.join(5)
    assert not guard.down and guard.episodes == 1
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in lines) == 1 and sum("answers again" in m for m in lines) == 1, lines
