"""The bot's event log, kept apart from its memory.

A custom action gets the conversation so far as Rasa events (``flows.ports.ActionCall``).
That log grows with every turn, while the rest of the bot's memory (``bot_state``) is a
few hundred bytes; kept inside the memory, every turn's commit rewrote the whole log (on
the embedded store an update copies, diffs and re-encodes the whole document: 18 KB per
turn at 40 entries, BENCHMARKS.md). So each bot turn's new entries (``BotTurn.events``)
are one document of their own in ``bot_events``, inserted in the turn's own commit and
never updated, and the log is read back only when an action runs.

A document's ``_id`` is the conversation id and the turn's inbound seq (zero-padded), so
a conversation's recent entries are one ``_id`` range, on the one index the collection
has. The log starts afresh when the bot's memory is cleared (hand back, reopen):
``TurnState.bot_since`` is the seq of the first turn after that.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.store.mongo import Op, Store

BOT_EVENTS = "bot_events"
# How far back (in a conversation's items) the log is read: its last 40 entries are
# about 20 bot turns, each with its replies; agents' messages take seqs too.
HISTORY_ITEMS = 400


def event_key(conversation_id: str, seq: int) -> str:
    return f"{conversation_id}:{seq:012d}"


def events_op(conversation_id: str, seq: int, events: list[dict[str, Any]],
              at: datetime) -> Op:
    """The turn's entries, written with its commit; a re-run of the same turn (the same
    inbound seq) keeps the first (``$setOnInsert``)."""
    return Op(BOT_EVENTS, {"_id": event_key(conversation_id, seq)},
              {"$setOnInsert": {"conversation_id": conversation_id, "seq": seq,
                                "events": events, "at": at}}, upsert=True)


async def history(store: Store, conversation_id: str, since: int,
                  before: int) -> list[dict[str, Any]]:
    """The entries of the turns with seq in ``[since, before)`` (the most recent
    HISTORY_ITEMS items at most), oldest first."""
    low = max(since, before - HISTORY_ITEMS, 0)
    if low >= before:
        return []
    docs = await store.db[BOT_EVENTS].find(
        {"_id": {"$gte": event_key(conversation_id, low),
                 "$lt": event_key(conversation_id, before)}},
        {"seq": 1, "events": 1},
    ).to_list()
    docs.sort(key=lambda d: int(d.get("seq") or 0))
    return [e for d in docs for e in d.get("events") or [] if isinstance(e, dict)]
