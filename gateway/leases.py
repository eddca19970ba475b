"""Named leases in the store: work that must run in exactly one gateway process.

Several gateway processes (on one machine or several) share one store; some inbound work
must run in only one of them: Telegram's ``getUpdates`` long poll (Telegram answers a
second poller with 409 and the two would fight over the offset), an IMAP mailbox (two
readers would fetch every mail twice). Such work runs under a named lease.

The lease is one document per name in the ``leases`` collection::

    {_id: name, owner: "host:pid:random" | None, until: datetime, fencing: int,
     acquired_at: datetime}

- **acquire**: one conditional ``update_one`` with upsert, ``{_id: name, until < now}``
  (a released lease has ``until`` in 1970): it takes a free or expired lease, and creates
  a new name. When the lease is held (by anyone) the upsert's insert collides on ``_id``
  (``DuplicateKeyError``), as does the loser of two processes creating a new name at the
  same moment; then ``{_id, owner: me}`` tells whether it is already this process's.
  A holder that was a process on this machine which no longer runs (SIGKILL) is taken
  over at once, as the conversation leases do (gateway/store/turns.py); anyone else's
  lease only when it has expired.
- ``fencing`` is incremented on every acquisition that is not a renewal: a caller that
  writes elsewhere can carry it, and a late write by a previous holder is recognised by
  its lower number.
- **renew**: ``update_one({_id, owner: me}, until = now + ttl)``; 0 matched: it was lost.
- **release**: ``owner`` None, ``until`` 1970; the next process's retry takes it.

Plain conditions only, no ``$or`` and no ``findAndModify``: SecantusDB scans the whole
collection for those (docs/store-notes.md); everything here is a lookup by ``_id``, and
the same statements are atomic on a real replica set.

``Singleton`` runs the work: it tries to acquire every ``retry`` seconds, runs ``work()``
while it holds the lease, renews every ``ttl/3``, and cancels the work as soon as a
renewal says the lease is gone, or when the store has not confirmed a renewal for nearly
``ttl`` (so the work has stopped before another process may take the lease over). With
``ttl`` 20 s and ``retry`` 5 s another process takes over within 25 s of a holder's death
(at once on the same machine), and within ``retry`` of a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo.errors import DuplicateKeyError, PyMongoError

from gateway.aio import raise_if_cancelled
from gateway.model import utcnow
from gateway.store import Store
from gateway.store.mongo import FREE, Doc
from gateway.store.turns import dead_here, instance_name

log = logging.getLogger(__name__)

TTL = 20.0  # seconds a lease lasts without renewal
RETRY = 5.0  # seconds between attempts to acquire a lease another process holds
STOP_GRACE = 5.0  # seconds a cancelled work() gets to finish


@dataclass(frozen=True, slots=True)
class Held:
    """A lease this process holds (until ``until``, by its clock)."""

    name: str
    owner: str
    until: datetime
    fencing: int
    renewed: bool  # it was this process's already


@dataclass(frozen=True, slots=True)
class Busy:
    """A lease another process holds."""

    name: str
    owner: str | None
    until: datetime | None


class Leases:
    """The ``leases`` collection, for one process identity (``owner``)."""

    def __init__(self, store: Store, owner: str | None = None) -> None:
        self.store = store
        self.owner = owner or instance_name()
        self.collection = store.db["leases"]

    def _take(self, until: datetime, now: datetime) -> Doc:
        return {"$set": {"owner": self.owner, "until": until, "acquired_at": now},
                "$inc": {"fencing": 1}}

    async def acquire(self, name: str, ttl: float = TTL) -> Held | Busy:
        """Take the lease ``name`` if it is free, expired, new, or this process's already
        (then it is renewed). Raises ``PyMongoError`` when the store cannot tell."""
        now = utcnow()
        until = now + timedelta(seconds=ttl)
        try:
            taken = await self.collection.update_one(
                {"_id": name, "until": {"$lt": now}}, self._take(until, now), upsert=True)
        except DuplicateKeyError:
            pass  # held (by whom, next), or another process created the name just now
        else:
            if taken.matched_count or taken.upserted_id is not None:
                return await self._held(name, until, renewed=False)
        if await self.renew(name, ttl, until=until):
            return await self._held(name, until, renewed=True)
        doc = await self.collection.find_one({"_id": name})
        if doc is None:  # released and removed meanwhile (not done here): try again later
            return Busy(name, None, None)
        owner, held_until = doc.get("owner"), doc.get("until")
        if isinstance(owner, str) and dead_here(owner):
            dead = await self.collection.update_one(
                {"_id": name, "owner": owner, "until": held_until}, self._take(until, now))
            if dead.matched_count:
                log.info("lease %s: its holder %s no longer runs on this machine", name, owner)
                return await self._held(name, until, renewed=False)
        return Busy(name, owner if isinstance(owner, str) else None,
                    held_until if isinstance(held_until, datetime) else None)

    async def _held(self, name: str, until: datetime, *, renewed: bool) -> Held:
        doc = await self.collection.find_one({"_id": name, "owner": self.owner}, {"fencing": 1})
        fencing = int(doc.get("fencing") or 0) if doc is not None else 0
        return Held(name, self.owner, until, fencing, renewed)

    async def renew(self, name: str, ttl: float = TTL, *, until: datetime | None = None) -> bool:
        """Extend this process's lease; False when it is not (any more) this process's."""
        until = until or utcnow() + timedelta(seconds=ttl)
        result = await self.collection.update_one(
            {"_id": name, "owner": self.owner}, {"$set": {"until": until}})
        return bool(result.matched_count)

    async def release(self, name: str) -> bool:
        """Give the lease up at once (if it is this process's)."""
        result = await self.collection.update_one(
            {"_id": name, "owner": self.owner}, {"$set": {"owner": None, "until": FREE}})
        return bool(result.matched_count)

    async def holder(self, name: str) -> str | None:
        """Who holds ``name`` now (None: nobody, or expired)."""
        doc = await self.collection.find_one({"_id": name})
        if doc is None or not isinstance(doc.get("until"), datetime) or doc["until"] < utcnow():
            return None
        owner = doc.get("owner")
        return owner if isinstance(owner, str) else None


Work = Callable[[], Awaitable[None]]


def _retrieve(task: asyncio.Task[bool]) -> None:
    """A renewal given up on may still fail later: not an unretrieved exception."""
    if not task.cancelled():
        task.exception()


class Singleton:
    """Run ``work()`` in the one process that holds the lease ``name`` (``start``/``stop``).

    ``work()`` should run until cancelled; if it returns or raises, the lease is
    released and taken again (by whichever process is first) after ``retry`` seconds.
    """

    def __init__(self, leases: Leases, name: str, work: Work, *, ttl: float = TTL,
                 retry: float = RETRY) -> None:
        if ttl <= 0 or retry <= 0:
            raise ValueError("ttl and retry must be positive")
        self.leases = leases
        self.name = name
        self.work = work
        self.ttl = ttl
        self.retry = retry
        self.holding = asyncio.Event()  # set while work() runs here
        self.fencing = 0  # of the current (or last) holding
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lease:{self.name}")

    def done(self) -> bool:
        """Not running (never started, or stopped), as ``asyncio.Task.done``."""
        return self._task is None or self._task.done()

    async def stop(self) -> None:
        """Stop the work (if it runs here) and release the lease at once."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_seen: str | None = None  # the other holder, as last seen (for the log)
        while True:
            asked = loop.time()
            try:
                got = await self.leases.acquire(self.name, self.ttl)
            except PyMongoError as exc:
                raise_if_cancelled()
                log.warning("lease %s: store unreachable (%s); retrying in %g s",
                            self.name, exc, self.retry)
                got = None
            if isinstance(got, Held):
                if last_seen is not None and last_seen != got.owner:
                    log.info("lease %s: taken over from %s by %s (fencing %d)",
                             self.name, last_seen, got.owner, got.fencing)
                else:
                    log.info("lease %s: acquired by %s (fencing %d)", self.name, got.owner,
                             got.fencing)
                last_seen = None
                if await self._hold(got, asked):
                    continue  # lost: try again at once (Busy then says who has it)
            elif isinstance(got, Busy) and got.owner != last_seen:
                log.info("lease %s: held by %s; retrying every %g s", self.name, got.owner,
                         self.retry)
                last_seen = got.owner
            await asyncio.sleep(self.retry)

    async def _hold(self, held: Held, asked: float) -> bool:
        """Run the work while the lease is renewed; True when the lease was lost, False
        when the work ended by itself (the lease is then released)."""
        loop = asyncio.get_running_loop()
        # The lease's end on this process's monotonic clock, measured from before the
        # write that set it was sent; the work is stopped ``margin`` earlier, so it is
        # over before any other process may take the lease over.
        margin = min(2.0, self.ttl / 10)
        deadline = asked + self.ttl - margin
        next_renewal = asked + self.ttl / 3
        self.fencing = held.fencing
        work = asyncio.create_task(self._work(), name=f"lease-work:{self.name}")
        self.holding.set()
        lost: str | None = None
        try:
            while True:
                pause = max(0.0, min(next_renewal, deadline) - loop.time())
                done, _ = await asyncio.wait({work}, timeout=pause)
                if done:
                    return False  # the work ended by itself (logged in _work)
                if loop.time() >= deadline:
                    lost = "the store confirmed no renewal in time"
                    break
                sent = loop.time()
                renewal = asyncio.create_task(self.leases.renew(self.name, self.ttl))
                renewal.add_done_callback(_retrieve)
                await asyncio.wait({renewal}, timeout=max(0.0, deadline - sent))
                if not renewal.done():
                    renewal.cancel()
                    lost = "the store confirmed no renewal in time"
                    break
                failure = None if renewal.cancelled() else renewal.exception()
                if renewal.cancelled() or failure is not None:
                    log.warning("lease %s: renewal failed (%s); retrying", self.name,
                                failure or "cancelled")
                    next_renewal = loop.time() + min(1.0, self.ttl / 10)
                elif renewal.result():
                    deadline = sent + self.ttl - margin
                    next_renewal = sent + self.ttl / 3
                else:
                    lost = "another process holds it"
                    break
            log.warning("lease %s: lost by %s (%s); the work is stopped", self.name,
                        self.leases.owner, lost)
            return True
        finally:
            self.holding.clear()
            await self._cancel(work)
            if lost is None:  # stopped, or the work ended: give it up for the next process
                with contextlib.suppress(PyMongoError, TimeoutError):
                    if await asyncio.wait_for(self.leases.release(self.name), 5.0):
                        log.info("lease %s: released by %s", self.name, self.leases.owner)

    async def _work(self) -> None:
        try:
            await self.work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("lease %s: the work failed; the lease is released", self.name)
        else:
            log.warning("lease %s: the work ended; the lease is released", self.name)

    async def _cancel(self, work: asyncio.Task[None]) -> None:
        if work.done():
            return
        work.cancel()
        done, _ = await asyncio.wait({work}, timeout=STOP_GRACE)
        while not done:  # a driver that swallowed the cancellation: cancel again
            log.error("lease %s: the work did not stop within %g s of being cancelled",
                      self.name, STOP_GRACE)
            work.cancel()
            done, _ = await asyncio.wait({work}, timeout=STOP_GRACE)
