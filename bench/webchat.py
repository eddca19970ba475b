"""Web chat round trips per second and latency: Omnigate vs a bare aiohttp echo server.

    python -m bench.webchat [--visitors 20] [--seconds 10] [--profile DIR] [--before DIR]

Both servers run as child processes on this machine; the load generator (this process)
drives both with the same web chat protocol client: N visitors, each sending a message and
waiting for the bot's reply before sending the next. Omnigate runs on its embedded store:
fsync on every commit (the default) with N visitors and with one, and without fsync.
Store commands per round trip are read from the gateway's ``/metrics``
(``omnigate_store_commands_total``, every command the gateway sent, background work
included) before and after the measured window. ``--profile DIR`` records the default
run's gateway and store with py-spy (collapsed stacks, one file per process, in DIR).
``--before DIR`` also runs the default load against the gateway of another checkout
(``git worktree add DIR <commit>``), so "x times faster than commit C" is measured in the
same run on the same machine.
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


async def wait_ready(url: str, within: float = 60.0, ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as response:
                    if response.status in ok:
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


async def store_commands(metrics_url: str | None) -> float | None:
    """The sum of omnigate_store_commands_total over every worker (None: no metrics)."""
    if metrics_url is None:
        return None
    async with aiohttp.ClientSession() as http, http.get(metrics_url) as response:
        if response.status != 200:
            return None
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("omnigate_store_commands_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def load(url: str, visitors: int, seconds: float, warm: bool,
               metrics_url: str | None = None) -> dict[str, float]:
    latencies: list[float] = []
    # connect and warm up everyone first, then measure a fixed window
    stop_at = time.monotonic() + seconds + (10 if warm else 2)
    tasks = [asyncio.create_task(visitor(url, stop_at, latencies, warm))
             for _ in range(visitors)]
    await asyncio.sleep(10 if warm else 2)
    latencies.clear()
    before = await store_commands(metrics_url)
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    after = await store_commands(metrics_url)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    result = {"rps": len(latencies) / elapsed, "n": len(latencies), "p50": q[49] * 1000,
              "p95": q[94] * 1000, "p99": q[98] * 1000, "commands": float("nan")}
    if before is not None and after is not None:
        # the round trips in flight when the window closed add a few commands: small
        result["commands"] = (after - before) / len(latencies)
    return result


def start(args: list[str], env: dict[str, str], log: Path,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=out, start_new_session=True,
                                cwd=cwd)


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
        await wait_ready(f"http://127.0.0.1:{port}/", ok=(200, 404))  # echo: no page
        return await load(f"ws://127.0.0.1:{port}/webchat/ws", visitors, seconds, warm=False)
    finally:
        stop(process)


async def run_gateway(visitors: int, seconds: float, tmp: Path, *, sync: bool = True,
                      workers: int = 1, profile: Path | None = None,
                      root: Path = ROOT) -> dict[str, float]:
    """``root``: the checkout whose gateway runs (``--before``: an older commit's)."""
    port = free_port()
    name = f"{visitors}-{sync}-{workers}-{root.name}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OMNIGATE_") and k != "PYTHONPATH"}
    env.update(OMNIGATE_PORT=str(port), OMNIGATE_DATA_DIR=str(tmp / f"data-{name}"),
               OMNIGATE_EMBEDDED_SYNC_ON_COMMIT=str(sync).lower(), OMNIGATE_LOG_LEVEL="WARNING")
    if root == ROOT:  # settings an older checkout may not know
        env.update(OMNIGATE_WORKERS=str(workers),
                   # a load test, not a test of the limits: one visitor alone sends ~20/s
                   OMNIGATE_WEBCHAT_MESSAGES_PER_MINUTE="0")
    process = start([sys.executable, "-m", "gateway", "serve"], env, tmp / f"gw-{name}.log",
                    cwd=root)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        # (before /readyz existed, /healthz said whether the store answers)
        await wait_ready(f"http://127.0.0.1:{port}/{'readyz' if root == ROOT else 'healthz'}")
        if profile is not None:
            spies = [start(["py-spy", "record", "--pid", str(pid), "--duration",
                            str(int(seconds + 10)), "--output", str(profile / f"{label}.txt"),
                            "--format", "raw", "--rate", "50"],
                           dict(os.environ), profile / f"{label}.log")
                     for label, pid in family(process.pid)]
        return await load(f"ws://127.0.0.1:{port}/webchat/ws", visitors, seconds, warm=True,
                          metrics_url=f"http://127.0.0.1:{port}/metrics")
    finally:
        for spy in spies:
            spy.wait(60)
        stop(process)


