"""What one update statement costs the embedded store, by indexes and document size.

    python -m bench.statements [--rounds 40]

A turn's commit updates its conversation with one ``update_one`` (bot state, processed
mark, lease) inside the batch's transaction. This measures that statement alone against
a SecantusDB server (fsync per commit, as the gateway's default) started here: bulks of
20 such updates in one transaction, on collections with 1, 4 and 8 indexes (the
``conversations`` collection has 8), and with a bot state carrying 0, 10 or 40 event-log
entries (the engine keeps up to 40 for custom actions). Figures are milliseconds of the
server per updated document; read them as ratios to the first row.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import MongoClient, UpdateOne

from bench.store import start_server, stop_server

EVENT = {"event": "user", "text": "what are your opening hours?", "timestamp": 1.0,
         "parse_data": {"intent": {"name": "hours", "confidence": 1.0}}}
DOCS = 200
BULK = 20


def measure(client: MongoClient[dict[str, Any]], indexes: int, events: int,
            rounds: int) -> float:
    collection = client["bench_statements"][f"i{indexes}e{events}"]
    collection.drop()
    log = [EVENT] * events
    collection.insert_many([
        {"_id": f"c{i}", "owner": "bot", "lease": {"owner": "me", "until": 0},
         "bot_state": {"events": log}, "processed_seq": 0,
         **{f"f{k}": i for k in range(indexes - 1)}} for i in range(DOCS)])
    for k in range(indexes - 1):
        collection.create_index([(f"f{k}", 1)])
    started = time.perf_counter()
    for r in range(rounds):
        ops = [UpdateOne({"_id": f"c{(r * BULK + k) % DOCS}", "lease.owner": "me",
                          "owner": "bot"},
                         {"$set": {"bot_state": {"events": log, "n": r},
                                   "updated_at": datetime.now(UTC), "lease.until": r},
                          "$max": {"processed_seq": r}})
               for k in range(BULK)]
        with client.start_session() as session, session.start_transaction():
            result = collection.bulk_write(ops, session=session)
            assert result.matched_count == BULK
    return (time.perf_counter() - started) / (rounds * BULK) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process, uri = start_server(Path(tmp), sync=True)
        try:
            client: MongoClient[dict[str, Any]] = MongoClient(uri)
            rows = [(i, e, measure(client, i, e, args.rounds))
                    for i, e in ((1, 0), (4, 0), (8, 0), (8, 10), (8, 40), (1, 40))]
            client.close()
        finally:
            stop_server(process)
    first = rows[0][2]
    print(f"update_one in bulks of {BULK} in a transaction, {args.rounds} bulks each\n")
    print("| indexes | event-log entries in bot_state | ms per updated document | ratio |")
    print("|---|---|---|---|")
    for indexes, events, ms in rows:
        print(f"| {indexes} | {events} | {ms:.2f} | {ms / first:.2f} |")


if __name__ == "__main__":
    main()
