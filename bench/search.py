"""Search over 100,000 messages on the embedded store, through the agent API.

    python -m bench.search [--messages 100000] [--conversations 10000] [--queries 40]

Seeds a fresh embedded store (SecantusDB, as ``omnigate serve`` runs it) with contacts,
conversations and a year of messages whose words follow a Zipf law over a 5,000-word
vocabulary (the most common word is in 80% of the messages, most in a handful), lets the
gateway's
indexer backfill them (timed: the first start on a database from before search), then
asks ``GET /api/v1/search/conversations`` over HTTP, ``--queries`` times per kind:

- ``rare``, ``common``: one word (from the 2,000 rarest, from the 20 most common)
- ``two``: two words that are in one message together
- ``prefix``: three letters of a word, as typed
- ``filter``: no words, a channel and an owner state
- ``word+filter``: a common word and a channel

and prints p50/p95/max per kind, and the store commands per query (pymongo command
monitoring: a count does not wobble with the machine's load).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pymongo import monitoring

from bench.store import start_server, stop_server
from gateway.app import create_app
from gateway.keys import AGENTS, INDEXER
from gateway.model import AgentRole, OwnerState, utcnow
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.search import SearchTerms

VOCABULARY = 5000
CHANNELS = ("webchat", "telegram", "slack", "email")


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def words(rng: random.Random) -> list[str]:
    # Zipf-ish: rank r is chosen with weight 1/r
    weights = [1 / r for r in range(1, VOCABULARY + 1)]
    return rng.choices([f"word{r}" for r in range(1, VOCABULARY + 1)], weights, k=1_000_000)


async def seed(store: Store, messages: int, conversations: int, rng: random.Random) -> list[str]:
    """Contacts, conversations, messages; returns the texts (for picking queries)."""
    now = utcnow()
    pool = words(rng)
    contacts = [{"_id": f"c{i}", "name": f"Customer {i}", "profile": {}, "seq": 0,
                 "created_at": now} for i in range(conversations)]
    await store.contacts.insert_many(contacts)
    # history: the bot's or resolved (queued ones would keep the assigner and the SLA
    # clock busy in the background, which is not what is measured here)
    owners = [OwnerState.BOT.value, OwnerState.RESOLVED.value]
    await store.conversations.insert_many([
        {"_id": f"v{i}", "channel": CHANNELS[i % 4], "thread_key": f"t{i}",
         "contact_id": f"c{i}", "owner": owners[i % 2], "assignee_id": None, "handoff": None,
         "seq": messages // conversations, "created_at": now - timedelta(minutes=i),
         "updated_at": now, "last_activity_at": now, "routes": {}, "reply_channel": None}
        for i in range(conversations)])
    texts: list[str] = []
    batch: list[dict[str, Any]] = []
    at = 0
    for i in range(messages):
        conversation = i % conversations
        length = rng.randint(5, 30)
        text = " ".join(pool[at:at + length])
        at = (at + length) % (len(pool) - 40)
        texts.append(text)
        # a year of history (older than the pipeline's first sweep looks back: processed)
        created = now - timedelta(days=2) - timedelta(days=365) * (messages - i) / messages
        batch.append({
            "_id": f"m{i}", "type": "message", "direction": "in" if i % 2 else "out",
            "channel": CHANNELS[conversation % 4], "conversation_id": f"v{conversation}",
            "contact_id": f"c{conversation}", "seq": i // conversations + 1,
            "contact_seq": i // conversations + 1,
            "conversation_ref": {"channel": CHANNELS[conversation % 4],
                                 "thread_key": f"t{conversation}"},
            "sender": {"role": "customer" if i % 2 else "agent", "id": "x", "name": None},
            "recipient": None, "external_id": f"e{i}", "timestamp": created,
            "created_at": created, "text": text, "value": None, "deep_link": None,
            "name": None, "attachments": [], "buttons": [], "reply_to_id": None,
            "channel_data": {}, "edits": [], "delivery": None, "dedupe_key": None,
            "idem_key": None, "private": False})
        if len(batch) == 1000:
            await store.messages.insert_many(batch)
            batch = []
    if batch:
        await store.messages.insert_many(batch)
    return texts


def queries(texts: list[str], n: int, rng: random.Random) -> dict[str, list[dict[str, str]]]:
    counts: dict[str, int] = {}
    for text in texts:
        for w in set(text.split()):
            counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts, key=lambda w: -counts[w])
    rare = ranked[-2000:]
    common = ranked[:20]
    pairs = []
    for text in rng.sample(texts, n):
        first, *rest = text.split()
        pairs.append(f"{first} {rest[-1] if rest else first}")
    return {
        "rare": [{"q": w} for w in rng.sample(rare, n)],
        "common": [{"q": rng.choice(common)} for _ in range(n)],
        "two": [{"q": p} for p in pairs],
        "prefix": [{"q": rng.choice(ranked[:500])[:6]} for _ in range(n)],
        "filter": [{"channel": rng.choice(CHANNELS), "owner": "resolved"} for _ in range(n)],
        "word+filter": [{"q": rng.choice(common), "channel": rng.choice(CHANNELS)}
                        for _ in range(n)],
    }


async def run(messages: int, conversations: int, n: int, only: list[str]) -> None:
    rng = random.Random(7)
    commands = Commands()
    monitoring.register(commands)
    with tempfile.TemporaryDirectory() as tmp:
        server, uri = start_server(Path(tmp) / "db", False)
        try:
            settings = Settings(mongodb_uri=uri, mongodb_db="bench_search",
                                data_dir=Path(tmp) / "data", log_level="WARNING")
            seeder = Store.connect(uri, "bench_search")
            started = time.perf_counter()
            texts = await seed(seeder, messages, conversations, rng)
            print(f"seeded {messages} messages in {conversations} conversations "
                  f"in {time.perf_counter() - started:.0f} s")
            app = create_app(settings)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            try:
                started = time.perf_counter()
                terms = SearchTerms(seeder)
                while await terms.coll.estimated_document_count() < messages:  # noqa: ASYNC110
                    await asyncio.sleep(1)  # (another process's work: polled)
                took = time.perf_counter() - started
                print(f"indexer backfill: {messages} messages in {took:.0f} s "
                      f"({messages / took:.0f}/s); indexer counted {app[INDEXER].indexed}")
                _, token = await app[AGENTS].add("Bench", role=AgentRole.ADMIN)
                auth = {"Authorization": f"Bearer {token}"}
                url = f"http://127.0.0.1:{port}/api/v1/search/conversations"
                every: list[float] = []
                async with aiohttp.ClientSession() as http:
                    for kind, params_list in queries(texts, n, rng).items():
                        if only and kind not in only:
                            continue
                        times, hits, cmds = [], [], []
                        for params in params_list:
                            before = commands.count
                            t0 = time.perf_counter()
                            async with http.get(url, params=params, headers=auth) as r:
                                body = await r.json()
                                assert r.status == 200, body
                            times.append((time.perf_counter() - t0) * 1000)
                            cmds.append(commands.count - before)
                            hits.append(len(body["items"]))
                        every += times
                        times.sort()
                        p95 = times[int(0.95 * (len(times) - 1))]
                        print(f"{kind:12} p50 {statistics.median(times):6.1f} ms  "
                              f"p95 {p95:6.1f} ms  max {times[-1]:6.1f} ms  "
                              f"hits {statistics.mean(hits):4.1f}  "
                              f"commands {statistics.mean(cmds):5.1f}")
                every.sort()
                print(f"{'all':12} p50 {statistics.median(every):6.1f} ms  "
                      f"p95 {every[int(0.95 * (len(every) - 1))]:6.1f} ms  "
                      f"max {every[-1]:6.1f} ms  ({len(every)} queries)")
            finally:
                await runner.cleanup()
                await seeder.client.close()
        finally:
            stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--only", nargs="*", default=[], help="these kinds of query only")
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.conversations, args.queries, args.only))


if __name__ == "__main__":
    main()