def family(pid: int) -> list[tuple[str, int]]:
    """The gateway process and its children (the embedded store), named for py-spy."""
    found = [("gateway", pid)]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        found.append(("store" if "secantus" in cmdline else f"child-{child}", int(child)))
    return found


def _commit(checkout: Path) -> str:
    """The short commit of a checkout (for the table), or its path."""
    try:
        return "commit " + subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], check=True,
            capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(checkout)


def row(name: str, r: dict[str, float]) -> str:
    return (f"| {name} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} "
            f"| {r['commands']:.1f} | {r['n']:.0f} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visitors", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the default run with py-spy into this directory")
    parser.add_argument("--before", type=Path, default=None,
                        help="a checkout of an older commit (git worktree add DIR COMMIT): "
                             "its gateway runs the same load, in the same run")
    args = parser.parse_args()
    n = args.visitors
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        echo = await run_echo(n, args.seconds, tmp)
        echo1 = await run_echo(1, args.seconds, tmp)
        fsync = await run_gateway(n, args.seconds, tmp, profile=args.profile)
        one = await run_gateway(1, args.seconds, tmp)
        nosync = await run_gateway(n, args.seconds, tmp, sync=False)
        two = await run_gateway(n, args.seconds, tmp, workers=2)
        before = (await run_gateway(n, args.seconds, tmp, root=args.before.resolve())
                  if args.before is not None else None)
    print(f"web chat round trips, {args.seconds:.0f} s each, {os.cpu_count()} cores\n")
    print("| server | round trips/s | p50 ms | p95 ms | p99 ms | store commands per round trip "
          "| samples |")
    print("|---|---|---|---|---|---|---|")
    print(row(f"bare aiohttp echo (baseline), {n} visitors", echo))
    print(row("bare aiohttp echo (baseline), 1 visitor", echo1))
    print(row(f"Omnigate, embedded store, fsync per commit (default), {n} visitors", fsync))
    print(row("Omnigate, embedded store, fsync per commit (default), 1 visitor", one))
    print(row(f"Omnigate, embedded store, no fsync, {n} visitors", nosync))
    print(row(f"Omnigate --workers 2, one embedded store (fsync), {n} visitors", two))
    if before is not None and args.before is not None:
        print(row(f"{_commit(args.before)} (--before), embedded store (fsync), {n} visitors",
                  before))
    print()
    if before is not None:
        print(f"Omnigate (default) / --before at {n} visitors: throughput "
              f"x{fsync['rps'] / before['rps']:.1f}, "
              f"p50 latency x{fsync['p50'] / before['p50']:.2f}")
    print(f"Omnigate (default) / echo throughput at {n} visitors: "
          f"{fsync['rps'] / echo['rps']:.4f}; p50 latency x{fsync['p50'] / echo['p50']:.1f}")
    print(f"one visitor: p50 {one['p50']:.1f} ms (echo {echo1['p50']:.2f} ms)")
    print(f"--workers 2 / 1 worker at {n} visitors: throughput x{two['rps'] / fsync['rps']:.2f}, "
          f"p95 x{two['p95'] / fsync['p95']:.2f}")
    print(f"fsync per commit costs: throughput x{fsync['rps'] / nosync['rps']:.2f}, "
          f"p50 x{fsync['p50'] / nosync['p50']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
