"""Access data: console sessions, failed-login counters, and the agents' login index.

Kept in the store (not in memory) so that every gateway process sees the same sessions and
the same login lockouts. Only a session id's SHA-256 is stored, never the id itself. Every
decision is one conditional ``update_one`` (``matched_count`` says who won); no
``findAndModify`` and no ``$or`` (both are collection scans on SecantusDB, see
docs/store-notes.md).

- ``sessions``: ``_id`` = sha256(session id), ``agent_id``, ``csrf``, ``created_at``,
  ``expires_at`` (absolute), ``idle_until`` (slides while the session is used; never past
  ``expires_at``; a TTL index removes the document once it has passed).
- ``login_attempts``: ``_id`` = ``"pair:<address>|<email>"``, ``"ip:<address>"`` or
  ``"account:<email>"`` (gateway/desk/auth.py), ``failures`` in the window that began at
  ``window_start``, ``last_failure_at``, ``locked_until``, ``lockouts`` (how many
  times it was locked: the next lock is longer), ``forget_at`` (TTL: the record goes away
  after a quiet day).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from gateway.store.mongo import Store

Doc = dict[str, Any]


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def ensure_indexes(store: Store) -> None:
    """The access collections' indexes, and the agents' unique login email."""
    db = store.db
    await db["sessions"].create_indexes(
        [
            IndexModel([("agent_id", ASCENDING)], name="session_agent"),
            IndexModel([("idle_until", ASCENDING)], expireAfterSeconds=0, name="session_ttl"),
        ]
    )
    await db["login_attempts"].create_indexes(
        [IndexModel([("forget_at", ASCENDING)], expireAfterSeconds=0, name="attempts_ttl")]
    )
    # Sparse: agents without a login email (API-token only) are not in the index, so any
    # number of them can exist while an email belongs to at most one agent.
    await store.agents.create_indexes(
        [IndexModel([("email_key", ASCENDING)], unique=True, sparse=True, name="agent_email")]
    )


@dataclass(frozen=True)
class SessionRecord:
    id_hash: str
    agent_id: str
    csrf: str
    created_at: datetime
    expires_at: datetime
    idle_until: datetime


def _session(doc: Doc) -> SessionRecord:
    return SessionRecord(
        id_hash=doc["_id"],
        agent_id=doc["agent_id"],
        csrf=doc["csrf"],
        created_at=doc["created_at"],
        expires_at=doc["expires_at"],
        idle_until=doc["idle_until"],
    )


class SessionStore:
    def __init__(self, store: Store) -> None:
        self.sessions: AsyncCollection[Doc] = store.db["sessions"]

    async def create(self, record: SessionRecord) -> None:
        await self.sessions.insert_one(
            {
                "_id": record.id_hash,
                "agent_id": record.agent_id,
                "csrf": record.csrf,
                "created_at": record.created_at,
                "expires_at": record.expires_at,
                "idle_until": record.idle_until,
            }
        )

    async def get(self, id_hash: str) -> SessionRecord | None:
        doc = await self.sessions.find_one({"_id": id_hash})
        return None if doc is None else _session(doc)

    async def extend(self, record: SessionRecord, idle_until: datetime) -> bool:
        """Slide the idle expiry; conditional on nobody having moved it meanwhile."""
        result = await self.sessions.update_one(
            {"_id": record.id_hash, "idle_until": record.idle_until},
            {"$set": {"idle_until": idle_until}},
        )
        return result.matched_count == 1

    async def delete(self, id_hash: str) -> bool:
        return (await self.sessions.delete_one({"_id": id_hash})).deleted_count == 1

    async def delete_agent(self, agent_id: str) -> int:
        return (await self.sessions.delete_many({"agent_id": agent_id})).deleted_count

    async def count_agent(self, agent_id: str) -> int:
        return await self.sessions.count_documents({"agent_id": agent_id})


class AttemptStore:
    """Failed-login counters, one document per key, shared by every process."""

    def __init__(self, store: Store) -> None:
        self.attempts: AsyncCollection[Doc] = store.db["login_attempts"]

    async def get(self, key: str) -> Doc | None:
        return await self.attempts.find_one({"_id": key})

    async def count_failure(
        self, key: str, now: datetime, window: timedelta, forget: timedelta
    ) -> Doc:
        """Count one failure for ``key``; returns the document after the change.

        In the current window: ``$inc``. Otherwise a new window starts (conditional on the
        window the caller saw, so two processes cannot both restart it); a record quiet for
        ``forget`` also forgets its lockouts.
        """
        for _ in range(8):
            counted = await self.attempts.update_one(
                {"_id": key, "window_start": {"$gt": now - window}},
                {"$inc": {"failures": 1}, "$set": {"last_failure_at": now,
                                                   "forget_at": now + forget}},
            )
            if counted.matched_count == 0:
                doc = await self.attempts.find_one({"_id": key})
                fresh = {"failures": 1, "window_start": now, "last_failure_at": now,
                         "forget_at": now + forget}
                if doc is None:
                    try:
                        await self.attempts.insert_one(
                            {"_id": key, "lockouts": 0, "locked_until": None, **fresh}
                        )
                    except DuplicateKeyError:
                        continue  # another process created it: count again
                else:
                    if doc["last_failure_at"] <= now - forget:
                        fresh["lockouts"] = 0
                    restarted = await self.attempts.update_one(
                        {"_id": key, "window_start": doc["window_start"]}, {"$set": fresh}
                    )
                    if restarted.matched_count == 0:
                        continue  # someone else restarted or counted: count again
            doc = await self.attempts.find_one({"_id": key})
            if doc is not None:
                return doc
        raise RuntimeError(f"could not count a failed login for {key}")  # pragma: no cover

    async def lock(self, doc: Doc, now: datetime, until: datetime) -> bool:
        """Lock ``key`` until ``until`` and start a new window; one winner per window."""
        result = await self.attempts.update_one(
            {"_id": doc["_id"], "window_start": doc["window_start"],
             "failures": doc["failures"]},
            {"$set": {"locked_until": until, "failures": 0, "window_start": now},
             "$inc": {"lockouts": 1}},
        )
        return result.matched_count == 1

    async def clear(self, key: str) -> None:
        await self.attempts.delete_one({"_id": key})
