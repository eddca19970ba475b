"""gateway/ratelimit.py: the token bucket's arithmetic, with an injected clock."""

from __future__ import annotations

import pytest

from gateway.ratelimit import RateLimit, retry_after_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_allowed_then_the_rate() -> None:
    clock = Clock()
    limit = RateLimit(rate=2.0, burst=3, clock=clock)
    assert [limit.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limit.take("a")
    assert wait == pytest.approx(0.5)  # one token comes back every 0.5 s
    clock.now += 0.25
    assert limit.take("a") == pytest.approx(0.25)  # refused: nothing was spent
    clock.now += 0.25
    assert limit.take("a") == 0.0
    assert limit.take("a") == pytest.approx(0.5)


def test_keys_have_their_own_buckets() -> None:
    clock = Clock()
    limit = RateLimit(rate=1.0, burst=1, clock=clock)
    assert limit.take("a") == 0.0
    assert limit.take("a") > 0
    assert limit.take("b") == 0.0


def test_refill_never_exceeds_the_burst() -> None:
    clock = Clock()
    limit = RateLimit(rate=1.0, burst=2, clock=clock)
    limit.take("a")
    clock.now += 3600
    assert [limit.take("a") for _ in range(2)] == [0.0, 0.0]
    assert limit.take("a") == pytest.approx(1.0)


def test_a_refused_take_keeps_waiting_the_same_way() -> None:
    """Hammering while refused does not push the wait further out (nothing is spent)."""
    clock = Clock()
    limit = RateLimit(rate=0.1, burst=1, clock=clock)
    assert limit.take("a") == 0.0
    for _ in range(100):
        assert limit.take("a") == pytest.approx(10.0)
    clock.now += 10
    assert limit.take("a") == 0.0


def test_per_minute() -> None:
    clock = Clock()
    limit = RateLimit.per_minute(6, burst=2, clock=clock)
    assert [limit.take("a") for _ in range(2)] == [0.0, 0.0]
    assert limit.take("a") == pytest.approx(10.0)
    default = RateLimit.per_minute(3, clock=clock)  # burst: the per-minute number
    assert [default.take("x") for _ in range(4)][-1] == pytest.approx(20.0)


def test_zero_is_off() -> None:
    limit = RateLimit(rate=0, burst=0, clock=Clock())
    assert not limit.enabled
    assert all(limit.take("a") == 0.0 for _ in range(10_000))
    assert len(limit) == 0  # nothing remembered


def test_idle_keys_are_forgotten() -> None:
    clock = Clock()
    limit = RateLimit(rate=1.0, burst=2, clock=clock)
    for i in range(1000):
        limit.take(f"k{i}")
    assert len(limit) > 900  # all still refilling
    clock.now += 5  # every bucket is full again: the same as never seen
    for i in range(1000):
        limit.take(f"new{i}")  # each take looks at a few of the oldest
    assert not any(f"k{i}" in limit._buckets for i in range(1000))
    assert len(limit) <= 1000


def test_memory_is_bounded_even_when_no_key_is_idle() -> None:
    clock = Clock()
    limit = RateLimit(rate=1.0, burst=5, clock=clock, max_keys=100)
    for i in range(10_000):
        limit.take(f"k{i}")
    assert len(limit) == 100
    assert "k9999" in limit._buckets and "k0" not in limit._buckets  # least recent went
    # a recently used key keeps its state
    for _ in range(4):
        limit.take("k9999")
    assert limit.take("k9999") > 0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        RateLimit(rate=1.0, burst=0.5)
    with pytest.raises(ValueError, match="rate"):
        RateLimit(rate=-1, burst=1)
    with pytest.raises(ValueError, match="max_keys"):
        RateLimit(rate=1, burst=1, max_keys=0)


def test_retry_after_header_seconds() -> None:
    assert retry_after_seconds(0.01) == 1
    assert retry_after_seconds(1.0) == 1
    assert retry_after_seconds(1.2) == 2
