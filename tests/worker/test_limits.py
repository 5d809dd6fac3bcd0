"""The shared limiter's Redis scripts, against a real Redis."""

from __future__ import annotations

import pytest

from worker.limits import MIN_RATE, SharedLimiter


@pytest.fixture
def limiter(redis_client):
    def make(rps=0, concurrency=0):
        return SharedLimiter(redis_client, rps, concurrency, slot_seconds=30)

    yield make
    for key in redis_client.scan_iter("relay:limit:*"):
        redis_client.delete(key)


def test_no_limits_means_no_waiting(limiter):
    free = limiter()
    assert all(free._try() == 0 for _ in range(100))


def test_bucket_gives_a_burst_then_makes_callers_wait(limiter):
    bucket = limiter(rps=5)
    waits = [bucket._try() for _ in range(6)]
    assert waits[:5] == [0, 0, 0, 0, 0]
    assert 0 < waits[5] <= 0.2


def test_calls_in_flight_are_capped_and_released(limiter):
    first, second = limiter(concurrency=1), limiter(concurrency=1)
    assert first._try() == 0
    assert second._try() > 0
    first.release()
    assert second._try() == 0


def test_overload_halves_the_rate_and_successes_bring_it_back(limiter, redis_client):
    shared = limiter(rps=8)
    assert shared.record(overload=True) == 4
    assert shared.record(overload=True) == 2
    shared._try()  # learns that the rate is reduced
    assert shared.record(overload=False) == pytest.approx(2.4)
    for _ in range(40):
        shared.record(overload=False)
    assert redis_client.get("relay:limit:rate") is None  # back at the ceiling


def test_rate_never_drops_below_the_floor(limiter):
    shared = limiter(rps=1)
    for _ in range(10):
        rate = shared.record(overload=True)
    assert rate == MIN_RATE


def test_both_limits_take_one_round_trip_and_keep_to_both(limiter, redis_client):
    writes = []
    pool = redis_client.connection_pool

    class Counting(pool.connection_class):
        # One write to the socket per round trip.
        def send_packed_command(self, command, check_health=True):
            writes.append(command)
            return super().send_packed_command(command, check_health)

    pool.connection_class = Counting
    pool.disconnect()
    redis_client.ping()  # connected, so only the limiter's writes count
    writes.clear()
    first, second = limiter(rps=2, concurrency=1), limiter(rps=2, concurrency=1)
    assert first._try() == 0
    assert len(writes) == 1

    assert second._try() == 0.05  # no place in flight: no token taken
    first.release()
    assert second._try() == 0  # the second of the burst of two
    second.release()
    assert 0 < first._try() <= 0.5  # bucket empty: no place kept either
    assert redis_client.zcard("relay:limit:inflight") == 0
