"""Canned responses: short texts agents insert into a reply, with placeholders.

A response has a unique ``shortcode`` (what the agent types after ``/`` in the console),
a title and a text. Placeholders ``{contact.name}``, ``{contact.<profile key>}`` (the data
the bot collected, e.g. ``{contact.email}``), ``{agent.name}`` and ``{agent.email}`` are
filled by ``render``; ``{{`` and ``}}`` are literal braces. Nothing else is evaluated.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from pymongo import ASCENDING, IndexModel
from pymongo.errors import DuplicateKeyError

from flows.steps import read_profile
from gateway.model import Agent, Contact, utcnow
from gateway.store.mongo import Store, new_id

COLLECTION = "canned_responses"
PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(contact|agent)\.([A-Za-z0-9_]{1,64})\}")


class Canned(BaseModel):
    id: str
    shortcode: str
    title: str
    text: str
    created_by: str | None = None
    created_at: datetime
    updated_at: datetime


class ShortcodeTaken(Exception):
    pass


def _canned(doc: dict[str, Any]) -> Canned:
    return Canned.model_validate({**doc, "id": doc["_id"]})


class CannedStore:
    def __init__(self, store: Store) -> None:
        self.coll = store.db[COLLECTION]

    async def ensure_indexes(self) -> None:
        await self.coll.create_indexes(
            [IndexModel([("shortcode", ASCENDING)], unique=True, name="shortcode")])

    async def list(self, prefix: str | None = None, limit: int = 200) -> list[Canned]:
        query: dict[str, Any] = {}
        if prefix:
            query["shortcode"] = {"$gte": prefix, "$lt": prefix + "\uffff"}
        cursor = self.coll.find(query).sort("shortcode", ASCENDING).limit(limit)
        return [_canned(d) async for d in cursor]

    async def get(self, canned_id: str) -> Canned | None:
        doc = await self.coll.find_one({"_id": canned_id})
        return None if doc is None else _canned(doc)

    async def create(self, shortcode: str, title: str, text: str, by: str) -> Canned:
        await self.ensure_indexes()
        now = utcnow()
        doc = {"_id": new_id(), "shortcode": shortcode, "title": title, "text": text,
               "created_by": by, "created_at": now, "updated_at": now}
        try:
            await self.coll.insert_one(doc)
        except DuplicateKeyError:
            raise ShortcodeTaken(f"shortcode {shortcode!r} is taken") from None
        return _canned(doc)

    async def update(self, canned_id: str, changes: dict[str, Any]) -> Canned | None:
        if changes:
            try:
                await self.coll.update_one(
                    {"_id": canned_id}, {"$set": {**changes, "updated_at": utcnow()}})
            except DuplicateKeyError:
                raise ShortcodeTaken(f"shortcode {changes.get('shortcode')!r} is taken") from None
        return await self.get(canned_id)

    async def delete(self, canned_id: str) -> bool:
        return (await self.coll.delete_one({"_id": canned_id})).deleted_count == 1


def render(text: str, contact: Contact | None, agent: Agent) -> tuple[str, list[str]]:
    """The text with its placeholders filled; also the placeholders that had no value
    (rendered empty, so the agent can fill them in before sending)."""
    missing: list[str] = []

    def value(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole in ("{{", "}}"):
            return whole[0]
        scope, key = match.group(1), match.group(2)
        found: Any = None
        if scope == "agent":
            found = {"name": agent.name, "email": agent.email}.get(key)
        elif contact is not None:
            found = contact.name if key == "name" else None
            if found is None:  # a profile value the bot collected, unless it expired
                entry = read_profile(contact.profile.get(key), utcnow())
                found = entry.value if entry is not None else None
        if found is None or found == "":
            missing.append(whole)
            return ""
        return str(found)

    return PLACEHOLDER.sub(value, text), missing
