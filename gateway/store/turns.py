"""Who runs a conversation's turns, and how far they got: the store side of the pipeline.

What a conversation's turns change lives in its turn state (``TurnState``, collection
``turn_state``, one document per conversation with the conversation's id and no other
index), as of its last checkpoint: a bot turn that answers records what it changed on its
first reply instead, and the checkpoint follows every few seconds
(gateway/store/turn_records.py). The turn state carries a copy of the conversation's
``owner``, written in the same unit as every owner change (``transition_ops``), so a
turn's checkpoint, which requires it to say "bot", conflicts with a claim; a turn's
replies are fenced against the change's event instead.

A conversation's turns run in one gateway process at a time, the holder of its lease
(``TurnState.lease``: owner, until), as Rasa's lock store does across replicas. The
holder keeps it while the conversation is busy: a checkpoint or a renewal extends it
before it runs short (a turn that finds less than ``RENEW_BELOW`` of it left renews it
first). An idle lease just expires; a clean shutdown releases every lease at once; a
process that died on this machine is recognised by its pid and its leases are taken over
at once, anyone else's after ``LEASE``. Should two processes ever run the same turn (one
paused past its lease), their replies collide on their ids: it is answered once.

``processed_seq`` in the turn state, brought forward by the turn records written after it
(gateway/store/turn_records.py), says how far its inbound items are processed; the
sweeper finds recent inbound items above it (index ``recent``: direction, created_at),
so a message stored by a process that died before its turn is answered by another.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo.errors import DuplicateKeyError

from gateway.model import Direction, OwnerState, utcnow
from gateway.store.mongo import FREE, Doc, NotFound, Store, turn_state_doc
from gateway.store.orphan import pid_alive
from gateway.store.turn_records import processed_after

LEASE = timedelta(seconds=30)
SWEEP_STATE = ("pipeline", "sweep")  # channel_state: the sweeper's lower bound


def instance_name() -> str:
    """This process, as lease owners are written: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def dead_here(owner: str | None) -> bool:
    """A lease owner that was a process on this machine which no longer runs."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return pid != os.getpid() and not pid_alive(pid)


@dataclass(frozen=True, slots=True)
class Acquired:
    until: datetime
    continuous: bool  # it was this process's already (nobody else ran turns meanwhile)


class Turns:
    def __init__(self, store: Store, instance: str) -> None:
        self.store = store
        self.instance = instance

    def _lease(self, until: datetime) -> Doc:
        return {"$set": {"lease": {"owner": self.instance, "until": until}}}

    async def acquire(self, conversation_id: str) -> Acquired | datetime:
        """Take the conversation's lease: ``Acquired``, or until when another holds it."""
        now = utcnow()
        until = now + LEASE
        coll = self.store.turn_state
        # Plain conditions, not one $or: SecantusDB scans the collection for an $or.
        mine = await coll.update_one(
            {"_id": conversation_id, "lease.owner": self.instance}, self._lease(until))
        if mine.matched_count:
            return Acquired(until, continuous=True)
        free = await coll.update_one(
            {"_id": conversation_id, "lease.until": {"$lt": now}}, self._lease(until))
        if free.matched_count:
            return Acquired(until, continuous=False)
        doc = await coll.find_one({"_id": conversation_id}, {"lease": 1})
        if doc is None:
            return await self._create(conversation_id, until)
        lease = doc.get("lease") or {}
        if dead_here(lease.get("owner")):
            taken = await coll.update_one(
                {"_id": conversation_id, "lease.owner": lease.get("owner")},
                self._lease(until))
            if taken.matched_count:
                return Acquired(until, continuous=False)
        held_until = lease.get("until")
        return held_until if isinstance(held_until, datetime) else now + LEASE

    async def _create(self, conversation_id: str, until: datetime) -> Acquired | datetime:
        """The conversation has no turn state (its creator died before writing it): write
        it, leased to this process, with the conversation's owner. An owner change
        meanwhile upserts it too (``owner_copy_op``): then take the lease as usual."""
        conversation = await self.store.conversations.find_one(
            {"_id": conversation_id}, {"owner": 1})
        if conversation is None:
            raise NotFound(f"conversation {conversation_id} does not exist")
        doc = turn_state_doc(conversation_id, OwnerState(conversation.get("owner") or "bot"))
        doc["lease"] = {"owner": self.instance, "until": until}
        try:
            await self.store.turn_state.insert_one(doc)
        except DuplicateKeyError:
            return await self.acquire(conversation_id)
        return Acquired(until, continuous=False)

    def commit_filter(self, conversation_id: str, *, bot: bool) -> Doc:
        """What a turn's commit (an update of the turn state) requires: still this
        process's lease (and the bot's)."""
        query: Doc = {"_id": conversation_id, "lease.owner": self.instance}
        if bot:
            query["owner"] = OwnerState.BOT.value
        return query

    async def release_all(self) -> None:
        await self.store.turn_state.update_many(
            {"lease.owner": self.instance}, {"$set": {"lease": {"owner": None, "until": FREE}}})

    async def processed(self, conversation_id: str) -> int | None:
        """How far its inbound items are processed (None: no turn state)."""
        doc = await self.store.turn_state.find_one(
            {"_id": conversation_id}, {"processed_seq": 1})
        if doc is None:
            return None
        return await processed_after(self.store, conversation_id,
                                     int(doc.get("processed_seq") or 0))

    # ------------------------------------------------------------------ sweeper

    async def load_mark(self) -> datetime | None:
        doc = await self.store.get_state(*SWEEP_STATE)
        mark = (doc or {}).get("since")
        return mark if isinstance(mark, datetime) else None

    async def save_mark(self, since: datetime) -> None:
        await self.store.put_state(*SWEEP_STATE, {"since": since})

    async def unprocessed(
        self, since: datetime, before: datetime
    ) -> tuple[dict[str, int], datetime | None]:
        """Conversations with an inbound item stored in [since, before) above their
        ``processed_seq``: conversation id -> that item's seq; and the oldest such
        item's time (None: nothing waits)."""
        docs = await self.store.messages.find(
            {"direction": Direction.INBOUND.value,
             "created_at": {"$gte": since, "$lt": before}},
            {"conversation_id": 1, "seq": 1, "created_at": 1}).to_list()
        if not docs:
            return {}, None
        latest: dict[str, int] = {}
        for doc in docs:
            cid = str(doc["conversation_id"])
            latest[cid] = max(latest.get(cid, 0), int(doc["seq"]))
        convs = await self.store.turn_state.find(
            {"_id": {"$in": list(latest)}}, {"processed_seq": 1}).to_list()
        done = {str(c["_id"]): int(c.get("processed_seq") or 0) for c in convs}
        if missing := [cid for cid in latest if cid not in done]:
            # no turn state: its conversation's creator died before writing it (nothing
            # processed), or the conversation is gone (nothing to do)
            alive = await self.store.conversations.distinct("_id", {"_id": {"$in": missing}})
            done.update({str(cid): 0 for cid in alive})
        waiting = {cid: seq for cid, seq in latest.items() if seq > done.get(cid, seq)}
        for cid in list(waiting):  # answered by turns that recorded it on their replies
            done[cid] = await processed_after(self.store, cid, done[cid])
            if waiting[cid] <= done[cid]:
                del waiting[cid]
        oldest = min((d["created_at"] for d in docs
                      if str(d["conversation_id"]) in waiting
                      and int(d["seq"]) > done.get(str(d["conversation_id"]), 0)),
                     default=None)
        return waiting, oldest
