"""Token buckets keyed by a string (a client address, a visitor), in this process's memory.

``RateLimit(rate, burst)``: each key may spend ``burst`` at once, refilled at ``rate`` per
second. ``take(key)`` spends one and returns 0.0, or, when the key's bucket is empty,
spends nothing and returns the seconds until one is there (``retry_after``). ``rate == 0``
turns the limit off: everything is allowed and nothing is remembered.

Memory is bounded: a key whose bucket has refilled to ``burst`` is indistinguishable from a
key never seen, so it is forgotten (idle keys are evicted, oldest use first, a few on each
``take``). Above ``max_keys`` live keys the least recently used are forgotten even if not
full: under a flood of distinct keys a forgotten key starts again with a full bucket, so
the limit then leaks rather than memory growing.

The limits are per gateway process, on purpose: checking a shared counter in the store
would cost a round trip per message. N processes behind a load balancer allow up to N
times the rate (docs/webchat-protocol.md, docs/deploy.md).

The clock is injectable (monotonic by default), so the arithmetic is tested without
sleeping (tests/test_ratelimit.py).

Also here: ``webhook_limit_middleware``, the per-address limit on every ``/webhooks/...``
endpoint a connector registers (429 with ``Retry-After``, before the handler runs).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

Clock = Callable[[], float]

MAX_KEYS = 100_000
EVICT_PER_TAKE = 4  # idle keys looked at (and dropped if full) per take: amortised O(1)
WEBHOOKS_PREFIX = "/webhooks/"


class RateLimit:
    """A token bucket per key. Not thread-safe; one event loop uses it."""

    def __init__(
        self, rate: float, burst: float, *, clock: Clock = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if rate < 0 or burst < 0 or (rate > 0 and burst < 1):
            raise ValueError("rate must be >= 0 and burst >= 1 (when rate > 0)")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        # key -> (tokens left, when they were counted); least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @classmethod
    def per_minute(cls, count: float, burst: float | None = None, *,
                   clock: Clock = time.monotonic) -> RateLimit:
        """``count`` per minute, ``burst`` at once (default: ``count``)."""
        return cls(count / 60.0, count if burst is None else burst, clock=clock)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, key: str, now: float) -> float:
        found = self._buckets.get(key)
        if found is None:
            return self.burst
        tokens, at = found
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def take(self, key: str, cost: float = 1.0) -> float:
        """Spend ``cost`` from ``key``'s bucket: 0.0 if allowed, else the seconds to wait
        (nothing spent)."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        tokens = self._level(key, now)
        if tokens + 1e-9 < cost:
            wait = (cost - tokens) / self.rate
            self._remember(key, tokens, now)
            return wait
        self._remember(key, tokens - cost, now)
        return 0.0

    def _remember(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        self._evict(now)

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(EVICT_PER_TAKE):
            if len(buckets) <= 1:
                break
            oldest = next(iter(buckets))
            tokens, at = buckets[oldest]
            if tokens + (now - at) * self.rate < self.burst:
                break  # stop at the first still refilling; the others wait for later
            del buckets[oldest]
        while len(buckets) > self.max_keys:
            buckets.popitem(last=False)


def retry_after_seconds(wait: float) -> int:
    """A wait as the whole seconds of an HTTP ``Retry-After`` header (at least 1)."""
    return max(1, math.ceil(wait))


def webhook_limit_middleware(limit: RateLimit) -> Middleware:
    """Every request to ``/webhooks/...`` (Telegram, Slack and any channel's endpoint) is
    counted per client address; over the limit it gets 429 with ``Retry-After`` and a JSON
    body before its handler reads anything."""

    @web.middleware
    async def limit_webhooks(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not limit.enabled or not request.path.startswith(WEBHOOKS_PREFIX):
            return await handler(request)
        wait = limit.take(request.remote or "")
        if wait <= 0:
            return await handler(request)
        seconds = retry_after_seconds(wait)
        return web.json_response(
            {"error": "rate_limited", "retry_after": seconds,
             "message": f"too many requests from this address; retry in {seconds} s"},
            status=429, headers={"Retry-After": str(seconds)})

    return limit_webhooks
