"""What one write statement costs the embedded store, by indexes and document size.

    python -m bench.statements [--rounds 40]

A turn's commit updates its conversation with one ``update_one`` (bot state, processed
mark, lease) inside the batch's transaction. This measures that statement alone against
a SecantusDB server (fsync per commit, as the gateway's default) started here: bulks of
20 such updates in one transaction, on collections with 1, 4 and 8 indexes (the
``conversations`` collection has 8), and with a bot state carrying 0, 10 or 40 event-log
entries (the engine keeps up to 40 for custom actions). Figures are milliseconds of the
server per updated document; read them as ratios to the first row.

Then inserts of message-shaped documents (half inbound, half web chat replies) in bulks of
20 in a transaction, into collections with the indexes of ``messages``: only ``_id``;
plus the two unique seq indexes; plus the sweeper's ``recent`` and the outbox's
``outbox_due`` (all five, as in gateway/store/mongo.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import IndexModel, MongoClient, UpdateOne

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


MESSAGE_INDEXES: list[tuple[str, list[IndexModel]]] = [
    ("_id only", []),
    ("+ (conversation_id, seq), (contact_id, contact_seq) unique", [
        IndexModel([("conversation_id", 1), ("seq", 1)], unique=True),
        IndexModel([("contact_id", 1), ("contact_seq", 1)], unique=True)]),
    ("+ recent, outbox_due (all of messages' five)", [
        IndexModel([("conversation_id", 1), ("seq", 1)], unique=True),
        IndexModel([("contact_id", 1), ("contact_seq", 1)], unique=True),
        IndexModel([("direction", 1), ("created_at", 1)]),
        IndexModel([("delivery.status", 1), ("delivery.next_attempt_at", 1)])]),
]


def message_doc(n: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    inbound = n % 2 == 0
    return {"_id": f"m{n:09d}", "type": "message", "direction": "in" if inbound else "out",
            "channel": "webchat", "conversation_ref": {"channel": "webchat",
                                                      "thread_key": f"t{n % 50}"},
            "sender": {"role": "customer" if inbound else "bot", "id": None, "name": None},
            "text": "what are your opening hours?", "timestamp": now, "created_at": now,
            "attachments": [], "buttons": [], "channel_data": {},
            "delivery": None if inbound else {"status": "stored", "attempts": 0,
                                              "next_attempt_at": now},
            "conversation_id": f"c{n % 50}", "contact_id": f"k{n % 50}", "seq": n,
            "contact_seq": n}


def measure_inserts(client: MongoClient[dict[str, Any]], name: str,
                    indexes: list[IndexModel], rounds: int) -> float:
    collection = client["bench_statements"]["m" + str(len(indexes))]
    collection.drop()
    if indexes:
        collection.create_indexes(indexes)
    started = time.perf_counter()
    for r in range(rounds):
        docs = [message_doc(r * BULK + k) for k in range(BULK)]
        with client.start_session() as session, session.start_transaction():
            collection.insert_many(docs, session=session)
    del name
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
            inserts = [(name, measure_inserts(client, name, indexes, 3 * args.rounds))
                       for name, indexes in MESSAGE_INDEXES]
            client.close()
        finally:
            stop_server(process)
    first = rows[0][2]
    print(f"update_one in bulks of {BULK} in a transaction, {args.rounds} bulks each\n")
    print("| indexes | event-log entries in bot_state | ms per updated document | ratio |")
    print("|---|---|---|---|")
    for indexes, events, ms in rows:
        print(f"| {indexes} | {events} | {ms:.2f} | {ms / first:.2f} |")
    print(f"\ninsert_many of {BULK} message-shaped documents in a transaction, "
          f"{3 * args.rounds} bulks each\n")
    print("| indexes | ms per inserted document | ratio |")
    print("|---|---|---|")
    for name, ms in inserts:
        print(f"| {name} | {ms:.3f} | {ms / inserts[0][1]:.2f} |")


if __name__ == "__main__":
    main()
