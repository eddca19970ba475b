"""How changes reach every gateway process: one MongoDB change stream per process.

Several gateway processes share one store. A conversation claimed in process A must show
up live on an agent socket held by process B, and a customer typing on B's web chat socket
must reach an agent on A. So nothing is broadcast in memory: every process watches the
store's change stream (``db.watch()``; SecantusDB 0.7 and MongoDB replica sets both have
it) and hands each change to its local listeners: the console hub (gateway/desk/live.py),
the pipeline (a message stored by another process in a conversation whose turns this one
runs; cached conversations and profiles that changed), the web chat (an item for a visitor
whose socket is open here, whichever process stored it).

What the stream carries (filtered in the server by one ``$match``):

- ``conversation``: a conversation created, or its ``owner`` or ``assignee_id`` changed
  (queued, assigned, transferred, resolved, back to the bot), or where its replies go
  (``reply_channel``: a channel switch), whose it is (``contact_id``: a merge) or its
  ``labels``. Not the many updates of its bot state, counters and leases.
- ``contact``: a contact's profile changed (``profile_at``).
- ``item``: a new item of a conversation (message, event, private note): the whole
  document; or an item whose files changed (``files_at`` in ``fields``: a file the
  fetcher downloaded, or could not; no document: read it again).
- ``agent``: an agent's ``presence``, ``role`` or ``active`` changed, or a new agent.
- ``signal``: an ephemeral signal such as "the customer is typing" (``publish``):
  inserted in ``live_signals`` so it travels through the same stream; old ones are
  deleted after a minute.
- ``resync``: the stream had to start afresh (its resume point was lost, or the database
  was dropped): changes may have been missed, listeners should reload their state.

A dropped connection is resumed from the last resume token, so no change is lost or
repeated; ``ready()`` waits until the stream is open (changes from then on are seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.errors import OperationFailure, PyMongoError

from gateway.aio import cancel_and_wait, raise_if_cancelled
from gateway.model import utcnow
from gateway.store import Store
from gateway.store.mongo import new_id

log = logging.getLogger(__name__)

SIGNALS = "live_signals"
SIGNAL_TTL = timedelta(seconds=60)
CLEAN_EVERY = 30.0  # seconds between deletions of old signals (per process)
REPEAT_AFTER = 2.0  # the same typing state again within this many seconds is not sent


class ChangeKind(StrEnum):
    CONVERSATION = "conversation"
    ITEM = "item"
    CONTACT = "contact"
    AGENT = "agent"
    SIGNAL = "signal"
    RESYNC = "resync"


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    id: str = ""  # the conversation's, item's, agent's or signal's id
    fields: dict[str, Any] = field(default_factory=dict)  # changed fields (update)
    doc: dict[str, Any] | None = None  # the whole document (insert)
    removed: tuple[str, ...] = ()  # removed fields (update)


Listener = Callable[[Change], Awaitable[None]]

_COLLECTIONS = {
    "conversations": ChangeKind.CONVERSATION,
    "messages": ChangeKind.ITEM,
    "contacts": ChangeKind.CONTACT,
    "agents": ChangeKind.AGENT,
    SIGNALS: ChangeKind.SIGNAL,
}


def _changed(coll: str, *names: str) -> list[dict[str, Any]]:
    return [{"ns.coll": coll, "operationType": "update",
             f"updateDescription.updatedFields.{n}": {"$exists": True}} for n in names]


# One $match, evaluated by the server: only the changes listeners care about travel.
_INSERTS = [c for c in _COLLECTIONS if c != "contacts"]
PIPELINE: list[dict[str, Any]] = [{"$match": {"$or": [
    {"ns.coll": {"$in": _INSERTS}, "operationType": "insert"},
    {"operationType": "invalidate"},
    *_changed("conversations", "owner", "assignee_id", "reply_channel", "contact_id",
              "labels"),
    *_changed("messages", "files_at"),
    *_changed("contacts", "profile_at"),
    *_changed("agents", "presence", "role", "active"),
]}}]


class Feed:
    """The process's change stream, shared by its listeners. Start once, in the app."""

    def __init__(self, store: Store, *, max_await_ms: int = 1000) -> None:
        self.store = store
        self.max_await_ms = max_await_ms
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._open = asyncio.Event()
        self._token: Any = None
        self._typing: dict[tuple[str, str], tuple[bool, float]] = {}
        self._cleaned = 0.0

    # --------------------------------------------------------------- listeners

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every change, in order; returns the unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def ready(self, wait: float = 5.0) -> bool:
        """Wait (at most ``wait`` s) until the stream is open: every change stored after
        this is seen."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._open.wait()
        return self._open.is_set()

    # ------------------------------------------------------------------ signals

    async def publish(self, data: dict[str, Any]) -> None:
        """Send an ephemeral signal to every process's listeners (kind ``signal``)."""
        now = utcnow()
        await self.store.db[SIGNALS].insert_one({"_id": new_id(), "at": now, **data})
        if time.monotonic() - self._cleaned > CLEAN_EVERY:
            self._cleaned = time.monotonic()
            await self.store.db[SIGNALS].delete_many({"at": {"$lt": now - SIGNAL_TTL}})

    async def typing(self, conversation_id: str, who: str, on: bool, **data: Any) -> bool:
        """``who`` (``customer`` or ``agent:<id>``) started or stopped typing. Repeats of
        the same state within ``REPEAT_AFTER`` seconds are dropped here (clients send
        "typing" while keys are pressed); returns whether a signal was sent."""
        key, now = (conversation_id, who), time.monotonic()
        last = self._typing.get(key)
        if last is not None and last[0] == on and now - last[1] < REPEAT_AFTER:
            return False
        self._typing[key] = (on, now)
        if len(self._typing) > 10_000:  # forget the old ones
            self._typing = {k: v for k, v in self._typing.items() if now - v[1] < 60}
        await self.publish({"kind": "typing", "conversation_id": conversation_id,
                            "who": who, "on": on, **data})
        return True

    # ------------------------------------------------------------------- stream

    async def ensure_indexes(self) -> None:
        await self.store.db[SIGNALS].create_indexes([IndexModel([("at", ASCENDING)])])

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="live-feed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)

    async def _run(self) -> None:
        delay = 0.2
        indexed = False
        while True:
            try:
                if not indexed:
                    await self.ensure_indexes()
                    indexed = True
                await self._watch()
                delay = 0.2
            except OperationFailure as exc:
                raise_if_cancelled()
                if self._token is not None:  # the resume point is gone: start afresh
                    log.warning("live feed: cannot resume (%s); starting afresh", exc)
                    self._token = None
                    await self._emit(Change(ChangeKind.RESYNC))
                    continue
                log.warning("live feed: the store refused the change stream: %s", exc)
            except PyMongoError as exc:
                raise_if_cancelled()
                log.warning("live feed: store unavailable (%s); retrying in %.1f s", exc, delay)
            self._open.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _watch(self) -> None:
        db = self.store.db
        async with await db.watch(PIPELINE, resume_after=self._token,
                                  max_await_time_ms=self.max_await_ms) as stream:
            if self._token is None:
                self._token = stream.resume_token
            self._open.set()
            while True:
                change = await stream.try_next()
                if change is not None and change.get("operationType") == "invalidate":
                    log.warning("live feed: the stream was invalidated; starting afresh")
                    self._token = None
                    await self._emit(Change(ChangeKind.RESYNC))
                    return
                if change is not None:
                    await self._dispatch(change)
                self._token = stream.resume_token

    async def _dispatch(self, raw: dict[str, Any]) -> None:
        kind = _COLLECTIONS.get(str(raw.get("ns", {}).get("coll")))
        key = raw.get("documentKey", {}).get("_id")
        if kind is None or key is None:
            return
        described = raw.get("updateDescription", {})
        fields = dict(described.get("updatedFields", {}))
        removed = tuple(str(name) for name in described.get("removedFields", ()))
        await self._emit(Change(kind, str(key), fields, raw.get("fullDocument"),
                                 removed=removed))

    async def _emit(self, change: Change) -> None:
        for listener in list(self._listeners):
            try:
                await listener(change)
            except PyMongoError:
                raise  # the store: the stream resumes from the last token and retries
            except Exception:
                log.exception("live feed: a listener failed on %s %s", change.kind, change.id)
