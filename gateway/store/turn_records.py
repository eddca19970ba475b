"""A bot turn's record: what the turn changed, written with its replies.

A conversation's turn state (``TurnState``: the bot's memory, how far its inbound items
are processed, the lease) is a small document of its own. Rewriting it on every turn was
a third of the embedded store's work per web chat round trip (an update costs more than
inserting a message: BENCHMARKS.md). So a bot turn that answers writes nothing but its
replies: the first reply carries the turn's record (``Activity.turn``)::

    {"seq": <the inbound item it answered>, "epoch": <TurnState.epoch>,
     "state": <the bot's memory after it>, "since": <TurnState.bot_since>,
     "events": <the turn's entries of the bot's event log>}

and the turn state is a checkpoint, written every few seconds while the conversation is
busy (with the lease's renewal), when it goes idle, by a turn without a reply, and by
every owner change. What is current is the checkpoint and the records written after it:
``current`` (the latest record of the checkpoint's epoch, if it answered an item the
checkpoint had not processed; an owner change that clears the bot's memory bumps the
epoch, so the records from before it no longer count).

A record is never written over a change it did not see: the turn's unit is fenced
(``Unit.fence``, gateway/store/writer.py): written only if nothing but customers'
messages was appended to the conversation since what the turn's decision was based on.
Every owner change appends its event in the same unit, so a claim, a hand back or a
takeover by another process's turn is either before the fence (the turn saw it) or fails
the turn's commit.

The event log (custom actions get it as the tracker's events): each turn's entries are
in its record; a turn without a reply keeps them in a ``bot_events`` document of its own
(``_id``: the conversation id and the turn's seq, upserted with the turn's commit). The
log starts afresh when the bot's memory is cleared: ``TurnState.bot_since`` is the seq of
the first turn after that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from gateway.model import TurnState
from gateway.store.mongo import Doc, Op, Store, from_doc

BOT_EVENTS = "bot_events"
# How far back (in a conversation's items) the log is read: its last 40 entries are
# about 20 bot turns, each with its replies; agents' messages take seqs too.
HISTORY_ITEMS = 400


def event_key(conversation_id: str, seq: int) -> str:
    return f"{conversation_id}:{seq:012d}"


def keep_record(replies: list[Doc], *, seq: int, epoch: int, state: dict[str, Any],
                since: int, events: list[dict[str, Any]]) -> None:
    """The turn that answered inbound ``seq`` records itself on its first reply."""
    replies[0]["turn"] = {"seq": seq, "epoch": epoch, "state": state, "since": since,
                          "events": events}


def events_op(conversation_id: str, seq: int, events: list[dict[str, Any]],
              at: datetime) -> Op:
    """A turn without a reply: its entries of the event log, written with its commit; a
    re-run of the same turn keeps the first (``$setOnInsert``)."""
    return Op(BOT_EVENTS, {"_id": event_key(conversation_id, seq)},
              {"$setOnInsert": {"conversation_id": conversation_id, "seq": seq,
                                "events": events, "at": at}}, upsert=True)


async def current(store: Store, conversation_id: str) -> TurnState | None:
    """The conversation's turn state as it is now: its checkpoint, brought forward by
    the turn records written after it (None: no turn state)."""
    doc = await store.turn_state.find_one({"_id": conversation_id})
    if doc is None:
        return None
    return await brought_forward(store, from_doc(TurnState, doc))


async def _records_after(store: Store, conversation_id: str, after: int,
                         fields: str = "turn") -> AsyncIterator[dict[str, Any]]:
    """The records of the turns that answered an item after ``after`` (only ``fields``
    of them read: "turn" or e.g. "turn.seq")."""
    async for doc in store.messages.find(
            {"conversation_id": conversation_id, "seq": {"$gt": after},
             "turn.seq": {"$gt": after}}, {fields: 1}):
        record = doc.get("turn")
        if isinstance(record, dict):
            yield record


async def brought_forward(store: Store, checkpoint: TurnState) -> TurnState:
    """``checkpoint`` with the records of the turns done after it: how far the inbound
    items are processed, and the bot's memory (of the checkpoint's epoch only)."""
    after = checkpoint.processed_seq
    processed = after
    latest: dict[str, Any] | None = None
    async for record in _records_after(store, checkpoint.id, after):
        seq = int(record.get("seq") or 0)
        processed = max(processed, seq)
        if int(record.get("epoch") or 0) == checkpoint.epoch and (
                latest is None or seq > int(latest.get("seq") or 0)):
            latest = record
    if latest is None:
        return checkpoint if processed == after else checkpoint.model_copy(
            update={"processed_seq": processed})
    return checkpoint.model_copy(update={
        "processed_seq": processed, "bot_state": dict(latest.get("state") or {}),
        "bot_since": int(latest.get("since") or 0)})


async def processed_after(store: Store, conversation_id: str, after: int) -> int:
    """How far the conversation's inbound items are processed, from a checkpoint that
    says ``after``: the turn records written since bring it forward."""
    processed = after
    async for record in _records_after(store, conversation_id, after, "turn.seq"):
        processed = max(processed, int(record.get("seq") or 0))
    return processed


async def history(store: Store, conversation_id: str, since: int,
                  before: int) -> list[dict[str, Any]]:
    """The event-log entries of the turns with inbound seq in ``[since, before)`` (the
    most recent HISTORY_ITEMS items at most), oldest first."""
    low = max(since, before - HISTORY_ITEMS, 0)
    if low >= before:
        return []
    turns: list[tuple[int, list[Any]]] = []
    # A turn's replies come after its inbound item, perhaps after ``before`` too (two
    # messages in a row): every record of a turn from ``low`` on, by the turn's own seq.
    async for doc in store.messages.find(
            {"conversation_id": conversation_id, "seq": {"$gt": low},
             "turn.seq": {"$gte": low, "$lt": before}}, {"turn": 1}):
        record = doc.get("turn")
        if isinstance(record, dict):
            turns.append((int(record.get("seq") or 0), list(record.get("events") or [])))
    async for doc in store.db[BOT_EVENTS].find(
            {"_id": {"$gte": event_key(conversation_id, low),
                     "$lt": event_key(conversation_id, before)}},
            {"seq": 1, "events": 1}):
        turns.append((int(doc.get("seq") or 0), list(doc.get("events") or [])))
    turns.sort(key=lambda turn: turn[0])
    return [e for _, events in turns for e in events if isinstance(e, dict)]
