"""The search indexer: every stored message's words into ``search_terms``
(gateway/store/search.py), in one gateway process of many.

It runs under the ``search-indexer`` lease (gateway/leases.py): one process indexes, any
other takes over within the lease's time if it stops. It learns of new items from the
store's change feed (every process sees every item, gateway/feed.py) and writes them in
batches (one bulk write per half second at most); on start, on taking the lease over,
and when the feed had to start afresh, it catches up by reading what was stored since its
mark (``search_state``), a minute early, with the inserts of what is known already
refused by ``_id``. So search lags the messages by about a second and misses nothing.

A database from before search is indexed on the first start, in the background (one
pass over the messages; ``backfilled`` in the mark doc says it was done).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from pymongo.errors import PyMongoError

from gateway.aio import cancel_and_wait, raise_if_cancelled
from gateway.feed import Change, ChangeKind, Feed
from gateway.leases import Leases, Singleton
from gateway.model import utcnow
from gateway.store import Store
from gateway.store.mongo import Doc
from gateway.store.search import SearchTerms

log = logging.getLogger(__name__)

STATE = "search_state"
LEASE = "search-indexer"
FLUSH_EVERY = 0.5  # seconds
OVERLAP = timedelta(minutes=1)  # a catch-up reads this much before the mark
MARK_EVERY = 10.0  # seconds between writes of the mark
BATCH = 1000
MAX_BUFFER = 20_000  # items waiting; more: dropped and caught up from the mark


class Indexer:
    def __init__(self, store: Store, feed: Feed, leases: Leases | None) -> None:
        self.store = store
        self.terms = SearchTerms(store)
        self.feed = feed
        self.leases = leases
        self._buffer: list[Doc] = []
        self._wake = asyncio.Event()
        self._behind = True  # catch up before anything else
        self._holding = False
        self._unsubscribe: object | None = None
        self._lease: Singleton | None = None
        self._task: asyncio.Task[None] | None = None
        self.indexed = 0  # since start, in this process (tests, logs)

    def start(self) -> None:
        self._unsubscribe = self.feed.subscribe(self._on_change)
        if self.leases is None:
            self._task = asyncio.create_task(self._work(), name="search-indexer")
        else:
            self._lease = Singleton(self.leases, LEASE, self._work)
            self._lease.start()

    async def stop(self) -> None:
        if callable(self._unsubscribe):
            self._unsubscribe()
        if self._lease is not None:
            await self._lease.stop()
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._holding:  # stopped while holding: what is buffered is written now
            with contextlib.suppress(PyMongoError):
                await self._flush()

    async def _on_change(self, change: Change) -> None:
        if not self._holding:
            return
        if change.kind is ChangeKind.RESYNC:
            self._behind = True
        elif change.kind is ChangeKind.ITEM and change.doc is not None:
            if len(self._buffer) >= MAX_BUFFER:
                self._buffer.clear()
                self._behind = True  # too far behind: read it from the store instead
            else:
                self._buffer.append(change.doc)
        else:
            return
        self._wake.set()

    async def _work(self) -> None:
        self._holding = True
        self._behind = True
        try:
            await self.terms.ensure_indexes()
            saved = asyncio.get_running_loop().time()
            while True:
                if self._behind:
                    self._behind = False
                    await self.catch_up()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), MARK_EVERY)
                self._wake.clear()
                await asyncio.sleep(FLUSH_EVERY)  # gather a batch
                await self._flush()
                now = asyncio.get_running_loop().time()
                if now - saved >= MARK_EVERY:
                    await self._save_mark()
                    saved = now
        except Exception as exc:
            raise_if_cancelled()
            log.warning("search: indexer stopped: %s", exc)
            raise
        finally:
            self._holding = False

    async def _flush(self) -> None:
        batch, self._buffer = self._buffer, []
        for start in range(0, len(batch), BATCH):
            self.indexed += await self.terms.add(batch[start:start + BATCH])

    async def _mark(self) -> Doc | None:
        return await self.store.db[STATE].find_one({"_id": "mark"})

    async def _save_mark(self) -> None:
        # what the feed handed over until now is written: a restart reads from here
        await self.store.db[STATE].update_one(
            {"_id": "mark"}, {"$set": {"at": utcnow(), "backfilled": True}}, upsert=True)

    async def catch_up(self) -> int:
        """Index what was stored since the mark (everything, the first time)."""
        mark = await self._mark()
        since = None if mark is None else mark["at"] - OVERLAP
        started = utcnow()
        added = 0
        for direction in ("in", "out"):
            added += await self._read_since(direction, since)
        await self.store.db[STATE].update_one(
            {"_id": "mark"}, {"$set": {"at": started, "backfilled": True}}, upsert=True)
        if added:
            log.info("search: caught up, %d messages indexed", added)
        self.indexed += added
        return added

    async def _read_since(self, direction: str, since: datetime | None) -> int:
        """Every item of ``direction`` stored since ``since`` (all of them without it), in
        one pass of one cursor (the messages' ``recent`` index: direction, created_at;
        unsorted: paging a sorted query is a scan per page on the embedded store)."""
        query: Doc = {"direction": direction}
        if since is not None:
            query["created_at"] = {"$gte": since}
        added = 0
        batch: list[Doc] = []
        async for doc in self.store.messages.find(query, batch_size=BATCH):
            batch.append(doc)
            if len(batch) >= BATCH:
                added += await self.terms.add(batch)
                batch = []
        return added + await self.terms.add(batch)
