"""The contact's timeline: everything said and done with one customer, on every channel,
in every conversation (also those of contacts merged into it), newest first, paged back.

Where the items are. Every stored item has the ``contact_id`` of the contact that owned
its conversation when it was stored, and a ``contact_seq`` (per contact, contiguous,
visible in order: the append transaction increments the contact's counter). Merges and
links move *conversations* to another contact; their items keep their old contact id.
So a contact's timeline reads several *sources*, one per contact id:

- the contact itself, every contact in its ``merged_from`` (recursively; an undone merge
  is no longer there), and every contact whose conversations a link moved here
  (``timeline_sources``, written by ``add_source``);
- and keeps only items of conversations that are the contact's now (after an undo, the
  merged contact's conversations are its own again and drop out).

Order and paging. Each source is read backwards by ``contact_seq`` (an index range:
``(contact_id, contact_seq)`` is a unique index, and conversations are found by their
``contact_id`` index); the sources are merged by ``created_at`` (ties: source id, then
``contact_seq``). The cursor is exact: it holds, per source, the ``contact_seq`` below
which the next page starts. The first page fixes each source's top (its counter then), so
items appended later never show up in older pages, none is returned twice, and none is
skipped. A merge or undo after the first page changes the timeline: sources that joined
later are not in the cursor (the console reloads the timeline after a merge or undo).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from pydantic import BaseModel, Field
from pymongo.asynchronous.collection import AsyncCollection

from gateway.model import Activity
from gateway.store.mongo import Doc, NotFound, Store, from_doc

SOURCES = "timeline_sources"
MAX_SOURCES = 64
MAX_CURSOR = 8192


class BadCursor(ValueError):
    """A cursor this server did not make (or that was cut)."""


class TimelinePage(BaseModel):
    contact_id: str = Field(description="the contact whose timeline this is (the survivor "
                                        "if the one asked for was merged)")
    items: list[Activity] = Field(description="newest first; each item has its channel")
    has_more: bool
    next_cursor: str | None = Field(description="pass as ?cursor= for the next, older page")


async def add_source(store: Store, contact_id: str, source: str) -> None:
    """Conversations of ``source`` moved to ``contact_id`` (a link): show their items."""
    if source != contact_id:
        await store.db[SOURCES].update_one(
            {"_id": contact_id}, {"$addToSet": {"linked": source}}, upsert=True)


def encode_cursor(bounds: dict[str, int]) -> str:
    raw = json.dumps({"v": 1, "b": bounds}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, int]:
    if len(cursor) > MAX_CURSOR:
        raise BadCursor("cursor too long")
    try:
        data: Any = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadCursor("not a timeline cursor") from None
    bounds = data.get("b") if isinstance(data, dict) and data.get("v") == 1 else None
    if not isinstance(bounds, dict) or not all(
            isinstance(k, str) and type(v) is int and 1 <= v <= 2**53
            for k, v in bounds.items()):
        raise BadCursor("not a timeline cursor")
    return bounds


class _Source:
    """One contact id's items, newest first (by contact_seq), in windows of ``batch``."""

    def __init__(self, messages: AsyncCollection[Doc], contact_id: str, bound: int,
                 conversations: set[str], batch: int) -> None:
        self.messages = messages
        self.contact_id = contact_id
        self.bound = bound  # the next page starts below this contact_seq
        self.scan = bound  # the next window ends below this
        self.conversations = conversations
        self.batch = batch
        self.buffer: list[Activity] = []

    async def peek(self) -> Activity | None:
        while not self.buffer and self.scan > 1:
            low = max(1, self.scan - self.batch)
            docs = await self.messages.find({"contact_id": self.contact_id,
                                             "contact_seq": {"$gte": low, "$lt": self.scan}}
                                            ).to_list()
            docs.sort(key=lambda d: int(d["contact_seq"]), reverse=True)
            self.buffer = [from_doc(Activity, d) for d in docs
                           if d.get("conversation_id") in self.conversations]
            self.scan = low
        return self.buffer[0] if self.buffer else None

    def pop(self) -> Activity:
        item = self.buffer.pop(0)
        self.bound = item.contact_seq
        return item


class Timeline:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def _survivor(self, contact_id: str) -> Doc:
        for _ in range(MAX_SOURCES):
            doc = await self.store.contacts.find_one({"_id": contact_id},
                                                     {"merged_into": 1, "seq": 1})
            if doc is None:
                raise NotFound(f"contact {contact_id} does not exist")
            if not doc.get("merged_into"):
                return doc
            contact_id = str(doc["merged_into"])
        raise NotFound(f"contact {contact_id}: merge chain too long")

    async def sources(self, contact_id: str) -> list[str]:
        """The contact ids whose items can belong to ``contact_id``'s conversations."""
        found, todo = [contact_id], [contact_id]
        while todo and len(found) < MAX_SOURCES:
            current = todo.pop()
            doc = await self.store.contacts.find_one({"_id": current}, {"merged_from": 1})
            linked = await self.store.db[SOURCES].find_one({"_id": current})
            for other in [*((doc or {}).get("merged_from") or []),
                          *((linked or {}).get("linked") or [])]:
                if str(other) not in found:
                    found.append(str(other))
                    todo.append(str(other))
        return found[:MAX_SOURCES]

    async def page(self, contact_id: str, cursor: str | None = None,
                   limit: int = 50) -> TimelinePage:
        """One page, newest first. Raises NotFound, BadCursor."""
        contact = await self._survivor(contact_id)
        me = str(contact["_id"])
        sources = await self.sources(me)
        conversations = {str(d["_id"]) async for d in self.store.conversations.find(
            {"contact_id": me}, {"_id": 1})}
        if cursor is None:
            bounds = {}
            for source in sources:
                bounds[source] = (await self.store.contact_top(source) or 0) + 1
        else:
            bounds = {s: b for s, b in decode_cursor(cursor).items() if s in sources}
        batch = min(max(limit, 20), 200)
        readers = [_Source(self.store.messages, s, b, conversations, batch)
                   for s, b in sorted(bounds.items())]
        items: list[Activity] = []
        while len(items) < limit:
            best: tuple[Any, _Source] | None = None
            for reader in readers:
                head = await reader.peek()
                if head is None:
                    continue
                key = (head.created_at, reader.contact_id, head.contact_seq)
                if best is None or key > best[0]:
                    best = (key, reader)
            if best is None:
                break
            items.append(best[1].pop())
        has_more = False
        for reader in readers:
            if await reader.peek() is not None:
                has_more = True
                break
        next_cursor = (encode_cursor({r.contact_id: r.bound for r in readers})
                       if has_more else None)
        return TimelinePage(contact_id=me, items=items, has_more=has_more,
                            next_cursor=next_cursor)
