"""Telegram webhook updates per second and a full bot turn: Omnigate vs a bare aiohttp
endpoint, in one run on this machine.

    python -m bench.telegram [--senders 20] [--seconds 10] [--turns 30]

1. Throughput: N concurrent senders POST real-shaped Telegram updates (a new text
   message each, with the secret header) as fast as they are acknowledged, for a fixed
   window, first to a bare aiohttp endpoint that answers 200 (baseline, a child process),
   then to Omnigate's ``POST /webhooks/telegram`` (secret check, parse, dedupe, durable
   store, 200; the gateway on its embedded store in a child process, as bench/webchat.py).
2. A full bot turn, one at a time: webhook in → the bot's reply recorded as sendMessage
   by the fake Bot API (tests/fakes/telegram_api.py, running in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.webchat import ROOT, free_port, start, stop, store_commands, wait_ready
from tests.fakes.telegram_api import FakeTelegram

TOKEN = "123456:BENCH-token"
SECRET = "bench-secret"
HOOK = "/webhooks/telegram"
QUESTION = "what are your opening hours?"
ids = itertools.count(1)


def update(user_id: int, text: str) -> bytes:
    n = next(ids)
    return json.dumps({"update_id": 10_000_000 + n, "message": {
        "message_id": n, "date": int(time.time()), "text": text,
        "from": {"id": user_id, "is_bot": False, "first_name": "Bench", "language_code": "en"},
        "chat": {"id": user_id, "type": "private", "first_name": "Bench"}}}).encode()


async def sender(http: aiohttp.ClientSession, url: str, user_id: int, stop_at: float,
                 latencies: list[float], errors: list[int], repeat: bool = False) -> None:
    """Post updates until ``stop_at``: a new message each time, or (``repeat``) the same
    update again and again, as Telegram redelivers it (the dedupe path)."""
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}
    same = update(user_id, QUESTION)
    while time.monotonic() < stop_at:
        body = same if repeat else update(user_id, QUESTION)
        started = time.perf_counter()
        async with http.post(url, data=body, headers=headers) as response:
            await response.read()
            if response.status != 200:
                errors.append(response.status)
                continue
        latencies.append(time.perf_counter() - started)


async def throughput(url: str, senders: int, seconds: float, repeat: bool = False
                     ) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[int] = []
    connector = aiohttp.TCPConnector(limit=senders)
    async with aiohttp.ClientSession(connector=connector) as http:
        warm_until = time.monotonic() + 2
        await asyncio.gather(*(sender(http, url, 900_000 + n, warm_until, [], errors)
                               for n in range(senders)))
        started = time.perf_counter()
        stop_at = time.monotonic() + seconds
        first = 600_000 if repeat else 800_000
        await asyncio.gather(*(sender(http, url, first + n, stop_at, latencies, errors, repeat)
                               for n in range(senders)))
        elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"rps": len(latencies) / elapsed, "n": len(latencies), "errors": len(errors),
            "p50": q[49] * 1000, "p95": q[94] * 1000, "p99": q[98] * 1000}


async def bot_turns(url: str, fake: FakeTelegram, turns: int) -> dict[str, float]:
    """Sequential turns: POST an update, wait for the reply's sendMessage at the fake."""
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}
    user_id = 700_001
    latencies: list[float] = []
    async with aiohttp.ClientSession() as http:
        for n in range(turns + 1):  # the first turn gets the greeting: not measured
            before = len(fake.texts(user_id))
            started = time.monotonic()  # the fake stamps calls with time.monotonic() too
            async with http.post(url, data=update(user_id, "hello" if n == 0 else QUESTION),
                                 headers=headers) as response:
                assert response.status == 200, response.status
            expected = 2 if n == 0 else 1  # greeting + menu, then one answer
            await fake.wait_for(lambda b=before, e=expected: len(fake.texts(user_id)) >= b + e,
                                timeout=60)
            reply = [c for c in fake.of("sendMessage") if c.params["chat_id"] == user_id][-1]
            if n:
                latencies.append(reply.at - started)
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {"n": len(latencies), "p50": statistics.median(latencies) * 1000,
            "p95": q[18] * 1000, "min": min(latencies) * 1000, "max": max(latencies) * 1000}


async def bare_endpoint(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True})


