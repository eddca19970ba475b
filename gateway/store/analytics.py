"""Store side of analytics: one ``outcomes`` document per ended conversation, and the
aggregation pipelines over them.

An *outcome* is written when a conversation is resolved (by an agent, by the bot, or
by the idle resolver: abandoned): who resolved it, whether a human was involved since it
last (re)opened, the handoff's reason, team and topic, the intents the bot recognised,
the conversation's labels, the agent who had it, first-response and resolution times,
SLA breaches, and later the customer's CSAT answer. Conversations change afterwards (a
reopen clears the handoff, a second resolve asks CSAT again), so the figures are read
from these snapshots, never from the conversations' current state.

Every query selects a period on an indexed field (``outcomes.ended_at``,
``conversations.created_at``; with a filter the compound index ``(field, ended_at)``),
then ``$match`` / ``$group`` in the store (``$unwind`` first for intents and labels).
Durations are pushed per group and their median / p90 computed exactly in Python:
``$percentile`` exists only on MongoDB 7+ and is approximate there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.errors import DuplicateKeyError

from gateway.model import Direction, Role
from gateway.store.mongo import Doc, Store

Dimension = Literal["channel", "team", "topic", "intent", "label", "agent"]
DIMENSIONS: tuple[Dimension, ...] = ("channel", "team", "topic", "intent", "label", "agent")
# The outcome's field per dimension; intents and labels are lists: an outcome counts
# under each of its values (``$unwind``), or under NONE_KEY without any.
FIELD: dict[Dimension, str] = {"channel": "channel", "team": "team", "topic": "topic",
                               "intent": "intents", "label": "labels", "agent": "agent_id"}
LISTS: frozenset[Dimension] = frozenset({"intent", "label"})
NONE_KEY = "(none)"  # the group of outcomes without a team / topic / intent / ...
ABANDONED_IN = ("bot", "queued", "agent")  # who had an idle-resolved conversation


def _flag(field: str) -> Doc:
    return {"$sum": {"$cond": [{"$eq": [f"${field}", True]}, 1, 0]}}


def _score_is(score: int) -> Doc:
    return {"$sum": {"$cond": [{"$eq": ["$csat_score", score]}, 1, 0]}}


def _count_if(*conditions: Doc) -> Doc:
    return {"$sum": {"$cond": [{"$and": list(conditions)}, 1, 0]}}


def _key(dimension: Dimension | None) -> Any:
    return None if dimension is None else {"$ifNull": [f"${FIELD[dimension]}", NONE_KEY]}


def _unwind(dimension: Dimension | None) -> list[Doc]:
    """A list dimension's values one per document (none: one document with none)."""
    if dimension not in LISTS:
        return []
    return [{"$unwind": {"path": f"${FIELD[dimension]}", "preserveNullAndEmptyArrays": True}}]


def _group_stage(dimension: Dimension | None) -> Doc:
    idle = {"$eq": ["$resolved_by", "idle"]}
    stage: Doc = {
        "_id": _key(dimension),
        "ended": {"$sum": 1},
        "resolved_by_agent": _count_if({"$eq": ["$resolved_by", "agent"]}),
        "resolved_by_bot": _count_if({"$eq": ["$resolved_by", "bot"]}),
        "abandoned": _count_if(idle),
        "handed_off": _flag("handed_off"),
        "contained": {"$sum": {"$cond": [
            {"$and": [{"$eq": ["$resolved_by", "bot"]}, {"$ne": ["$handed_off", True]}]},
            1, 0]}},
        "first_response": {"$push": "$first_response_seconds"},
        "resolution": {"$push": "$resolution_seconds"},
        "with_sla": _flag("has_sla"),
        "first_response_breaches": _flag("first_response_breached"),
        "resolution_breaches": _flag("resolution_breached"),
        "csat_asked": _flag("csat_asked"),
        "csat_answered": {"$sum": {"$cond": [{"$gt": [{"$ifNull": ["$csat_score", 0]}, 0]},
                                             1, 0]}},
        "csat_sum": {"$sum": {"$ifNull": ["$csat_score", 0]}},
    }
    for score in range(1, 6):
        stage[f"csat_{score}"] = _score_is(score)
    for owner in ABANDONED_IN:
        stage[f"abandoned_{owner}"] = _count_if(idle, {"$eq": ["$abandoned_in", owner]})
    return stage


