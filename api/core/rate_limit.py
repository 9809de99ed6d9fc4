"""Per-key rate limits as token buckets: in this process's memory, or in Redis when several API processes
share one broker.

A bucket holds at most `per_minute` tokens and refills at `per_minute / 60` a second, so a client may burst
a full minute's worth and then flows at the rate. `acquire` takes one token or says how long until one is
there. The in-memory store is exact for one API process (the embedded default); behind a load balancer
each process would grant its own minute, so `svfit api` on a Redis broker keeps the buckets in Redis, where
one Lua script makes take-a-token atomic across processes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from api.core.settings import Settings

logger = logging.getLogger(__name__)

# Buckets untouched this long are full again and can be forgotten (memory store only; Redis expires keys).
_IDLE_FORGET_S = 120.0
_PRUNE_EVERY = 10_000


class RateLimiter(Protocol):
    def acquire(self, bucket: str, per_minute: int) -> float:
        """0.0 when a token was taken, else the seconds until one will be there (nothing is taken)."""
        ...


class MemoryRateLimiter:
    """Buckets in a dict under a lock: exact within one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # bucket -> (tokens, last refill time)
        self._calls = 0

    def acquire(self, bucket: str, per_minute: int) -> float:
        capacity, rate = float(per_minute), per_minute / 60.0
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(bucket, (capacity, now))
            tokens = min(capacity, tokens + (now - then) * rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
            self._buckets[bucket] = (tokens - 1 if wait == 0.0 else tokens, now)
            self._calls += 1
            if self._calls % _PRUNE_EVERY == 0:
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < _IDLE_FORGET_S}
        return wait


# KEYS[1]: the bucket; ARGV: capacity, refill per second. Redis's own clock, so API hosts need not agree
# on the time. Returns the wait as a string: a Lua number returned bare is truncated to an integer.
_TOKEN_BUCKET_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return tostring(wait)
"""


class RedisRateLimiter:
    """Buckets shared by every API process on one Redis. If Redis is unreachable the request is let
    through (and logged): a rate limit is not worth an outage."""

    def __init__(self, url: str, prefix: str = "svfit:ratelimit:") -> None:
        import redis  # the Celery broker's client; imported only when the buckets live there

        self._client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._script = self._client.register_script(_TOKEN_BUCKET_LUA)
        self._prefix = prefix

    def acquire(self, bucket: str, per_minute: int) -> float:
        try:
            wait = self._script(keys=[self._prefix + bucket], args=[per_minute, per_minute / 60.0])
        except Exception:  # noqa: BLE001 — any Redis failure: fail open
            logger.warning("rate limiter: Redis unavailable, request not limited", exc_info=True)
            return 0.0
        return float(wait)


def limiter_for(settings: Settings) -> RateLimiter:
    redis_broker = bool(settings.broker_url) and settings.broker_url.startswith(("redis://", "rediss://"))
    store = settings.rate_limit_store
    if store == "auto":
        store = "redis" if redis_broker else "memory"
    if store == "redis":
        if not redis_broker:
            raise ValueError("SVFIT_RATE_LIMIT_STORE=redis needs a Redis SVFIT_BROKER_URL")
        return RedisRateLimiter(settings.broker_url)
    return MemoryRateLimiter()
