"""The bot's event log, kept apart from its memory and written with the replies.

A custom action gets the conversation so far as Rasa events (``flows.ports.ActionCall``).
That log grows with every turn, while the rest of the bot's memory (``bot_state``) is a
few hundred bytes; kept inside the memory, every turn's commit rewrote the whole log (on
the embedded store an update copies, diffs and re-encodes the whole document: 18 KB per
turn at 40 entries, BENCHMARKS.md). So each bot turn's new entries (``BotTurn.events``)
are written once, with the turn's own commit, and read back only when an action runs:

- on the turn's first reply (the item's ``bot_events``: the turn's inbound seq and its
  entries), which the commit inserts anyway: no statement of its own, as Rasa's tracker
  keeps a turn's events beside its bot utterances;
- a turn without a reply has nothing to carry them: one ``bot_events`` document, ``_id``
  the conversation id and the turn's inbound seq (zero-padded), upserted with the commit.

The log starts afresh when the bot's memory is cleared (hand back, reopen):
``TurnState.bot_since`` is the seq of the first turn after that.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.store.mongo import Doc, Op, Store

BOT_EVENTS = "bot_events"
# How far back (in a conversation's items) the log is read: its last 40 entries are
# about 20 bot turns, each with its replies; agents' messages take seqs too.
HISTORY_ITEMS = 400


def event_key(conversation_id: str, seq: int) -> str:
    return f"{conversation_id}:{seq:012d}"


def keep_events(conversation_id: str, seq: int, events: list[dict[str, Any]],
                replies: list[Doc], at: datetime) -> Op | None:
    """Keep the turn of inbound ``seq``'s entries with its commit: on its first reply
    (``replies``, the items the commit inserts; None returned), else the ``bot_events``
    upsert to add to the commit. A re-run of the same turn stores nothing twice: its
    replies collide as a whole, the upsert keeps the first (``$setOnInsert``)."""
    if not events:
        return None
    if replies:
        replies[0]["bot_events"] = {"seq": seq, "events": events}
        return None
    return Op(BOT_EVENTS, {"_id": event_key(conversation_id, seq)},
              {"$setOnInsert": {"conversation_id": conversation_id, "seq": seq,
                                "events": events, "at": at}}, upsert=True)


async def history(store: Store, conversation_id: str, since: int,
                  before: int) -> list[dict[str, Any]]:
    """The entries of the turns with inbound seq in ``[since, before)`` (the most recent
    HISTORY_ITEMS items at most), oldest first."""
    low = max(since, before - HISTORY_ITEMS, 0)
    if low >= before:
        return []
    turns: list[tuple[int, list[Any]]] = []
    # A turn's replies come after its inbound item, perhaps after ``before`` too (two
    # messages in a row): every item from ``low`` on, filtered by the turn's own seq.
    async for doc in store.messages.find(
            {"conversation_id": conversation_id, "seq": {"$gt": low},
             "bot_events": {"$exists": True}}, {"bot_events": 1}):
        logged = doc.get("bot_events")
        if isinstance(logged, dict) and low <= int(logged.get("seq") or 0) < before:
            turns.append((int(logged["seq"]), list(logged.get("events") or [])))
    async for doc in store.db[BOT_EVENTS].find(
            {"_id": {"$gte": event_key(conversation_id, low),
                     "$lt": event_key(conversation_id, before)}},
            {"seq": 1, "events": 1}):
        turns.append((int(doc.get("seq") or 0), list(doc.get("events") or [])))
    turns.sort(key=lambda turn: turn[0])
    return [e for _, events in turns for e in events if isinstance(e, dict)]
