"""The order-rate token bucket of `max_orders_per_second`, as a pure function of (state, now).

Capacity is max(rate, 1) tokens, refilled continuously at `rate` tokens per second; an order takes
one token. The risk service runs the same arithmetic inside a Redis Lua script (with Redis' clock) so
that replicas share one bucket per account; the backtester calls `take` with the simulation time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenBucket:
    tokens: float
    at: float  # seconds (any epoch; only differences matter)


def capacity(rate: float) -> float:
    return max(rate, 1.0)


def take(bucket: TokenBucket | None, now: float, rate: float) -> tuple[bool, TokenBucket]:
    """Try to take one token at `now`: (allowed, the bucket afterwards). A new bucket starts full."""
    cap = capacity(rate)
    tokens = cap if bucket is None else min(cap, bucket.tokens + max(0.0, now - bucket.at) * rate)
    if tokens < 1.0:
        return False, TokenBucket(tokens, now)
    return True, TokenBucket(tokens - 1.0, now)