def serve_baseline(port: int) -> None:
    app = web.Application()
    app.router.add_post(HOOK, bare_endpoint)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def run_baseline(senders: int, seconds: float, tmp: Path) -> dict[str, float]:
    port = free_port()
    process = start([sys.executable, "-m", "bench.telegram", "--baseline-server", str(port)],
                    dict(os.environ, PYTHONPATH=str(ROOT)), tmp / "baseline.log")
    try:
        await wait_ready(f"http://127.0.0.1:{port}/", ok=(200, 404))  # no page: listening
        return await throughput(f"http://127.0.0.1:{port}{HOOK}", senders, seconds)
    finally:
        stop(process)


async def drain(fake: FakeTelegram) -> None:
    """Wait until the bot's replies stop coming (3 s without a new sendMessage)."""
    replies, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 3:
        await asyncio.sleep(0.5)
        now = len(fake.of("sendMessage", ok=None))
        if now != replies:
            replies, quiet_since = now, time.monotonic()


async def run_gateway(senders: int, seconds: float, turns: int, tmp: Path
                      ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    fake = FakeTelegram(token=TOKEN)
    await fake.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGATE_")}
    env.update(OMNIGATE_PORT=str(port), OMNIGATE_DATA_DIR=str(tmp / "data"),
               OMNIGATE_LOG_LEVEL="WARNING", OMNIGATE_TELEGRAM_TOKEN=TOKEN,
               OMNIGATE_TELEGRAM_WEBHOOK_SECRET=SECRET, OMNIGATE_TELEGRAM_API_URL=fake.url,
               # a load test, not a test of the limits: the senders share one address
               OMNIGATE_WEBHOOK_REQUESTS_PER_SECOND="0", PYTHONPATH=str(ROOT))
    process = start([sys.executable, "-m", "gateway", "serve"], env, tmp / "gateway.log")
    url = f"http://127.0.0.1:{port}{HOOK}"
    try:
        await wait_ready(f"http://127.0.0.1:{port}/readyz")
        metrics = f"http://127.0.0.1:{port}/metrics"
        before = await store_commands(metrics)
        rate = await throughput(url, senders, seconds)
        await drain(fake)  # the bot turns queued behind the burst, before the next phase
        after = await store_commands(metrics)
        # warm-up updates included: a slight overestimate
        rate["commands"] = (after - before) / rate["n"] if before and after else float("nan")
        redelivered = await throughput(url, senders, seconds, repeat=True)
        await drain(fake)
        again = await store_commands(metrics)
        redelivered["commands"] = ((again - after) / redelivered["n"] if again and after
                                   else float("nan"))
        turn = await bot_turns(url, fake, turns)
        return rate, redelivered, turn
    finally:
        stop(process)
        await fake.close()


def row(name: str, r: dict[str, float]) -> str:
    return (f"| {name} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} "
            f"| {r['n']:.0f} | {r['errors']:.0f} | {r.get('commands', float('nan')):.1f} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--turns", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        bare = await run_baseline(args.senders, args.seconds, tmp)
        rate, redelivered, turn = await run_gateway(args.senders, args.seconds, args.turns,
                                                    tmp)
    print(f"Telegram webhook updates, {args.senders} concurrent senders, {args.seconds:.0f} s "
          f"each, {os.cpu_count()} cores\n")
    print("| endpoint | updates/s | p50 ms | p95 ms | p99 ms | acked | non-200 "
          "| store commands per update (its bot turn and reply included) |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("bare aiohttp endpoint answering 200 (baseline)", bare))
    print(row("Omnigate POST /webhooks/telegram, new messages (embedded store, fsync)", rate))
    print(row("Omnigate POST /webhooks/telegram, redeliveries (dedupe hit)", redelivered))
    print()
    print(f"Omnigate / bare throughput, new messages: {rate['rps'] / bare['rps']:.4f} "
          f"(p50 x{rate['p50'] / bare['p50']:.1f}); redeliveries: "
          f"{redelivered['rps'] / bare['rps']:.4f} (p50 x{redelivered['p50'] / bare['p50']:.1f})")
    print(f"full bot turn (webhook in -> reply sendMessage at the fake Bot API), "
          f"{turn['n']:.0f} sequential turns: p50 {turn['p50']:.1f} ms, p95 {turn['p95']:.1f} "
          f"ms, min {turn['min']:.1f} ms, max {turn['max']:.1f} ms")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--baseline-server":
        serve_baseline(int(sys.argv[2]))
    else:
        asyncio.run(main())
