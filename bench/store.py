"""The store on the embedded server: raw insert_one vs Omnigate's append, fsync on vs off,
and the cost of loading the last 50 messages of a conversation of 100 vs 100,000.

    python bench/store.py [--n 1000] [--big 100000]

Each figure is measured in this run, on this machine, against a baseline from the same
run: ``append`` against raw ``insert_one`` on the same server, fsync against no fsync,
the big conversation against the small one.
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
from datetime import UTC, datetime
from pathlib import Path

from bench.webchat import free_port
from gateway.model import InboundMessage, Party, Role
from gateway.store import Store
from gateway.store.mongo import new_id

SECANTUS = str(Path(sys.executable).with_name("secantusd-py"))


def start_server(path: Path, sync: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [SECANTUS, "--host", "127.0.0.1", "--port", str(port), "--storage-path", str(path),
            "--log-level", "WARNING"] + (["--sync-on-commit"] if sync else [])
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, f"mongodb://127.0.0.1:{port}/?directConnection=true"


def stop_server(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


def message(i: int) -> InboundMessage:
    return InboundMessage(channel="bench", external_id=f"m{i}-{new_id()}", thread_key="t",
                          sender=Party(role=Role.CUSTOMER, id="u"), sender_external_id="u",
                          text="what are your opening hours? " * 3)


async def writes(uri: str, n: int) -> dict[str, float]:
    store = Store.connect(uri, "bench_writes")
    await store.client.drop_database("bench_writes")
    await store.ensure_indexes()
    raw = store.db["raw"]
    docs = [message(i).model_dump(mode="python") for i in range(n)]
    started = time.perf_counter()
    for doc in docs:
        await raw.insert_one(dict(doc))
    raw_rate = n / (time.perf_counter() - started)
    identity = await store.resolve_identity("bench", "u")
    conversation = await store.resolve_conversation("bench", "t", identity.contact_id)
    msgs = [message(i) for i in range(n)]
    started = time.perf_counter()
    for m in msgs:
        await store.append_inbound(conversation, m)
    append_rate = n / (time.perf_counter() - started)
    await store.close()
    return {"insert_one": raw_rate, "append": append_rate}


async def fill(store: Store, conversation_id: str, contact_id: str, count: int) -> None:
    now = datetime.now(UTC)
    batch = 5000
    for start in range(0, count, batch):
        await store.messages.insert_many([
            {"_id": new_id(), "type": "message", "conversation_id": conversation_id,
             "contact_id": contact_id, "seq": seq, "contact_seq": seq, "direction": "in",
             "channel": "bench", "conversation_ref": {"channel": "bench", "thread_key": "t"},
             "sender": {"role": "customer", "id": "u", "name": None}, "recipient": None,
             "external_id": None, "timestamp": now, "created_at": now, "text": f"message {seq}",
             "value": None, "name": None, "attachments": [], "buttons": [],
             "reply_to_id": None, "channel_data": {}, "processed": True, "delivery": None,
             "dedupe_key": None, "idem_key": f"in:bench:{conversation_id}:{seq}"}
            for seq in range(start + 1, min(count, start + batch) + 1)
        ], ordered=False)
    await store.conversations.update_one({"_id": conversation_id}, {"$set": {"seq": count}})


async def history(uri: str, big: int, reps: int = 50) -> dict[str, float]:
    store = Store.connect(uri, "bench_history")
    await store.client.drop_database("bench_history")
    await store.ensure_indexes()
    result = {}
    for size in (100, big):
        identity = await store.resolve_identity("bench", f"u{size}")
        conversation = await store.resolve_conversation("bench", f"t{size}", identity.contact_id)
        await fill(store, conversation.id, identity.contact_id, size)
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            items, _ = await store.history(conversation.id, limit=50)
            times.append(time.perf_counter() - started)
            assert len(items) == 50
            assert items[0].seq == size
        result[size] = statistics.median(times) * 1000
    await store.close()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="writes per measurement")
    parser.add_argument("--big", type=int, default=100_000, help="size of the big conversation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for sync in (True, False):
            process, uri = start_server(Path(tmp) / f"db-{sync}", sync)
            try:
                rates[sync] = await writes(uri, args.n)
            finally:
                stop_server(process)
        process, uri = start_server(Path(tmp) / "db-history", True)
        try:
            pages = await history(uri, args.big)
        finally:
            stop_server(process)
    print(f"store writes, {args.n} sequential each, embedded SecantusDB, {os.cpu_count()} cores\n")
    print("| fsync per commit | raw insert_one/s | Omnigate append/s | append / insert_one |")
    print("|---|---|---|---|")
    for sync in (True, False):
        r = rates[sync]
        print(f"| {'on (default)' if sync else 'off'} | {r['insert_one']:.0f} | "
              f"{r['append']:.0f} | {r['append'] / r['insert_one']:.2f} |")
    on, off = rates[True], rates[False]
    print(f"\nfsync on / off: insert_one x{on['insert_one'] / off['insert_one']:.2f}, "
          f"append x{on['append'] / off['append']:.2f}")
    print(f"\nlast 50 messages (median of 50): {pages[100]:.2f} ms at 100 messages, "
          f"{pages[args.big]:.2f} ms at {args.big:,}; ratio {pages[args.big] / pages[100]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