class AnalyticsStore:
    """The ``outcomes`` collection and the figures computed from it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.outcomes = store.db["outcomes"]
        self._indexed = False
        self._lock = asyncio.Lock()

    async def ensure_indexes(self) -> None:
        """Create the indexes (once per instance; creating them again is harmless)."""
        if self._indexed:
            return
        async with self._lock:
            if self._indexed:
                return
            await self.outcomes.create_indexes([
                IndexModel([("ended_at", ASCENDING)], name="period"),
                IndexModel([("channel", ASCENDING), ("ended_at", ASCENDING)],
                           name="channel_period"),
                IndexModel([("team", ASCENDING), ("ended_at", ASCENDING)], name="team_period"),
                IndexModel([("topic", ASCENDING), ("ended_at", ASCENDING)],
                           name="topic_period"),
                IndexModel([("conversation_id", ASCENDING), ("ended_at", ASCENDING)],
                           name="conversation_outcomes"),
                IndexModel([("intents", ASCENDING), ("ended_at", ASCENDING)],
                           name="intent_period"),
                IndexModel([("labels", ASCENDING), ("ended_at", ASCENDING)],
                           name="label_period"),
                IndexModel([("agent_id", ASCENDING), ("ended_at", ASCENDING)],
                           name="agent_period"),
            ])
            await self.store.conversations.create_indexes(
                [IndexModel([("created_at", ASCENDING)], name="created_period")])
            self._indexed = True

    # ------------------------------------------------------------------ writing

    async def insert(self, doc: Doc) -> bool:
        """Store one outcome; False if it was stored already (same ``_id``)."""
        await self.ensure_indexes()
        try:
            await self.outcomes.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    async def last_end(self, conversation_id: str) -> datetime | None:
        """When the conversation last ended before (its previous outcome), if ever."""
        await self.ensure_indexes()
        cursor = self.outcomes.find({"conversation_id": conversation_id}, {"ended_at": 1})
        docs = await cursor.sort("ended_at", DESCENDING).limit(1).to_list()
        return docs[0]["ended_at"] if docs else None

    async def handed_off_since(self, conversation_id: str, since: datetime) -> bool:
        """Was a ``handoff`` event stored in the conversation at or after ``since``?"""
        doc = await self.store.messages.find_one(
            {"conversation_id": conversation_id, "name": "handoff",
             "created_at": {"$gte": since}}, {"_id": 1})
        return doc is not None

    async def first_agent_reply(self, conversation_id: str, since: datetime) -> datetime | None:
        """When an agent first wrote to the customer at or after ``since`` (the history's
        answer, for conversations without ``sla.first_response_at``)."""
        cursor = self.store.messages.find(
            {"conversation_id": conversation_id, "direction": Direction.OUTBOUND.value,
             "sender.role": Role.AGENT.value, "type": "message",
             "created_at": {"$gte": since}}, {"created_at": 1})
        docs = await cursor.sort("created_at", ASCENDING).limit(1).to_list()
        return docs[0]["created_at"] if docs else None

    async def set_csat(
        self, conversation_id: str, ended_at: datetime, score: int, comment: str | None,
        answered_at: datetime,
    ) -> None:
        """The customer's answer on the outcome it rates (setting it again is harmless)."""
        await self.outcomes.update_one(
            {"conversation_id": conversation_id, "ended_at": ended_at},
            {"$set": {"csat_score": score, "csat_comment": comment,
                      "csat_answered_at": answered_at}})

    # ----------------------------------------------------------------- reading

    @staticmethod
    def _match(start: datetime, end: datetime, filters: Mapping[str, Any]) -> Doc:
        match: Doc = dict(filters)
        match["ended_at"] = {"$gte": start, "$lt": end}
        return match

    async def groups(
        self, start: datetime, end: datetime, filters: Mapping[str, Any],
        dimension: Dimension | None,
    ) -> list[Doc]:
        """Raw figures of the outcomes ended in [start, end), one document per group
        (``_id``: the channel / team / topic, or None for all)."""
        await self.ensure_indexes()
        cursor = await self.outcomes.aggregate([
            {"$match": self._match(start, end, filters)}, *_unwind(dimension),
            {"$group": _group_stage(dimension)},
        ])
        return await cursor.to_list()

    async def reasons(
        self, start: datetime, end: datetime, filters: Mapping[str, Any],
        dimension: Dimension | None,
    ) -> list[Doc]:
        """Handoff reasons counted per group: ``{_id: {key, reason}, n}``."""
        await self.ensure_indexes()
        cursor = await self.outcomes.aggregate([
            {"$match": {**self._match(start, end, filters), "handed_off": True}},
            *_unwind(dimension),
            {"$group": {"_id": {"key": _key(dimension),
                                "reason": {"$ifNull": ["$reason", NONE_KEY]}},
                        "n": {"$sum": 1}}},
        ])
        return await cursor.to_list()

    async def names(self, collection: str, ids: list[str]) -> dict[str, str]:
        """The ``name`` of each of these documents of ``agents`` or ``labels`` (ids of
        ones deleted since are left out)."""
        if not ids:
            return {}
        cursor = self.store.db[collection].find({"_id": {"$in": ids}}, {"name": 1})
        return {str(d["_id"]): str(d.get("name") or d["_id"]) async for d in cursor}

    async def started(self, start: datetime, end: datetime, channel: str | None) -> list[Doc]:
        """Conversations created in [start, end), counted per channel: ``{_id, n}``."""
        await self.ensure_indexes()
        match: Doc = {"created_at": {"$gte": start, "$lt": end}}
        if channel is not None:
            match["channel"] = channel
        cursor = await self.store.conversations.aggregate([
            {"$match": match}, {"$group": {"_id": "$channel", "n": {"$sum": 1}}}])
        return await cursor.to_list()
