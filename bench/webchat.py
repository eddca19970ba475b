"""Web chat round trips per second and latency: Omnigate vs a bare aiohttp echo server.

    python bench/webchat.py [--visitors 20] [--seconds 10]

Both servers run as child processes on this machine; the load generator (this process)
drives both with the same web chat protocol client: N visitors, each sending a message and
waiting for the bot's reply before sending the next. Omnigate runs on its embedded store,
with and without fsync on every commit. Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "what are your opening hours?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(url: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as response:
                    if response.status in (200, 404):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def next_bot_message(ws: aiohttp.ClientWebSocketResponse) -> dict:
    while True:
        frame = await asyncio.wait_for(ws.receive_json(), 30)
        if frame.get("type") == "message" and frame.get("role") == "bot":
            return frame


async def visitor(url: str, stop_at: float, latencies: list[float], warm: bool) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_json({"type": "hello", "token": None, "watermark": None})
        while (await ws.receive_json())["type"] != "synced":
            pass
        if warm:  # the first message of a conversation gets greeting + menu: not measured
            await ws.send_json({"type": "message", "client_id": "warm", "text": "hello"})
            await next_bot_message(ws)
            await next_bot_message(ws)
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            await ws.send_json({"type": "message", "client_id": uuid.uuid4().hex[:16],
                                "text": QUESTION})
            await next_bot_message(ws)
            latencies.append(time.perf_counter() - started)


async def load(url: str, visitors: int, seconds: float, warm: bool) -> dict[str, float]:
    latencies: list[float] = []
    # connect and warm up everyone first, then measure a fixed window
    stop_at = time.monotonic() + seconds + (10 if warm else 2)
    tasks = [asyncio.create_task(visitor(url, stop_at, latencies, warm))
             for _ in range(visitors)]
    await asyncio.sleep(10 if warm else 2)
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"rps": len(latencies) / elapsed, "n": len(latencies), "p50": q[49] * 1000,
            "p95": q[94] * 1000, "p99": q[98] * 1000}


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=out, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def run_echo(visitors: int, seconds: float, tmp: Path) -> dict[str, float]:
    port = free_port()
    process = start([sys.executable, str(ROOT / "bench" / "echo_server.py"), str(port)],
                    dict(os.environ), tmp / "echo.log")
    try:
        await wait_ready(f"http://127.0.0.1:{port}/")
        return await load(f"ws://127.0.0.1:{port}/webchat/ws", visitors, seconds, warm=False)
    finally:
        stop(process)


async def run_gateway(visitors: int, seconds: float, tmp: Path, sync: bool) -> dict[str, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGATE_")}
    env.update(OMNIGATE_PORT=str(port), OMNIGATE_DATA_DIR=str(tmp / f"data-{sync}"),
               OMNIGATE_EMBEDDED_SYNC_ON_COMMIT=str(sync).lower(), OMNIGATE_LOG_LEVEL="WARNING")
    process = start([sys.executable, "-m", "gateway", "serve"], env, tmp / f"gw-{sync}.log")
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        return await load(f"ws://127.0.0.1:{port}/webchat/ws", visitors, seconds, warm=True)
    finally:
        stop(process)


def row(name: str, r: dict[str, float]) -> str:
    return (f"| {name} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} "
            f"| {r['n']:.0f} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visitors", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        echo = await run_echo(args.visitors, args.seconds, tmp)
        fsync = await run_gateway(args.visitors, args.seconds, tmp, sync=True)
        nosync = await run_gateway(args.visitors, args.seconds, tmp, sync=False)
    print(f"web chat round trips, {args.visitors} visitors, {args.seconds:.0f} s each, "
          f"{os.cpu_count()} cores\n")
    print("| server | round trips/s | p50 ms | p95 ms | p99 ms | samples |")
    print("|---|---|---|---|---|---|")
    print(row("bare aiohttp echo (baseline)", echo))
    print(row("Omnigate, embedded store, fsync per commit (default)", fsync))
    print(row("Omnigate, embedded store, no fsync", nosync))
    print()
    print(f"Omnigate (default) / echo throughput: {fsync['rps'] / echo['rps']:.3f}; "
          f"p50 latency x{fsync['p50'] / echo['p50']:.1f}")
    print(f"fsync per commit costs: throughput x{fsync['rps'] / nosync['rps']:.2f}, "
          f"p50 x{fsync['p50'] / nosync['p50']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
