"""The one place Redis clients are built, and the one way a service rides out a Redis outage.

Clients: the socket timeout of a client always exceeds the longest blocking call made on it (redis-py 8
defaults socket_timeout to 5 s, so a 5 s XREADGROUP BLOCK on a default client raised TimeoutError whenever
the queue stayed empty). redis-py's own retries are off: whether a command may run twice is the caller's
business, so retries happen in one visible place, `RedisGuard`.

Outages: `RedisGuard.call` / `acall` retry a callable on connection errors, timeouts and a server still
loading its AOF, with exponential backoff. One WARNING when an outage starts, one INFO when Redis answers
again, and `RedisUnavailable` (one line, for the service to exit with) once an outage lasts longer than
`redis.outage_deadline_s`. What a service writes to Redis is safe to repeat (idempotent scripts, absolute
values, XACK-gated moves), so a command whose reply was lost may simply run again; only informational
counters (HINCRBY) may count a retried increment twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("asyncgrpo.redis")

T = TypeVar("T")

SOCKET_MARGIN_S = 10.0  # socket timeout = longest block on the client + this
CONNECT_TIMEOUT_S = 5.0
STOPPING_DEADLINE_S = 10.0  # the outage deadline of a service that was told to stop
HEALTH_CHECK_INTERVAL_S = 15  # a pooled connection idle this long is pinged before use (catches a restarted server)

# Transient: the server is down, restarting, unreachable or still loading its AOF (BusyLoadingError is a
# ConnectionError). Anything else (a script error, a wrong type) is a bug and is raised at once.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)


class RedisUnavailable(RuntimeError):
    """Redis could not be reached for longer than the configured deadline."""


def redact(url: str) -> str:
    """The URL without its secrets, for logs, errors and anything others read: a password in the authority or
    in the query (redis-py reads both) replaced by '***'."""
    from urllib.parse import parse_qsl, urlencode

    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)  # the host keeps its IPv6 brackets
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(k.lower() in ("password", "username") for k, _ in pairs) and netloc == parts.netloc:
        return url
    query = urlencode([(k, "***" if k.lower() in ("password", "username") else v) for k, v in pairs], safe="*")
    out = f"{parts.scheme}://{netloc}{parts.path}"  # unix:///path keeps its empty authority
    return out + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def _client_kwargs(url: str, max_block_s: float, timeout_s: float | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "socket_timeout": timeout_s if timeout_s is not None else max_block_s + SOCKET_MARGIN_S,
        "socket_connect_timeout": timeout_s if timeout_s is not None else CONNECT_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "retry": Retry(NoBackoff(), 0),
    }
    if not url.startswith("unix://"):
        kw["socket_keepalive"] = True  # a peer that vanished without a FIN is noticed
    return kw


def make_redis(url: str, *, max_block_s: float = 0.0, timeout_s: float | None = None) -> redis.Redis:
    """A synchronous client for `url` whose socket timeout exceeds `max_block_s`, the longest time any
    command on it blocks on the server (XREADGROUP BLOCK, BLPOP ...). `timeout_s` sets a shorter socket and
    connect timeout for a reader that must not wait on a hung server (a display), and blocks never."""
    from asyncgrpo.config import ConfigError

    if max_block_s < 0:
        raise ValueError(f"max_block_s must be >= 0, got {max_block_s}")
    if timeout_s is not None and (timeout_s <= 0 or max_block_s > 0):
        raise ValueError(f"timeout_s ({timeout_s}) must be > 0 and only for a client that never blocks")
    try:
        return redis.Redis.from_url(url, **_client_kwargs(url, max_block_s, timeout_s))
    except ValueError as e:
        raise ConfigError(f"redis.url {redact(url)!r} is not a Redis URL ({e}); use redis://host:port/db or "
                          "unix:///path/to/redis.sock") from None


def make_async_redis(url: str, *, max_block_s: float = 0.0) -> aioredis.Redis:
    """The asyncio twin of make_redis (pub/sub listeners)."""
    return aioredis.Redis.from_url(url, **_client_kwargs(url, max_block_s))


class RedisGuard:
    """Runs Redis work with retries through outages; shared by all threads / tasks of one service.

    `episodes` counts outages seen so far: a caller that must re-read state after one (the trainer re-reads
    the groups delivered to it, in case a reply carrying them was lost) compares it before and after."""

    def __init__(self, url: str, deadline_s: float, *, backoff_s: float = 0.1, max_backoff_s: float = 2.0) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.url = redact(url)
        self.deadline_s = deadline_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.episodes = 0
        self._down_since: float | None = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def stopping(self) -> None:
        """The service is shutting down: an outage now (e.g. the whole run is being stopped, Redis with it) is
        waited out only briefly, so the service exits in seconds instead of after outage_deadline_s."""
        self.deadline_s = min(self.deadline_s, STOPPING_DEADLINE_S)

    def _failed(self, e: BaseException, what: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self._down_since is None:
                self._down_since = now
                self.episodes += 1
                log.warning("Redis at %s unreachable (%s: %s) during %s; retrying with backoff for up to %.0fs",
                            self.url, type(e).__name__, e, what, self.deadline_s)
            down_for = now - self._down_since
        if down_for > self.deadline_s:
            raise RedisUnavailable(
                f"Redis at {self.url} unreachable for {down_for:.0f}s (redis.outage_deadline_s = {self.deadline_s:g}); "
                f"last error: {type(e).__name__}: {e}"
            ) from None

    def _succeeded(self, started: float) -> None:
        """A call that `started` (monotonic) before the outage began says nothing about recovery: it was answered
        before the failure (a concurrent task's reply arriving late). Only a call begun since ends the outage, so
        one outage is one 'unreachable' line and one 'answers again' line."""
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is not None and started >= self._down_since:
                log.info("Redis at %s answers again after %.1fs", self.url, time.monotonic() - self._down_since)
                self._down_since = None

    def _name(self, fn: Callable[..., Any]) -> str:
        return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """fn(*args, **kw), retried through Redis outages (blocking sleeps)."""
        delay = self.backoff_s
        while True:
            started = time.monotonic()
            try:
                out = fn(*args, **kw)
            except TRANSIENT_ERRORS as e:
                self._failed(e, self._name(fn))
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            self._succeeded(started)
            return out

    async def acall(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """fn(*args, **kw) in a worker thread (fn is a synchronous Redis call), retried through outages
        with asyncio sleeps, so the event loop keeps serving meanwhile."""
        delay = self.backoff_s
        while True:
            started = time.monotonic()
            try:
                out = await asyncio.to_thread(fn, *args, **kw)
            except TRANSIENT_ERRORS as e:
                self._failed(e, self._name(fn))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            self._succeeded(started)
            return out

    def wait_reachable(self, client: redis.Redis) -> None:
        """Block until `client` answers PING (at start-up), or raise RedisUnavailable past the deadline."""
        self.call(client.ping)
