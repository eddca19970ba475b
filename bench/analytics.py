"""How the analytics report scales: one day's report among outcomes spread over many days,
and the whole period, at N and 10 x N outcomes.

    python bench/analytics.py [--n 1000]

Ratios are against the same run: a one-day report should cost about the same whatever
the store holds (the period index selects the day), the whole-period report grows with
the outcomes it reads (durations are pushed per group and ranked in Python).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.store import start_server, stop_server
from gateway.analytics import Filters, Outcomes, Period
from gateway.store import Store
from gateway.store.mongo import new_id

CHANNELS = ("webchat", "telegram", "slack", "email")
TEAMS = ("support", "billing", None)
TOPICS = ("faq", "returns", "orders", None)
START = datetime(2025, 1, 1, tzinfo=UTC)
DAYS = 100


async def fill(outcomes: Outcomes, n: int) -> None:
    docs = []
    for i in range(n):
        handed = i % 3 != 0
        ended = START + timedelta(days=i % DAYS, seconds=i)
        docs.append({
            "_id": new_id(), "conversation_id": new_id(), "contact_id": "c",
            "channel": CHANNELS[i % 4], "started_at": ended, "ended_at": ended,
            "resolved_by": "agent" if handed else "bot", "agent_id": None,
            "handed_off": handed, "reason": f"reason {i % 7}" if handed else None,
            "team": TEAMS[i % 3], "topic": TOPICS[i % 4], "priority": "normal",
            "handoff_at": ended, "first_response_at": None,
            "first_response_seconds": float(i % 600) if handed else None,
            "resolution_seconds": float(i % 3600) if handed else None,
            "has_sla": handed, "first_response_breached": i % 11 == 0,
            "resolution_breached": False, "csat_asked": handed,
            "csat_score": (i % 5) + 1 if i % 2 else None, "csat_comment": None,
            "csat_answered_at": None,
        })
    await outcomes.db.ensure_indexes()
    for k in range(0, n, 1000):
        await outcomes.db.outcomes.insert_many(docs[k:k + 1000])


async def timed(outcomes: Outcomes, period: Period, runs: int = 5) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await outcomes.report(period, Filters())
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def measure(uri: str, n: int) -> tuple[float, float]:
    store = Store.connect(uri, f"bench_{new_id()}")
    outcomes = Outcomes(store)
    await fill(outcomes, n)
    day = Period(start=START + timedelta(days=10), end=START + timedelta(days=11))
    whole = Period(start=START, end=START + timedelta(days=DAYS))
    result = await timed(outcomes, day), await timed(outcomes, whole, runs=3)
    await store.client.drop_database(store.db.name)
    await store.close()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    n = parser.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        process, uri = start_server(Path(tmp), sync=False)
        try:
            small_day, small_all = await measure(uri, n)
            big_day, big_all = await measure(uri, 10 * n)
        finally:
            stop_server(process)
    print(f"one day among {n:>7} outcomes: {small_day * 1000:8.1f} ms")
    print(f"one day among {10 * n:>7} outcomes: {big_day * 1000:8.1f} ms  "
          f"({big_day / small_day:.2f}x)")
    print(f"all {n:>7} outcomes:            {small_all * 1000:8.1f} ms")
    print(f"all {10 * n:>7} outcomes:            {big_all * 1000:8.1f} ms  "
          f"({big_all / small_all:.2f}x)")


if __name__ == "__main__":
    asyncio.run(main())
