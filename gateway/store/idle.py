"""Store side of the idle resolver (gateway/idle.py): conversations with no activity.

A conversation's ``last_activity_at`` is brought forward by every message stored for
the customer (bot and agent replies, routing events), by every customer message a human
owner's turn marks processed, and by the bot's turns (at most once a minute:
gateway/bot_turn.py). An idle one is found on the index ``(owner, last_activity_at)``:
one range query per owner. SecantusDB scans the whole collection for ``owner: {$in}``
and for an equality on null combined with a range on another field, so the owners are
asked one by one, and conversations that never had any activity (``last_activity_at``
null: created, never processed) by an equality on null alone (the index answers it),
their ``created_at`` compared here.
"""

from __future__ import annotations

from datetime import datetime

from pymongo import ASCENDING, IndexModel

from gateway.model import Conversation, OwnerState
from gateway.store.mongo import Store, from_doc

INDEX = "idle"
# Owners whose conversations go idle: everything but resolved.
OPEN_OWNERS = (OwnerState.BOT, OwnerState.QUEUED, OwnerState.AGENT)


class IdleStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conversations = store.conversations

    async def ensure_indexes(self) -> None:
        await self.conversations.create_indexes(
            [IndexModel([("owner", ASCENDING), ("last_activity_at", ASCENDING)], name=INDEX)])

    async def idle(self, owner: OwnerState, before: datetime, limit: int) -> list[Conversation]:
        """Up to ``limit`` conversations of ``owner`` whose last activity (or, without
        any, creation) is before ``before``, in no particular order (no sort: the
        embedded store would sort in memory; each sweep takes what is there)."""
        cursor = self.conversations.find(
            {"owner": owner.value, "last_activity_at": {"$lt": before}}).limit(limit)
        found = [from_doc(Conversation, d) async for d in cursor]
        if len(found) < limit:
            never = self.conversations.find({"owner": owner.value, "last_activity_at": None})
            async for doc in never:
                conversation = from_doc(Conversation, doc)
                if conversation.created_at < before:
                    found.append(conversation)
                    if len(found) >= limit:
                        break
        return found
