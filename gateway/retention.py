"""Retention: conversations resolved longer ago than ``OMNIGATE_RETENTION_DAYS`` go.

Deleted, not anonymised: a conversation stripped of its messages, files and thread would
be an empty shell in the console, the API and search, of use to nobody; every reader
already copes with a conversation that is not there. What the reports need is kept:
each ended conversation's outcome (gateway/store/analytics.py) and its SLA breaches
stay, anonymised (no contact, no conversation, no CSAT comment), so volume, containment,
response times, SLA and CSAT figures of old periods do not change. (Only the "started"
count of a period, read from the conversations themselves, drops what was deleted.)
Contacts stay: they are not conversations (erase one with
``POST /api/v1/contacts/{id}/erase``).

"Resolved longer ago": owner ``resolved``, and neither the conversation (``updated_at``:
every owner change, label, activity) nor its messages (``last_activity_at``) changed
since the cut-off. A dry run (``omnigate retention --dry-run``) counts what would go and
changes nothing. When the setting is set, one gateway process (the holder of the
``retention`` lease) runs it every hour; the last run's time is kept in the store, so
restarts do not repeat it. Each real run that removed something writes an audit entry
``retention.run`` with its counts (gateway/store/audit.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aiohttp import web
from pymongo.errors import PyMongoError

from gateway.aio import raise_if_cancelled
from gateway.data_rights import audit
from gateway.keys import SETTINGS, STORE
from gateway.leases import Leases, Singleton
from gateway.model import utcnow
from gateway.store.audit import Actor
from gateway.store.mongo import Store
from gateway.store.personal import RETAINED, Remover, chunks, find_retained

log = logging.getLogger(__name__)

LEASE = "retention"
RUN_EVERY = timedelta(hours=1)
STATE = ("retention", "last_run")  # channel_state: when the last run began
BATCH = 100  # conversations removed together
SYSTEM = Actor(id=None, name="retention (OMNIGATE_RETENTION_DAYS)")


@dataclass
class Report:
    days: int
    cutoff: datetime
    dry_run: bool
    conversations: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        verb = "would be" if self.dry_run else "were"
        head = (f"retention: conversations resolved before {self.cutoff:%Y-%m-%d %H:%M} UTC "
                f"({self.days} days): {self.conversations} {verb} deleted")
        return [head, *(f"  {name}: {n}" for name, n in sorted(self.counts.items()))]


class Retention:
    def __init__(self, store: Store, days: int, *, leases: Leases | None = None,
                 every: timedelta = RUN_EVERY) -> None:
        self.store = store
        self.days = days
        self.leases = leases
        self.every = every
        self._lease: Singleton | None = None

    async def run(self, *, dry_run: bool = False, who: Actor = SYSTEM,
                  now: datetime | None = None) -> Report:
        """Delete (or, ``dry_run``, count) the conversations resolved before the
        cut-off."""
        cutoff = (now or utcnow()) - timedelta(days=self.days)
        ids = await find_retained(self.store, cutoff)
        report = Report(self.days, cutoff, dry_run, len(ids))
        if dry_run:
            report.counts = await self._would_go(ids)
            return report
        if not ids:
            return report
        remover = Remover(self.store)
        for batch in chunks(ids, BATCH):
            await remover.conversations(batch, RETAINED)
        await remover.late_writes(ids)
        report.counts = remover.counts
        await audit(self.store, "retention.run", who, None, report.counts)
        log.info("%s", "; ".join(line.strip() for line in report.lines()))
        return report

    async def _would_go(self, ids: list[str]) -> Counter[str]:
        counts: Counter[str] = Counter()
        db = self.store.db
        for batch in chunks(ids):
            query = {"conversation_id": {"$in": batch}}
            counts["conversations"] += len(batch)
            counts["messages"] += await db["messages"].count_documents(query)
            async for doc in db["attachments"].find(query, {"size": 1}):
                counts["files"] += 1
                counts["file_bytes"] += int(doc.get("size") or 0)
            counts["outcomes_anonymised"] += await db["outcomes"].count_documents(query)
            counts["sla_breaches_anonymised"] += await db["sla_breaches"].count_documents(
                query)
        return +counts

    # ------------------------------------------------------------ periodic runs

    def start(self) -> None:
        """Run every ``every`` in the process holding the ``retention`` lease."""
        if self._lease is None and self.leases is not None:
            self._lease = Singleton(self.leases, LEASE, self._work)
            self._lease.start()

    async def stop(self) -> None:
        if self._lease is not None:
            await self._lease.stop()
            self._lease = None

    async def _work(self) -> None:
        while True:
            try:
                state = await self.store.get_state(*STATE)
                last = (state or {}).get("at")
                wait = 0.0 if not isinstance(last, datetime) else (
                    last + self.every - utcnow()).total_seconds()
                if wait <= 0:
                    await self.store.put_state(*STATE, {"at": utcnow()})
                    await self.run()
                    wait = self.every.total_seconds()
            except PyMongoError as exc:
                raise_if_cancelled()
                log.warning("retention: store error (tried again in a minute): %s", exc)
                wait = 60.0
            await asyncio.sleep(max(1.0, min(wait, self.every.total_seconds())))


RETENTION = web.AppKey("retention", Retention)  # the periodic runner, when the setting is set


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """The periodic retention run (when OMNIGATE_RETENTION_DAYS is set), under a lease."""
    days = app[SETTINGS].retention_days
    if days is None:
        yield
        return
    retention = Retention(app[STORE], days, leases=Leases(app[STORE]))
    app[RETENTION] = retention
    retention.start()
    log.info("retention: conversations resolved more than %d days ago are deleted "
             "(looked for every %d minutes)", days, RUN_EVERY.total_seconds() // 60)
    try:
        yield
    finally:
        await retention.stop()
