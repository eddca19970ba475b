"""Store operations for service levels (gateway/sla.py).

The timers live on the conversation (``Conversation.sla``, one set per handoff, keyed by
``sla.started_at``); every update is conditional on that key, so a late write from an
earlier handoff never touches a newer one, and a timer is set or flagged once, whichever
process gets there first. Each breach is also one document in ``sla_breaches`` (its id
names the conversation, the handoff and the kind, so it is written once): the counts by
priority, team and channel over a period are read from there, and survive later
handoffs of the same conversation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pymongo import ASCENDING, IndexModel
from pymongo.errors import DuplicateKeyError

from gateway.model import (
    ActivityType,
    Conversation,
    OwnerState,
    Party,
    Role,
)
from gateway.store.mongo import Doc, Store, from_doc
from gateway.store.notes import append_private

SYSTEM = Party(role=Role.SYSTEM, name="Omnigate")

Kind = Literal["first_response", "resolution"]
KINDS: tuple[Kind, ...] = ("first_response", "resolution")
OPEN = [OwnerState.QUEUED.value, OwnerState.AGENT.value]  # the clock runs in these
GROUPS = ("priority", "team", "channel", "kind")


@dataclass(frozen=True)
class BreachCount:
    kind: str
    priority: str | None
    team: str | None
    channel: str | None
    count: int


def _done_field(kind: Kind) -> str:
    return "sla.first_response_at" if kind == "first_response" else "sla.resolved_at"


class SlaStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conversations = store.conversations
        self.breaches = store.db["sla_breaches"]

    async def ensure_indexes(self) -> None:
        await self.conversations.create_indexes([
            IndexModel([("sla.first_response_due", ASCENDING)], name="sla_first_response_due"),
            IndexModel([("sla.resolution_due", ASCENDING)], name="sla_resolution_due"),
        ])
        await self.breaches.create_indexes([
            IndexModel([("due", ASCENDING)], name="due"),
        ])

    async def mark_done(self, conversation: Conversation, kind: Kind, at: datetime) -> bool:
        """Set first_response_at / resolved_at, once per handoff. True if this call did."""
        if conversation.sla is None or conversation.sla.started_at is None:
            return False
        field = _done_field(kind)
        done = await self.conversations.update_one(
            {"_id": conversation.id, "sla.started_at": conversation.sla.started_at,
             field: None},
            {"$set": {field: at}},
        )
        return done.modified_count == 1

    async def flag(self, conversation: Conversation, kind: Kind, detected: datetime) -> bool:
        """Flag the breach, once per handoff and kind (True: this call flagged it), and
        record it for the counts."""
        sla = conversation.sla
        if sla is None or sla.started_at is None:
            return False
        handoff = conversation.handoff
        due = sla.first_response_due if kind == "first_response" else sla.resolution_due
        with contextlib.suppress(DuplicateKeyError):  # recorded before, by us or another
            await self.breaches.insert_one({
                "_id": f"{conversation.id}:{sla.started_at.isoformat()}:{kind}",
                "conversation_id": conversation.id,
                "kind": kind,
                "priority": handoff.priority if handoff else None,
                "team": handoff.team if handoff else None,
                "channel": conversation.channel,
                "started_at": sla.started_at,
                "due": due,
                "detected_at": detected,
            })
        flag = f"sla.{kind}_breached"
        flagged = await self.conversations.update_one(
            {"_id": conversation.id, "sla.started_at": sla.started_at, flag: False},
            {"$set": {flag: True}},
        )
        return flagged.modified_count == 1

    async def overdue(self, kind: Kind, now: datetime, limit: int = 200) -> list[Conversation]:
        """Open conversations whose ``kind`` is due by ``now``, not done, not flagged."""
        due = "sla.first_response_due" if kind == "first_response" else "sla.resolution_due"
        cursor = self.conversations.find({
            due: {"$lte": now},
            "owner": {"$in": OPEN},
            _done_field(kind): None,
            f"sla.{kind}_breached": False,
        })
        return [from_doc(Conversation, d) async for d in cursor.limit(limit)]

    async def counts(
        self, since: datetime, until: datetime, by: tuple[str, ...] = GROUPS
    ) -> list[BreachCount]:
        """Breaches whose due time falls in [since, until), grouped by ``by`` (a subset
        of priority, team, channel, kind; the others come back as None). For the SLA and
        analytics endpoints."""
        unknown = set(by) - set(GROUPS)
        if unknown:
            raise ValueError(f"cannot group by {', '.join(sorted(unknown))}")
        pipeline: list[Doc] = [
            {"$match": {"due": {"$gte": since, "$lt": until}}},
            {"$group": {"_id": {g: f"${g}" for g in by} if by else None, "count": {"$sum": 1}}},
        ]
        rows: list[BreachCount] = []
        async for row in await self.breaches.aggregate(pipeline):
            key: dict[str, Any] = row["_id"] or {}
            rows.append(BreachCount(
                kind=key.get("kind", "all"), priority=key.get("priority"),
                team=key.get("team"), channel=key.get("channel"), count=int(row["count"])))
        rows.sort(key=lambda r: (-r.count, r.kind, r.priority or "", r.team or "",
                                 r.channel or ""))
        return rows

    async def note(self, conversation: Conversation, name: str, text: str, key: str) -> bool:
        """Leave an event in the conversation's history for agents (the timeline), once
        per ``key``. Private: never sent to a channel, a ``skip`` for the web chat."""
        try:
            await append_private(self.store, conversation, ActivityType.EVENT, SYSTEM, text,
                                 key=key, name=name)
        except DuplicateKeyError:
            return False
        return True
