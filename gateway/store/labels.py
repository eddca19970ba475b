"""Labels: admin-defined, coloured tags that agents put on conversations.

A label is ``{_id, name, color, created_at}`` in ``labels`` (names unique, whatever
their case: ``name_key``); a conversation lists the ids of its labels in
``Conversation.labels`` (set by agents, found by the queue filter and search). Deleting
a label takes it off every conversation.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from pymongo import ASCENDING, IndexModel
from pymongo.errors import DuplicateKeyError

from gateway.model import utcnow
from gateway.store.mongo import Doc, Store, new_id

COLLECTION = "labels"
COLOR = r"^#[0-9a-fA-F]{6}$"


class Label(BaseModel):
    id: str
    name: str
    color: str = Field(pattern=COLOR, description="#rrggbb")
    created_at: datetime


class LabelTaken(Exception):
    """Another label has that name."""


class UnknownLabels(Exception):
    """Label ids that do not exist (the message lists them)."""


def _label(doc: Doc) -> Label:
    return Label.model_validate({**doc, "id": doc["_id"]})


def name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


class Labels:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.coll = store.db[COLLECTION]

    async def ensure_indexes(self) -> None:
        await self.coll.create_indexes(
            [IndexModel([("name_key", ASCENDING)], unique=True, name="label_name")])
        await self.store.conversations.create_indexes(
            [IndexModel([("labels", ASCENDING)], name="conversation_labels")])

    async def all(self) -> list[Label]:
        return [_label(d) async for d in self.coll.find().sort("name_key", ASCENDING)]

    async def create(self, name: str, color: str) -> Label:
        await self.ensure_indexes()
        doc = {"_id": new_id(), "name": name, "name_key": name_key(name), "color": color,
               "created_at": utcnow()}
        try:
            await self.coll.insert_one(doc)
        except DuplicateKeyError:
            raise LabelTaken(f"a label named {name!r} exists already") from None
        return _label(doc)

    async def update(self, label_id: str, changes: dict[str, Any]) -> Label | None:
        if "name" in changes:
            changes = {**changes, "name_key": name_key(str(changes["name"]))}
        if changes:
            try:
                await self.coll.update_one({"_id": label_id}, {"$set": changes})
            except DuplicateKeyError:
                raise LabelTaken(f"a label named {changes['name']!r} exists already") \
                    from None
        doc = await self.coll.find_one({"_id": label_id})
        return None if doc is None else _label(doc)

    async def delete(self, label_id: str) -> bool:
        """Delete it, and take it off every conversation."""
        deleted = await self.coll.delete_one({"_id": label_id})
        await self.store.conversations.update_many(
            {"labels": label_id}, {"$pull": {"labels": label_id}})
        return deleted.deleted_count == 1

    async def check(self, label_ids: list[str]) -> list[str]:
        """The ids, each once, in order; raises UnknownLabels for any that does not exist."""
        wanted = list(dict.fromkeys(label_ids))
        known = {str(d["_id"]) async for d in self.coll.find(
            {"_id": {"$in": wanted}}, {"_id": 1})}
        missing = [i for i in wanted if i not in known]
        if missing:
            raise UnknownLabels(f"no such label: {', '.join(missing)}")
        return wanted

    async def set_on(self, conversation_id: str, label_ids: list[str]) -> bool:
        """The conversation's labels are exactly these now (False: no such conversation)."""
        labels = await self.check(label_ids)
        result = await self.store.conversations.update_one(
            {"_id": conversation_id}, {"$set": {"labels": labels, "updated_at": utcnow()}})
        return result.matched_count == 1
