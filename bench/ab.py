"""A/B: the 20-visitor web chat load against two (or more) checkouts, alternating.

    git worktree add /tmp/a <commit>; git worktree add /tmp/b <other commit>
    python -m bench.ab /tmp/a /tmp/b [--rounds 3] [--visitors 20] [--seconds 10]

Each round runs every checkout's gateway once (bench/webchat.py's ``run_gateway``, the
same settings for all: this checkout's environment, the message limit off), in turn, so
a slow minute of the machine hits all of them. Besides round trips/s and latency it reads
the CPU time of the gateway and of its embedded store from /proc over the measured window:
the store's CPU milliseconds per round trip move far less with the machine's load than
the throughput does. The medians per checkout are printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import bench.webchat as webchat

CPU: dict[str, float] = {}


def _cpu_seconds(pid: str) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _gateway_family() -> dict[str, str]:
    """pid -> "gateway" / "store" for the processes the benchmark started."""
    found: dict[str, str] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "gateway serve" in cmdline:
            found[pid] = "gateway"
        elif "secantusd" in cmdline:
            found[pid] = "store"
    return found


_load = webchat.load


async def _measured_load(url: str, visitors: int, seconds: float, warm: bool,
                         metrics_url: str | None = None) -> dict[str, float]:
    """bench.webchat's load, with the CPU of the gateway and its store over the window."""
    family = _gateway_family()

    async def sample() -> None:
        await asyncio.sleep(10 if warm else 2)  # the warm-up of ``load``
        before = {pid: _cpu_seconds(pid) for pid in family}
        started = time.monotonic()
        await asyncio.sleep(seconds - 1)
        elapsed = time.monotonic() - started
        CPU.clear()
        for pid, name in family.items():
            CPU[name] = CPU.get(name, 0.0) + (_cpu_seconds(pid) - before[pid]) / elapsed

    sampler = asyncio.create_task(sample())
    result = await _load(url, visitors, seconds, warm, metrics_url)
    await sampler
    return result


async def run(root: Path, visitors: int, seconds: float) -> dict[str, Any]:
    own = webchat.ROOT
    webchat.ROOT = root  # so run_gateway gives every checkout the same settings
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result: dict[str, Any] = dict(
                await webchat.run_gateway(visitors, seconds, Path(tmp), root=root))
    finally:
        webchat.ROOT = own
    result.update(gateway=CPU.get("gateway", 0.0), store=CPU.get("store", 0.0))
    result["store_ms"] = 1000 * result["store"] / result["rps"]
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--visitors", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    webchat.load = _measured_load
    roots = [p.resolve() for p in args.checkouts]
    results: dict[Path, list[dict[str, Any]]] = {root: [] for root in roots}
    for _ in range(args.rounds):
        for root in roots:
            r = await run(root, args.visitors, args.seconds)
            results[root].append(r)
            print(f"{root}: {r['rps']:.0f} rt/s, p50 {r['p50']:.1f} ms, p95 {r['p95']:.1f} ms,"
                  f" gateway {r['gateway']:.2f} cores, store {r['store']:.2f} cores,"
                  f" store {r['store_ms']:.2f} ms per round trip,"
                  f" {r['commands']:.2f} commands per round trip", flush=True)
    print()
    for root, rows in results.items():
        print(f"median {root}: {statistics.median(r['rps'] for r in rows):.0f} rt/s, "
              f"p95 {statistics.median(r['p95'] for r in rows):.1f} ms, store "
              f"{statistics.median(r['store_ms'] for r in rows):.2f} ms per round trip, "
              f"{statistics.median(r['commands'] for r in rows):.2f} commands")


if __name__ == "__main__":
    asyncio.run(main())
