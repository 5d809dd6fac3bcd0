"""Shared limits toward Copernica: calls per second and calls in flight.

Every worker process draws from the same Redis-held budget, so adding workers
does not multiply the load on Copernica. When Copernica answers 429, 503 or
504 the allowed rate is halved for everyone; each accepted call then gives
back a twentieth of the configured rate, so the relay speeds up again
gradually (additive increase, multiplicative decrease).
"""

from __future__ import annotations

import secrets
import time

LIMIT_PREFIX = "relay:limit:"

#: The rate never drops below this many calls per second.
MIN_RATE = 0.5

#: Share of the configured rate regained with each accepted call.
RECOVERY_STEP = 0.05

#: How long an adaptive rate is remembered after the last call.
RATE_MEMORY_SECONDS = 600

#: Seconds a worker may wait in place for a slot before rescheduling the job.
MAX_WAIT_SECONDS = 1.0

#: Takes a token from the bucket KEYS[1], refilled at the current rate (KEYS[2],
#: else the ceiling ARGV[1]) at the time ARGV[2] (ms). Sets ``wait`` (0 when a
#: token was taken, else the milliseconds until one will be there) and
#: ``reduced`` (1 while an overload is still being recovered from).
TOKEN_STEP = """
local rate = tonumber(redis.call('GET', KEYS[2]) or ARGV[1])
local now = tonumber(ARGV[2])
local burst = math.max(1, rate)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) / 1000 * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], 60000)
local reduced = 0
if rate < tonumber(ARGV[1]) then reduced = 1 end
"""

#: Takes a token (see TOKEN_STEP). Returns {wait, reduced}.
TAKE_TOKEN = TOKEN_STEP + "return {wait, reduced}\n"

#: Both limits in one round trip: a place among the calls in flight (KEYS[3],
#: at most ARGV[3]; expired claims dropped first) and a token. The place,
#: ARGV[5] until ARGV[4], is only claimed with a token. Returns {-1, 0} when
#: no place is free, else {wait, reduced} as TAKE_TOKEN does.
TAKE_SLOT_AND_TOKEN = (
    """
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[3]) then
  return {-1, 0}
end
"""
    + TOKEN_STEP
    + """
if wait == 0 then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
  redis.call('PEXPIRE', KEYS[3], 120000)
end
return {wait, reduced}
"""
)

#: Claims a place among the calls in flight; expired claims (a worker that
#: died mid-call) are dropped first. Returns 1 when claimed.
CLAIM_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], 120000)
  return 1
end
return 0
"""

#: Halves (overload) or raises (success) the shared rate, within bounds.
ADAPT_RATE = """
local rate = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
local ceiling = tonumber(ARGV[1])
if ARGV[2] == 'overload' then
  rate = math.max(tonumber(ARGV[3]), rate / 2)
else
  rate = math.min(ceiling, rate + ceiling * tonumber(ARGV[4]))
end
if rate >= ceiling then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], tostring(rate), 'EX', ARGV[5])
end
return tostring(rate)
"""


class SharedLimiter:
    """A call slot at a time; ``acquire`` returns the seconds to wait if none."""

    def __init__(
        self, connection, max_rps: float, max_concurrency: int, slot_seconds: float
    ):
        self.connection = connection
        self.max_rps = max_rps
        self.max_concurrency = max_concurrency
        self.slot_ms = int(slot_seconds * 1000)
        self.bucket_key = f"{LIMIT_PREFIX}bucket"
        self.rate_key = f"{LIMIT_PREFIX}rate"
        self.inflight_key = f"{LIMIT_PREFIX}inflight"
        self._slot: str | None = None
        self._reduced = False

    def acquire(self) -> float:
        """Take a slot, waiting up to MAX_WAIT_SECONDS; else the wait still due."""
        deadline = time.monotonic() + MAX_WAIT_SECONDS
        while True:
            wait = self._try()
            if wait == 0:
                return 0.0
            if time.monotonic() + wait > deadline:
                return wait
            time.sleep(wait)

    def _try(self) -> float:
        now_ms = int(time.time() * 1000)
        if self.max_concurrency and self.max_rps:
            return self._try_both(now_ms)
        if self.max_concurrency:
            slot = secrets.token_hex(8)
            claimed = self.connection.eval(
                CLAIM_SLOT,
                1,
                self.inflight_key,
                now_ms,
                self.max_concurrency,
                now_ms + self.slot_ms,
                slot,
            )
            if not claimed:
                return 0.05
            self._slot = slot
        if self.max_rps:
            wait_ms, reduced = self.connection.eval(
                TAKE_TOKEN, 2, self.bucket_key, self.rate_key, self.max_rps, now_ms
            )
            self._reduced = bool(reduced)
            if wait_ms:
                self.release()
                return wait_ms / 1000
        return 0.0

    def _try_both(self, now_ms: int) -> float:
        slot = secrets.token_hex(8)
        wait_ms, reduced = self.connection.eval(
            TAKE_SLOT_AND_TOKEN,
            3,
            self.bucket_key,
            self.rate_key,
            self.inflight_key,
            self.max_rps,
            now_ms,
            self.max_concurrency,
            now_ms + self.slot_ms,
            slot,
        )
        if wait_ms < 0:
            return 0.05
        self._reduced = bool(reduced)
        if wait_ms:
            return wait_ms / 1000
        self._slot = slot
        return 0.0

    def release(self) -> None:
        if self._slot is not None:
            self.connection.zrem(self.inflight_key, self._slot)
            self._slot = None

    def record(self, overload: bool) -> float | None:
        """Tell every worker how the call went; returns the rate now in force."""
        if not self.max_rps or not (overload or self._reduced):
            # At full rate a success changes nothing: no round trip for it.
            return None
        rate = self.connection.eval(
            ADAPT_RATE,
            1,
            self.rate_key,
            self.max_rps,
            "overload" if overload else "ok",
            MIN_RATE,
            RECOVERY_STEP,
            RATE_MEMORY_SECONDS,
        )
        return float(rate)
