"""Store operations for the queue and for agents' load (used by routing and assignment).

The queue is ``owner: queued`` ordered by priority, then by waiting time. SecantusDB uses
no index for a sort, so the queue is read as one query per priority on the index
``(owner, handoff.priority, handoff.requested_at)``: the index selects only the queued
conversations of that priority, and the in-memory sort is over those alone, so its cost
grows with the queue, never with the number of conversations in the store (measured: 3-7
ms per priority with 200 queued among 5,000 conversations; one query on ``owner`` alone
sorting the 4,800 resolved ones took 127 ms).

An agent's ``load`` is a counter on the agent document, changed in the same transaction
as the conversation's owner and the event that tells of it (the updates here are
``Op``s that routing writes in one writer unit with that event): ``assign_ops`` takes a
slot with a conditional update (``load < capacity`` for the capacity just read, while
online and active) and moves the conversation queued → agent, or does neither;
``move_ops`` changes the owner conditionally and adjusts the loads of the agents it
leaves and joins. So no process ever sees a load
that disagrees with the conversations (an assignment in flight is invisible until it
commits), concurrent assignments in several processes conflict in the store and are
retried (the loser finds the agent full), and a process dying halfway leaves nothing
half done. ``repair`` recounts in one snapshot and fixes a counter that disagrees (data
written by hand, or by an older version).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession

from gateway.model import Agent, Conversation, OwnerState, Presence
from gateway.store.mongo import Doc, Store, from_doc, transition_ops
from gateway.store.writer import Op

PRIORITIES = ("urgent", "high", "normal", "low")  # queue order


class Assigned(Enum):
    """What an automatic assignment attempt did."""

    ASSIGNED = "assigned"
    AGENT_FULL = "agent_full"  # the agent could not take it (full, offline, changed)
    TAKEN = "taken"  # the conversation is no longer queued (someone else won it)


def agent_of(doc: dict[str, Any]) -> Agent:
    """An agent document as the model (fields the model does not know, such as token or
    password hashes, are left out)."""
    data = {k: v for k, v in doc.items() if k in Agent.model_fields}
    return Agent.model_validate({**data, "id": doc["_id"]})


class QueueStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conversations = store.conversations
        self.agents = store.agents

    async def ensure_indexes(self) -> None:
        await self.conversations.create_indexes(
            [
                IndexModel(
                    [("owner", ASCENDING), ("handoff.priority", ASCENDING),
                     ("handoff.requested_at", ASCENDING)],
                    name="queue_order",
                )
            ]
        )
        await self.agents.create_indexes(
            [
                IndexModel([("presence", ASCENDING), ("active", ASCENDING)], name="presence"),
                IndexModel([("requeue_at", ASCENDING)], name="requeue_at"),
            ]
        )

    # -------------------------------------------------------------------- queue

    async def queue(self, limit: int = 50) -> list[Conversation]:
        """Queued conversations: urgent first, ..., low; oldest handoff first within one."""
        found: list[Conversation] = []
        queries: list[Doc] = [{"handoff.priority": p} for p in PRIORITIES]
        queries.append({"handoff.priority": {"$nin": list(PRIORITIES)}})  # unknown: last
        for query in queries:
            if len(found) >= limit:
                break
            cursor = self.conversations.find({"owner": OwnerState.QUEUED.value, **query})
            cursor = cursor.sort([("handoff.requested_at", ASCENDING), ("_id", ASCENDING)])
            found += [from_doc(Conversation, d) async for d in cursor.limit(limit - len(found))]
        return found

    async def assigned_to(self, agent_id: str) -> list[str]:
        """Ids of the conversations an agent owns now."""
        cursor = self.conversations.find(
            {"assignee_id": agent_id, "owner": OwnerState.AGENT.value}, {"_id": 1}
        )
        return [str(d["_id"]) async for d in cursor]

    # ------------------------------------------------------------------- agents

    async def get_agent(self, agent_id: str) -> Agent | None:
        doc = await self.agents.find_one({"_id": agent_id})
        return None if doc is None else agent_of(doc)

    async def all_agents(self) -> list[Agent]:
        return [agent_of(d) async for d in self.agents.find({})]

    async def available(self) -> list[Agent]:
        """Active agents who are online (whether or not they have free capacity)."""
        cursor = self.agents.find({"presence": Presence.ONLINE.value, "active": True})
        return [agent_of(d) async for d in cursor]

    async def in_team(self, team: str) -> bool:
        return await self.agents.find_one({"teams": team, "active": True}, {"_id": 1}) is not None

    def assign_ops(self, conversation_id: str, agent: Agent, now: datetime) -> list[Op]:
        """Queue → agent and one slot of the agent's capacity taken: both required, so the
        unit they go in (with its "assigned" event) is written only if the agent is
        active, online and below capacity (the capacity just read) and the conversation
        still queued. If not, the caller tells which (``Routing.assign``)."""
        return [
            Op("agents",
               {"_id": agent.id, "active": True, "presence": Presence.ONLINE.value,
                "capacity": agent.capacity, "load": {"$lt": agent.capacity}},
               {"$inc": {"load": 1}, "$set": {"last_assigned_at": now}}, required=True),
            *transition_ops(conversation_id, {OwnerState.QUEUED}, OwnerState.AGENT, now,
                            also={"assignee_id": agent.id}),
        ]

    def move_ops(
        self,
        conversation_id: str,
        expected: set[OwnerState],
        to: OwnerState,
        now: datetime,
        *,
        also: Mapping[str, Any] | None = None,
        where: Mapping[str, Any] | None = None,
        joins: str | None = None,
        leaves: str | None = None,
        reset_bot: bool = False,
    ) -> list[Op]:
        """The owner changes only if it is one of ``expected`` (and ``where``): a required
        update; with it +1 on the load of the agent it ``joins`` (a claim, a transfer: not
        held to capacity), -1 on the one it ``leaves``. Written in one unit, with the
        change's event (``Routing._change``): all of it or nothing."""
        ops = transition_ops(conversation_id, expected, to, now, also=also, where=where,
                             reset_bot=reset_bot)
        if joins is not None:
            ops.append(Op("agents", {"_id": joins},
                          {"$inc": {"load": 1}, "$set": {"last_assigned_at": now}}))
        if leaves is not None:
            ops.append(Op("agents", {"_id": leaves, "load": {"$gt": 0}},
                          {"$inc": {"load": -1}}))
        return ops

    async def repair(self, agent_id: str) -> tuple[int, int] | None:
        """Recount the agent's load in one snapshot; if the counter disagrees, set it.
        Returns (counter, true load) when it was repaired."""

        async def txn(session: AsyncClientSession) -> tuple[int, int] | None:
            doc = await self.agents.find_one({"_id": agent_id}, {"load": 1}, session=session)
            if doc is None:
                return None
            true = await self.conversations.count_documents(
                {"assignee_id": agent_id, "owner": OwnerState.AGENT.value}, session=session)
            was = int(doc.get("load", 0))
            if was == true:
                return None
            await self.agents.update_one({"_id": agent_id}, {"$set": {"load": true}},
                                         session=session)
            return was, true

        async with self.store.client.start_session() as session:
            return await session.with_transaction(txn)

    async def set_presence(
        self, agent_id: str, presence: Presence, now: datetime, requeue_at: datetime
    ) -> Agent | None:
        """Record presence. Going offline schedules a re-queue at ``requeue_at`` (once: an
        agent already offline keeps the time it had); online or away cancels it."""
        if presence is Presence.OFFLINE:
            await self.agents.update_one(
                {"_id": agent_id, "presence": {"$ne": Presence.OFFLINE.value}},
                {"$set": {"presence": presence.value, "presence_at": now,
                          "requeue_at": requeue_at}},
            )
        else:
            await self.agents.update_one(
                {"_id": agent_id},
                {"$set": {"presence": presence.value, "presence_at": now, "requeue_at": None}},
            )
        return await self.get_agent(agent_id)

    async def set_capacity(self, agent_id: str, capacity: int) -> Agent | None:
        await self.agents.update_one({"_id": agent_id}, {"$set": {"capacity": capacity}})
        return await self.get_agent(agent_id)

    async def due_requeue(self, now: datetime) -> list[Agent]:
        """Offline agents whose grace period is over."""
        cursor = self.agents.find(
            {"requeue_at": {"$lte": now}, "presence": Presence.OFFLINE.value}
        )
        return [agent_of(d) async for d in cursor]

    async def clear_requeue(self, agent_id: str, requeue_at: datetime) -> None:
        await self.agents.update_one(
            {"_id": agent_id, "requeue_at": requeue_at}, {"$set": {"requeue_at": None}}
        )
