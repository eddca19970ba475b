"""The audit log: who did what, when, from where (``audit`` collection).

One document per action: ``{at, who: {id, name} | null, action, target, ip, user_agent,
details}``. The agent API writes one for every change an agent or admin makes through it
(gateway/desk/audit.py: sign-ins, failed sign-ins too, claims, transfers, resolves,
hand-backs, merges, labels, agents' roles and capacity, canned responses, ...); erasing a
contact writes ``contact.erase`` with counts and no content. Entries hold no message text
and no password: they stay when a contact is erased. Kept for ever (an admin's export is
the API); ``at`` and ``target`` are indexed for the log page and per-object history.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import DESCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from gateway.model import utcnow
from gateway.store.mongo import Doc, Store, new_id

COLLECTION = "audit"


class Actor(BaseModel):
    id: str | None = None
    name: str | None = None


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. an erase's counts

    id: str
    at: datetime
    who: Actor | None = Field(None, description="the agent (null: nobody signed in)")
    action: str = Field(description="what was done, e.g. claim, resolve, sign_in, "
                        "sign_in_failed, update_agent, contact.erase")
    target: str | None = Field(None, description="the object's id (conversation, agent, "
                               "contact, label, ...), or the email of a failed sign-in")
    ip: str | None = Field(None, description="the client's address")
    user_agent: str | None = None
    details: dict[str, Any] = Field(default_factory=dict,
                                    description="the request's fields (no secrets)")


def _entry(doc: Doc) -> AuditEntry:
    return AuditEntry.model_validate({**doc, "id": str(doc["_id"])})


class AuditLog:
    def __init__(self, store: Store) -> None:
        self.coll: AsyncCollection[Doc] = store.db[COLLECTION]

    async def ensure_indexes(self) -> None:
        await self.coll.create_indexes([
            IndexModel([("at", DESCENDING)], name="audit_at"),
            IndexModel([("target", DESCENDING), ("at", DESCENDING)], name="audit_target"),
        ])

    async def record(self, action: str, *, who: Actor | None = None,
                     target: str | None = None, ip: str | None = None,
                     user_agent: str | None = None,
                     details: dict[str, Any] | None = None) -> None:
        await self.coll.insert_one({
            "_id": new_id(), "at": utcnow(), "action": action,
            "who": who.model_dump() if who is not None else None, "target": target,
            "ip": ip, "user_agent": (user_agent or "")[:300] or None,
            "details": details or {}})

    async def entries(self, *, action: str | None = None, target: str | None = None,
                      who: str | None = None, since: datetime | None = None,
                      before: datetime | None = None, cursor: str | None = None,
                      limit: int = 50) -> list[AuditEntry]:
        """Newest first (by id: a time-ordered ObjectId, unique, so pages neither skip
        nor repeat entries of one millisecond); ``cursor``: the last id of the page
        before."""
        query: Doc = {}
        if cursor:
            query["_id"] = {"$lt": cursor}
        if action:
            query["action"] = action
        if target:
            query["target"] = target
        if who:
            query["who.id"] = who
        if since is not None or before is not None:
            query["at"] = {**({"$gte": since} if since else {}),
                           **({"$lt": before} if before else {})}
        found = self.coll.find(query).sort("_id", DESCENDING).limit(limit)
        return [_entry(d) async for d in found]
