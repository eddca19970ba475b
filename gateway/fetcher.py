"""Fetching the files that channels hand out by reference (Telegram, Slack).

An inbound message that announces a file by reference is stored with the file listed as
``pending`` and, in the same unit, a job in ``file_fetches`` (gateway/files.py). Any
gateway process runs the jobs that are due: it claims one (a conditional update of its
``lease_until``, so two processes never fetch the same file at once), asks the channel's
connector to download it (``Connector.fetch``: the token never leaves the gateway),
keeps it in the attachment store and marks the item's attachment ``stored``. A failure
is retried with exponential backoff; a permanent one, or ``MAX_ATTEMPTS`` failures,
marks the attachment ``failed`` with the reason, which agents see on the item (the
message itself was stored before any of this). A file that turns out to be over the
size limit is marked ``too_large`` and the customer is told, as at ingest.

When a job ends, the item's ``files_at`` is set with its attachment, so the change feed
tells the consoles to show the item again (gateway/feed.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta

from pymongo import ASCENDING, IndexModel
from pymongo.errors import PyMongoError

from connectors.base import Connector, FetchError
from gateway.aio import Background, raise_if_cancelled
from gateway.files import FETCHES, Files, FileTooLarge
from gateway.model import Attachment, AttachmentState, Direction, Party, utcnow
from gateway.store.files import ORPHAN_AFTER
from gateway.store.mongo import Doc, Store
from gateway.store.turns import instance_name

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=120)  # one fetch may take this long before another process retries
MAX_ATTEMPTS = 6
FIRST_BACKOFF = 2.0  # seconds, doubling per attempt ...
MAX_BACKOFF = 300.0  # ... up to this
BATCH = 8  # jobs claimed per pass
ORPHANS_EVERY = 600.0  # seconds between sweeps for stored bytes without a record
ORPHAN_STATE = ("files", "orphan_sweep")  # channel_state: where the last sweep ended

TooLarge = Callable[[str, str, list[str]], Awaitable[None]]


async def ensure_indexes(store: Store) -> None:
    await store.db[FETCHES].create_indexes([IndexModel([("due_at", ASCENDING)], name="due")])


class Fetcher:
    """Runs the due fetch jobs of every channel, in the background of this process."""

    def __init__(self, store: Store, files: Files, connectors: Mapping[str, Connector], *,
                 sweep_seconds: float = 5.0) -> None:
        self.store = store
        self.jobs = store.db[FETCHES]
        self.files = files
        self.connectors = connectors
        self.sweep_seconds = sweep_seconds
        self.instance = instance_name()
        # (conversation id, item id, names): tell the customer a file was too large
        self.on_too_large: TooLarge | None = None
        self._background = Background("fetcher")
        self._orphans_at = time.monotonic() + 60.0  # the first sweep a minute after start

    def start(self) -> None:
        self._background.every(self.sweep_seconds, self._sweep)

    def wake(self) -> None:
        """A job was written (a message with a file came in here): run it now."""
        self._background.spawn(self._sweep(False), "fetcher:now")

    async def stop(self) -> None:
        await self._background.stop(2.0)

    async def _sweep(self, first: bool) -> None:
        del first
        try:
            await self.run_due()
            if time.monotonic() >= self._orphans_at:
                self._orphans_at = time.monotonic() + ORPHANS_EVERY
                await self.sweep_orphans()
        except PyMongoError as exc:
            raise_if_cancelled()
            log.warning("fetcher: store error (retried): %s", exc)

    async def sweep_orphans(self) -> int:
        """Delete stored bytes that no attachment names (a process died between keeping
        the bytes and writing the record), looking only at what was uploaded since the
        last sweep (any process's: the window's end is kept in the store)."""
        state = await self.store.get_state(*ORPHAN_STATE)
        since = (state or {}).get("until")
        end = utcnow() - ORPHAN_AFTER
        deleted = await self.files.store.sweep_orphans(
            ORPHAN_AFTER, since if isinstance(since, datetime) else None)
        await self.store.put_state(*ORPHAN_STATE, {"until": end})
        if deleted:
            log.info("fetcher: deleted %d stored file(s) that no attachment named", deleted)
        return deleted

    async def run_due(self) -> int:
        """Claim and run the jobs that are due; how many ran."""
        now = utcnow()
        due = await self.jobs.find(
            {"due_at": {"$lte": now}, "lease_until": {"$lte": now}},
            {"_id": 1}).limit(BATCH).to_list()
        ran = 0
        for doc in due:
            job = await self._claim(str(doc["_id"]))
            if job is not None:
                await self._run(job)
                ran += 1
        return ran

    async def _claim(self, job_id: str) -> Doc | None:
        now = utcnow()
        claimed = await self.jobs.update_one(
            {"_id": job_id, "lease_until": {"$lte": now}},
            {"$set": {"lease_until": now + LEASE, "owner": self.instance}})
        if not claimed.modified_count:
            return None  # another process took it
        return await self.jobs.find_one({"_id": job_id})

    async def _run(self, job: Doc) -> None:
        connector = self.connectors.get(str(job.get("channel")))
        try:
            if connector is None:
                raise FetchError(f"channel {job.get('channel')} is not running here")
            data = await connector.fetch(job.get("ref") or {})
            attachment = await self.files.keep(
                str(job["_id"]), data, name=job.get("name"), sender=Party.model_validate(
                    job.get("sender") or {"role": "customer"}),
                conversation_id=str(job["conversation_id"]),
                contact_id=str(job["contact_id"]), channel=str(job["channel"]),
                direction=Direction.INBOUND, item=str(job["item_id"]))
        except FileTooLarge as exc:
            await self._finish(job, _failed(job, AttachmentState.TOO_LARGE, str(exc)))
            if self.on_too_large is not None:
                await self.on_too_large(str(job["conversation_id"]), str(job["item_id"]),
                                        [str(job.get("name") or "a file")])
        except FetchError as exc:
            await self._failed(job, str(exc), permanent=exc.permanent)
        except PyMongoError:
            raise  # the store: the lease runs out and any process tries again
        except Exception as exc:  # a connector bug must not stop the other jobs
            log.exception("fetcher: fetching %s failed", job["_id"])
            await self._failed(job, f"unexpected error: {exc!r}", permanent=False)
        else:
            await self._finish(job, attachment)

    async def _failed(self, job: Doc, reason: str, *, permanent: bool) -> None:
        attempts = int(job.get("attempts") or 0) + 1
        if permanent or attempts >= MAX_ATTEMPTS:
            log.warning("fetcher: could not fetch %s (%s) after %d attempt(s): %s",
                        job["_id"], job.get("name"), attempts, reason)
            await self._finish(job, _failed(job, AttachmentState.FAILED,
                                            f"could not fetch: {reason}"))
            return
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (attempts - 1))
        log.info("fetcher: %s: %s; trying again in %.0f s", job["_id"], reason, delay)
        now = utcnow()
        await self.jobs.update_one({"_id": job["_id"], "owner": self.instance}, {"$set": {
            "attempts": attempts, "due_at": now + timedelta(seconds=delay),
            "lease_until": now, "last_error": reason}})

    async def _finish(self, job: Doc, attachment: Attachment) -> None:
        """The item's attachment becomes ``attachment``; the job is done."""
        await self.store.messages.update_one(
            {"_id": job["item_id"], "attachments.id": job["_id"]},
            {"$set": {"attachments.$": attachment.model_dump(mode="python"),
                      "files_at": utcnow()}})
        await self.jobs.delete_one({"_id": job["_id"]})


def _failed(job: Doc, state: AttachmentState, reason: str) -> Attachment:
    """The attachment as it stays when its file is not kept: what the channel said."""
    declared = job.get("size")
    return Attachment(id=None, name=job.get("name"), state=state, error=reason[:500],
                      size=int(declared) if isinstance(declared, int) else None,
                      content_type=str(job.get("content_type") or "application/octet-stream"))

