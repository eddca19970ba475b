"""The conversation store: MongoDB through pymongo's ``AsyncMongoClient``.

Everything that must be decided once for all gateway processes is decided here, in the
store: dedupe (an item's ``_id`` comes from its idempotency key), sequence numbers (unique
indexes on the per-conversation ``seq`` and per-contact ``contact_seq``), ownership
(conditional updates). Nothing of that lives in one process's memory.

Items are appended through the process's group-commit writer (gateway/store/writer.py):
many conversations' items share one insert, a turn's replies and its bot state one
transaction. Every item of a conversation has a ``seq`` that is contiguous and becomes
visible in order, so web chat has an exact watermark and history pages by an index
range (``seq`` in ``(top - n, top]``): the last 50 items cost the same in a conversation
of 100 or 100,000 items, even on servers that do not use an index for sort. On the hot
path items are written once and never updated: what changes (how far a conversation's
turns are processed, how far a web chat socket got, the bot's memory) lives in the
conversation's small turn state (``turn_state``), not in the conversation document.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from gateway.model import (
    Activity,
    ActivityType,
    Attachment,
    Contact,
    Conversation,
    DeliveryStatus,
    Identity,
    InboundMessage,
    OutboundDraft,
    OwnerState,
    Party,
    Role,
    TurnState,
    utcnow,
)
from gateway.store.items import (
    delivery,
    inbound_doc,
    inbound_id,
    inbound_key,
    outbound_doc,
    outbound_key,
)
from gateway.store.writer import (
    CONTACT_SEQ,
    CONVERSATION_SEQ,
    Duplicate,
    Missing,
    Op,
    Precondition,
    Unit,
    Writer,
    item_id,
    new_id,
)

log = logging.getLogger(__name__)

Doc = dict[str, Any]
M = TypeVar("M", Activity, Contact, Conversation, Identity, TurnState)

UPSERT_ATTEMPTS = 5
FREE = datetime(1970, 1, 1, tzinfo=UTC)  # a lease that expired long ago
TURN_STATE_MOVED = ("store", "turn_state_moved")  # channel_state: the migration is done


class StoreError(Exception):
    """The store could not be reached or refused an operation."""


class NotFound(StoreError):
    pass


__all__ = ["FREE", "Doc", "NotFound", "Op", "Store", "StoreError", "Unit", "from_doc",
           "inbound_key", "item_id", "new_id", "outbound_key", "to_doc"]
# Indexes of messages that are gone (their jobs moved): dropped at start-up.
OBSOLETE_INDEXES = ("idempotency", "processed_conversation", "outbox_conversation")


def from_doc(model: type[M], doc: Mapping[str, Any]) -> M:
    data = dict(doc)
    data["id"] = data.pop("_id")
    return model.model_validate(data)


def to_doc(item: Activity | Contact | Conversation | Identity) -> Doc:
    data = item.model_dump(mode="python", exclude_none=False)
    data["_id"] = data.pop("id")
    return data


# Seconds a write made while shutting down waits for the store at most: it is a courtesy
# (leases expire, a delivered mark is carried by the next), and a stop must not take a
# server-selection timeout per step when the store is gone.
SHUTDOWN_WAIT = 2.0
# How long any one command may wait for the store's answer (``socketTimeoutMS``, unless
# the connection string sets it).
SOCKET_TIMEOUT_MS = 30_000


def _uri_sets(uri: str, option: str) -> bool:
    """Whether the connection string sets ``option`` (options are case-insensitive)."""
    query = urlsplit(uri).query
    return any(key.lower() == option.lower() for key in parse_qs(query))


class Store:
    """Typed access to the collections. One per app, opened in a cleanup context."""

    def __init__(self, client: AsyncMongoClient[Doc], db_name: str) -> None:
        self.client = client
        self.db: AsyncDatabase[Doc] = client[db_name]
        self.contacts: AsyncCollection[Doc] = self.db["contacts"]
        self.identities: AsyncCollection[Doc] = self.db["identities"]
        self.conversations: AsyncCollection[Doc] = self.db["conversations"]
        # What a conversation's turns change (model.TurnState): one small document per
        # conversation, with only the _id index, so a turn's commit stays cheap.
        self.turn_state: AsyncCollection[Doc] = self.db["turn_state"]
        self.messages: AsyncCollection[Doc] = self.db["messages"]
        self.agents: AsyncCollection[Doc] = self.db["agents"]
        self.channel_state: AsyncCollection[Doc] = self.db["channel_state"]
        # Every append of this process goes through it (group commit, seq numbering).
        self.writer = Writer(self)

    @classmethod
    def connect(cls, uri: str, db_name: str, *, timeout_ms: int = 5000,
                socket_timeout_ms: int = SOCKET_TIMEOUT_MS,
                event_listeners: list[Any] | None = None) -> Store:
        # The URI's own timeouts win (keyword arguments would override them).
        timeouts: dict[str, Any] = {option: timeout_ms for option in ("serverSelectionTimeoutMS",
                                                      "connectTimeoutMS")
                    if not _uri_sets(uri, option)}
        # A store that stops answering without closing its connections (frozen, a network
        # partition) fails every waiting command after this, instead of leaving requests
        # waiting for ever (nothing on the message path takes more than a second).
        if not _uri_sets(uri, "socketTimeoutMS"):
            timeouts["socketTimeoutMS"] = socket_timeout_ms
        client: AsyncMongoClient[Doc] = AsyncMongoClient(
            uri,
            tz_aware=True,
            appname="omnigate",
            **timeouts,
            event_listeners=list(event_listeners or ()),
        )
        return cls(client, db_name)

    async def close(self) -> None:
        await self.writer.close()
        await self.client.close()

    async def ping(self) -> bool:
        try:
            await self.db.command("ping")
        except PyMongoError:
            return False
        return True

    async def ensure_indexes(self) -> None:
        await self.messages.create_indexes(
            [
                # The names are the default ones (older databases have them so), and the
                # writer tells a stale seq from a duplicate item by the index an insert hit.
                IndexModel([("conversation_id", ASCENDING), ("seq", ASCENDING)], unique=True,
                           name=CONVERSATION_SEQ),
                IndexModel([("contact_id", ASCENDING), ("contact_seq", ASCENDING)],
                           unique=True, name=CONTACT_SEQ),
                # The pipeline's sweeper finds recent inbound items left unprocessed.
                IndexModel([("direction", ASCENDING), ("created_at", ASCENDING)],
                           name="recent"),
                IndexModel(
                    [("delivery.status", ASCENDING), ("delivery.next_attempt_at", ASCENDING)],
                    name="outbox_due",
                ),
            ]
        )
        await self.conversations.create_indexes(
            [
                IndexModel([("channel", ASCENDING), ("thread_key", ASCENDING)], unique=True),
                IndexModel([("owner", ASCENDING), ("handoff.requested_at", ASCENDING)]),
                IndexModel([("assignee_id", ASCENDING), ("owner", ASCENDING)]),
                IndexModel([("contact_id", ASCENDING)]),
            ]
        )
        await self.identities.create_indexes([IndexModel([("contact_id", ASCENDING)])])
        await self.agents.create_indexes(
            [IndexModel([("token_hash", ASCENDING)], unique=True, name="agent_token")]
        )
        await self._migrate()

    async def _migrate(self) -> None:
        """From before 2026-12: items carried a ``processed`` flag (now the conversation's
        ``processed_seq``) and had random ids deduplicated by a unique ``idem_key`` index
        (now the id comes from the key). Moves the flags over once, drops the old indexes.
        """
        names = {i["name"] async for i in await self.messages.list_indexes()}
        if "processed_conversation" in names:
            waiting = await self.messages.distinct("conversation_id", {"processed": False})
            for cid in waiting:
                docs = await self.messages.find(
                    {"processed": False, "conversation_id": cid}, {"seq": 1}).to_list()
                first = min(int(d["seq"]) for d in docs) if docs else 1
                await self.conversations.update_one(
                    {"_id": cid, "processed_seq": {"$exists": False}},
                    {"$set": {"processed_seq": first - 1}})
            async for doc in self.conversations.find(
                    {"processed_seq": {"$exists": False}}, {"seq": 1}):
                await self.conversations.update_one(
                    {"_id": doc["_id"], "processed_seq": {"$exists": False}},
                    {"$set": {"processed_seq": int(doc.get("seq") or 0)}})
            log.info("store: moved processed flags of %d conversation(s) to processed_seq",
                     len(waiting))
        await self._migrate_turn_state()
        for name in OBSOLETE_INDEXES:
            if name in names:
                try:
                    await self.messages.drop_index(name)
                except OperationFailure as exc:  # another process dropped it first
                    log.debug("store: index %s: %s", name, exc)

    async def _migrate_turn_state(self) -> None:
        """From before 2026-12-04 the turn state (bot memory, processed and delivered
        marks, lease) was part of the conversation: copied to ``turn_state`` once, then
        removed from the conversation. Safe to run by several processes at once. Once done,
        a mark in ``channel_state`` says so: later start-ups do not scan the conversations
        again (no index has ``bot_state``)."""
        if await self.get_state(*TURN_STATE_MOVED) is not None:
            return
        moved = 0
        async for doc in self.conversations.find(
                {"bot_state": {"$exists": True}},
                {"owner": 1, "bot_state": 1, "processed_seq": 1, "delivered_seq": 1,
                 "lease": 1}):
            state = turn_state_doc(str(doc["_id"]), OwnerState(doc.get("owner") or "bot"))
            state.update({k: doc[k] for k in ("bot_state", "processed_seq", "delivered_seq")
                          if doc.get(k) is not None})
            if isinstance(doc.get("lease"), dict):
                state["lease"] = doc["lease"]
            with contextlib.suppress(DuplicateKeyError):
                await self.turn_state.insert_one(state)
            await self.conversations.update_one(
                {"_id": doc["_id"]},
                {"$unset": {"bot_state": "", "processed_seq": "", "delivered_seq": "",
                            "lease": ""}})
            moved += 1
        if moved:
            log.info("store: moved the turn state of %d conversation(s) to turn_state", moved)
        await self.put_state(*TURN_STATE_MOVED, {"moved": moved})

    @staticmethod
    async def _upsert(
        collection: AsyncCollection[Doc], query: Mapping[str, Any], on_insert: Mapping[str, Any]
    ) -> tuple[Doc, bool]:
        """The document matching ``query``, inserted with ``on_insert`` if there is none.

        Returns (document, inserted by this call). Reads first: the common case is that it
        exists. Concurrent upserts of one key race: MongoDB may fail the loser with a
        duplicate key error; either way the winner's document exists by then, so read it.
        (Plain update + find, not findAndModify: SecantusDB 0.7 runs findAndModify as a
        collection scan, so it would get slower with every conversation.)
        """
        for _ in range(UPSERT_ATTEMPTS):
            doc = await collection.find_one(query)
            if doc is not None:
                return doc, False
            try:
                result = await collection.update_one(
                    query, {"$setOnInsert": dict(on_insert)}, upsert=True
                )
            except DuplicateKeyError:
                continue
            doc = await collection.find_one(query)
            if doc is not None:
                return doc, result.upserted_id is not None
        raise StoreError(f"{collection.name}: upsert of {dict(query)} returned no document")

    # ----------------------------------------------------------------- contacts

    async def resolve_identity(
        self, channel: str, external_id: str, display_name: str | None = None
    ) -> Identity:
        """The identity for (channel, external id), creating it and its contact if new."""
        key = f"{channel}:{external_id}"
        doc = await self.identities.find_one({"_id": key})
        if doc is not None:
            return from_doc(Identity, doc)
        # New: create the contact first, so an identity never points to nothing; if a
        # concurrent caller's identity won, drop the contact we made.
        now = utcnow()
        contact_id = new_id()
        await self.contacts.insert_one(
            {"_id": contact_id, "name": display_name, "profile": {}, "seq": 0,
             "created_at": now}
        )
        doc, inserted = await self._upsert(
            self.identities,
            {"_id": key},
            {
                "channel": channel,
                "external_id": external_id,
                "contact_id": contact_id,
                "reachable": True,
                "created_at": now,
                "display_name": display_name,
            },
        )
        if not inserted and doc["contact_id"] != contact_id:
            await self.contacts.delete_one({"_id": contact_id, "seq": 0})
        return from_doc(Identity, doc)

    async def link_identity(
        self, channel: str, external_id: str, contact_id: str, display_name: str | None = None
    ) -> Identity:
        """Make (channel, external id) an identity of ``contact_id`` (created, or moved from
        the contact it had, with its conversations on that channel, so its next message
        is the contact's): the same person, known on one more channel."""
        key = f"{channel}:{external_id}"
        had = await self.identities.find_one({"_id": key})
        await self.identities.update_one(
            {"_id": key},
            {"$set": {"contact_id": contact_id},
             "$setOnInsert": {"channel": channel, "external_id": external_id,
                              "reachable": True, "created_at": utcnow(),
                              "display_name": display_name}},
            upsert=True,
        )
        if had is not None and had["contact_id"] != contact_id:
            await self.conversations.update_many(
                {"channel": channel, "contact_id": had["contact_id"]},
                {"$set": {"contact_id": contact_id}})
        doc = await self.identities.find_one({"_id": key})
        if doc is None:
            raise StoreError(f"identities: linking {key} returned no document")
        return from_doc(Identity, doc)

    async def update_profile(self, contact_id: str, changes: Mapping[str, Any]) -> None:
        """Set (or, for None, remove) keys of the contact's profile."""
        update = profile_update(changes)
        if update:
            await self.contacts.update_one({"_id": contact_id}, update)

    async def set_identity_reachable(
        self, channel: str, external_id: str, reachable: bool, reason: str | None = None
    ) -> None:
        """Mark a channel identity (un)reachable: the bot blocked, the chat deleted, ..."""
        await self.identities.update_one(
            {"_id": f"{channel}:{external_id}"},
            {"$set": {"reachable": reachable, "unreachable_reason": reason}},
        )

    async def get_contact(
        self, contact_id: str, *, with_identities: bool = True
    ) -> Contact | None:
        doc = await self.contacts.find_one({"_id": contact_id})
        if doc is None:
            return None
        contact = from_doc(Contact, doc)
        if with_identities:
            contact.identities = [
                from_doc(Identity, d)
                async for d in self.identities.find({"contact_id": contact_id})
            ]
        return contact

    # ------------------------------------------------------------ conversations

    async def resolve_conversation(
        self, channel: str, thread_key: str, contact_id: str, *, one_to_one: bool = False
    ) -> Conversation:
        """The conversation for (channel, thread key), created in the bot's hands if new
        (``one_to_one``: only the customer and we are in that thread)."""
        now = utcnow()
        doc, created = await self._upsert(
            self.conversations,
            {"channel": channel, "thread_key": thread_key},
            {
                "_id": new_id(),
                "contact_id": contact_id,
                "owner": OwnerState.BOT.value,
                "assignee_id": None,
                "handoff": None,
                "seq": 0,
                "created_at": now,
                "updated_at": now,
                "last_activity_at": None,
                "one_to_one": one_to_one,
            },
        )
        if created:  # its turn state; if this is lost, Turns.acquire writes it
            with contextlib.suppress(DuplicateKeyError):
                await self.turn_state.insert_one(turn_state_doc(doc["_id"], OwnerState.BOT))
        return from_doc(Conversation, doc)

    async def find_conversation(self, channel: str, thread_key: str) -> Conversation | None:
        doc = await self.conversations.find_one({"channel": channel, "thread_key": thread_key})
        return None if doc is None else from_doc(Conversation, doc)

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        doc = await self.conversations.find_one({"_id": conversation_id})
        return None if doc is None else from_doc(Conversation, doc)

    async def transition(
        self,
        conversation_id: str,
        expected: set[OwnerState],
        to: OwnerState,
        *,
        also: Mapping[str, Any] | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> Conversation | None:
        """Change the owner state atomically if it is one of ``expected`` (and ``where``),
        with an ``owner`` event in the same unit (as every owner change: a bot turn's
        fenced commit sees it, gateway/store/turn_records.py). The desk's changes go
        through ``Routing`` (their events say more); this one is the bare change.

        Returns the updated conversation, or None if the conversation was not in an
        expected state: of two concurrent callers, exactly one wins.
        """
        conversation = await self.get_conversation(conversation_id)
        if conversation is None:
            return None
        now = utcnow()
        event = outbound_doc(conversation, OutboundDraft(
            type=ActivityType.EVENT, sender=Party(role=Role.SYSTEM), name="owner",
            text=to.value), now, delivery(DeliveryStatus.SKIPPED, now))
        try:
            await self.append(conversation_id, [event], transition_ops(
                conversation_id, expected, to, now, also=also, where=where))
        except Precondition:
            return None
        return await self.get_conversation(conversation_id)

    async def get_turn_checkpoint(self, conversation_id: str) -> TurnState | None:
        """The turn state as last written; what is current is this and the turn records
        after it (``turn_records.current``)."""
        doc = await self.turn_state.find_one({"_id": conversation_id})
        return None if doc is None else from_doc(TurnState, doc)

    async def set_bot_state(self, conversation_id: str, state: Mapping[str, Any]) -> bool:
        """Save the bot's memory, only while the bot still owns the conversation."""
        result = await self.turn_state.update_one(
            {"_id": conversation_id, "owner": OwnerState.BOT.value},
            {"$set": {"bot_state": dict(state)}},
        )
        return result.matched_count == 1

    async def list_conversations(
        self, owners: list[OwnerState], *, assignee_id: str | None = None,
        label: str | None = None, limit: int = 100,
    ) -> list[Conversation]:
        query: Doc = {"owner": {"$in": [o.value for o in owners]}}
        if assignee_id is not None:
            query["assignee_id"] = assignee_id
        if label is not None:
            query["labels"] = label
        cursor = self.conversations.find(query).sort(
            [("handoff.requested_at", ASCENDING), ("_id", ASCENDING)]
        )
        return [from_doc(Conversation, d) async for d in cursor.limit(limit)]

    # ----------------------------------------------------------------- messages

    async def find_by_external_id(self, channel: str, external_id: str) -> Activity | None:
        return await self.get_message(inbound_id(channel, external_id))

    async def find_by_dedupe_key(self, key: str) -> Activity | None:
        return await self.get_message(item_id(outbound_key(key)))

    async def get_message(self, message_id: str) -> Activity | None:
        doc = await self.messages.find_one({"_id": message_id})
        return None if doc is None else from_doc(Activity, doc)

    async def append(
        self, conversation_id: str, docs: list[Doc], ops: list[Op] | None = None,
        *, fence: int | None = None,
    ) -> list[Activity]:
        """Append items (built by gateway/store/items.py) and apply ``ops``, together;
        ``fence``: only if nothing but inbound items came after that seq (Unit.fence).

        Raises ``Duplicate`` (an item is stored already: nothing written), ``Precondition``
        (a required op matched nothing, or the fence), NotFound, or the store's error."""
        try:
            stored = await self.writer.submit(
                Unit(conversation_id, docs, list(ops or []), fence=fence))
        except Missing as exc:
            raise NotFound(str(exc)) from exc
        return [from_doc(Activity, d) for d in stored]

    async def apply(self, ops: list[Op]) -> None:
        """Apply updates with the next group commit (in one transaction)."""
        if ops:
            await self.writer.submit(Unit(None, [], ops))

    async def append_inbound(
        self, conversation: Conversation, message: InboundMessage, *, checked: bool = False,
        attachments: list[Attachment] | None = None, ops: list[Op] | None = None,
    ) -> tuple[Activity, bool]:
        """Store an inbound message once. Returns (stored item, was it a duplicate).
        ``attachments``: its files as kept (gateway/files.py; default: the message's
        own list), ``ops`` written with it (the files' fetch jobs).

        (``checked`` is accepted for callers that looked it up first; the id does the
        dedupe either way.)"""
        del checked
        reply_to: str | None = None
        if message.reply_to_external_id:
            parent = await self.find_by_external_id(message.channel, message.reply_to_external_id)
            reply_to = parent.id if parent else None
        doc = inbound_doc(message, utcnow(), reply_to)
        if attachments is not None:
            doc["attachments"] = [a.model_dump(mode="python") for a in attachments]
        try:
            return (await self.append(conversation.id, [doc], ops))[0], False
        except Duplicate:
            existing = await self.get_message(doc["_id"])
            if existing is None:  # pragma: no cover - it collided, so it exists
                raise
            return existing, True

    async def append_outbound(
        self, conversation: Conversation, draft: OutboundDraft, delivery_doc: Doc | None = None
    ) -> tuple[Activity, bool]:
        """Store an outbound item (pending delivery unless told otherwise), once per
        ``dedupe_key``. ``conversation`` as its channel addresses it."""
        now = utcnow()
        doc = outbound_doc(conversation, draft, now,
                           delivery_doc or delivery(DeliveryStatus.PENDING, now))
        try:
            return (await self.append(conversation.id, [doc]))[0], False
        except Duplicate:
            existing = await self.get_message(doc["_id"])
            if existing is None:  # pragma: no cover
                raise
            return existing, True

    async def _append(self, conversation_id: str, doc: Doc) -> Activity:
        """Append one item; DuplicateKeyError if it is stored already (its id)."""
        try:
            return (await self.append(conversation_id, [doc]))[0]
        except Duplicate as exc:
            raise DuplicateKeyError(str(exc), 11000) from exc

    async def edit_inbound(
        self, channel: str, external_id: str, text: str | None,
        channel_data: Mapping[str, Any] | None = None,
    ) -> Activity | None:
        """The customer edited a message on their channel: store the new text, keep the old.

        Returns the updated item, or None if the original was never stored.
        """
        key = inbound_id(channel, external_id)
        current = await self.messages.find_one({"_id": key}, {"text": 1})
        if current is None:
            return None
        update: Doc = {"$set": {"text": text},
                       "$push": {"edits": {"text": current.get("text"), "edited_at": utcnow()}}}
        if channel_data is not None:
            update["$set"]["channel_data.edited"] = dict(channel_data)
        await self.messages.update_one({"_id": key}, update)
        doc = await self.messages.find_one({"_id": key})
        if doc is None:
            return None
        from gateway.store.search import SearchTerms  # noqa: PLC0415 (it imports this)

        await SearchTerms(self).replace(doc)  # found by its words now
        return from_doc(Activity, doc)

    async def set_parts_sent(self, message_id: str, parts: int) -> None:
        """Record that the first ``parts`` parts of an outbound item went out, so a retry
        after a failure in the middle sends only the rest (never a part twice)."""
        await self.messages.update_one(
            {"_id": message_id}, {"$set": {"delivery.parts_sent": parts}}
        )

    # ------------------------------------------------------------------ history

    async def top_seq(self, conversation_id: str) -> int:
        """The conversation's last seq: its hint, and what is stored above it."""
        conv = await self.conversations.find_one({"_id": conversation_id}, {"seq": 1})
        if conv is None:
            raise NotFound(f"conversation {conversation_id} does not exist")
        return await self.seq_above(conversation_id, int(conv.get("seq") or 0))

    async def seq_above(self, conversation_id: str, hint: int, *,
                        session: AsyncClientSession | None = None) -> int:
        """The conversation's last seq, from its ``seq`` hint (``Conversation.seq``, read
        already): the hint and what is stored above it (an index range of < HINT_EVERY
        keys, the hint being written every HINT_EVERY items)."""
        above = await self.messages.find(
            {"conversation_id": conversation_id, "seq": {"$gt": hint}}, {"seq": 1},
            session=session).to_list()
        return max([hint, *(int(d["seq"]) for d in above)])

    async def contact_top(self, contact_id: str) -> int | None:
        """The contact's last contact_seq (None: no such contact)."""
        doc = await self.contacts.find_one({"_id": contact_id}, {"seq": 1})
        if doc is None:
            return None
        hint = int(doc.get("seq") or 0)
        above = await self.messages.find(
            {"contact_id": contact_id, "contact_seq": {"$gt": hint}},
            {"contact_seq": 1}).to_list()
        return max([hint, *(int(d["contact_seq"]) for d in above)])

    async def items_after(
        self, conversation_id: str, after: int, limit: int = 1000
    ) -> list[Activity]:
        """Items with ``seq > after``, oldest first (at most ``limit``)."""
        cursor = self.messages.find(
            {"conversation_id": conversation_id, "seq": {"$gt": after, "$lte": after + limit}}
        )
        return [from_doc(Activity, d) for d in await cursor.sort("seq", ASCENDING).to_list()]

    async def history(
        self, conversation_id: str, *, before: int | None = None, limit: int = 50
    ) -> tuple[list[Activity], bool]:
        """A page of a conversation, newest first: items with ``seq < before``.

        Returns (items, has_more). Costs one index range scan of ``limit`` keys.
        """
        top = await self.top_seq(conversation_id) + 1
        return await self._page("conversation_id", conversation_id, "seq",
                                before=min(before or top, top), limit=limit)

    async def contact_timeline(
        self, contact_id: str, *, before: int | None = None, limit: int = 50
    ) -> tuple[list[Activity], bool]:
        """A page of everything a contact said and was told, on every channel, newest first."""
        last = await self.contact_top(contact_id)
        if last is None:
            raise NotFound(f"contact {contact_id} does not exist")
        top = last + 1
        return await self._page("contact_id", contact_id, "contact_seq",
                                before=min(before or top, top), limit=limit)

    async def _page(
        self, key: str, value: str, counter: str, *, before: int, limit: int
    ) -> tuple[list[Activity], bool]:
        top = before - 1
        window = limit
        while True:
            low = max(0, top - window)
            cursor = self.messages.find({key: value, counter: {"$gt": low, "$lte": top}})
            docs = await cursor.sort(counter, DESCENDING).to_list()
            # Counters have no gaps unless items were deleted; widen the window if they do.
            if len(docs) >= limit or low == 0:
                break
            window *= 4
        items = [from_doc(Activity, d) for d in docs[:limit]]
        has_more = bool(items) and int(getattr(items[-1], counter)) > 1
        return items, has_more

    # ------------------------------------------------------------ channel state

    async def get_state(self, channel: str, key: str) -> Doc | None:
        return await self.channel_state.find_one({"_id": f"{channel}:{key}"})

    async def put_state(self, channel: str, key: str, value: Mapping[str, Any]) -> None:
        await self.channel_state.update_one(
            {"_id": f"{channel}:{key}"}, {"$set": {**value, "updated_at": utcnow()}}, upsert=True
        )


def turn_state_doc(conversation_id: str, owner: OwnerState) -> Doc:
    """A conversation's turn state as it starts (model.TurnState)."""
    return {"_id": conversation_id, "owner": owner.value, "bot_state": {}, "epoch": 0,
            "processed_seq": 0, "delivered_seq": 0, "lease": {"owner": None, "until": FREE}}


def owner_copy_op(conversation_id: str, to: OwnerState, *, reset_bot: bool = False) -> Op:
    """The turn state's copy of the owner (and, ``reset_bot``, the bot's memory cleared:
    a new epoch, so turn records from before no longer count): written in the same unit
    as every owner change, so a bot turn's commit, which requires the copy to say "bot",
    conflicts with the change. Upserted: a conversation whose turn state was never
    written gets one."""
    sets: Doc = {"owner": to.value}
    update: Doc = {"$set": sets}
    if reset_bot:
        sets["bot_state"] = {}
        update["$inc"] = {"epoch": 1}
    update["$setOnInsert"] = {k: v for k, v in turn_state_doc(conversation_id, to).items()
                              if k not in sets and k != "_id"
                              and not (reset_bot and k == "epoch")}
    return Op("turn_state", {"_id": conversation_id}, update, upsert=True)


def epoch_is(epoch: int) -> Doc:
    """A filter on the turn state's epoch (written by older versions without one: 0)."""
    return {"epoch": epoch} if epoch else {"epoch": {"$in": [0, None]}}


def transition_ops(
    conversation_id: str, expected: set[OwnerState], to: OwnerState, now: datetime, *,
    also: Mapping[str, Any] | None = None, where: Mapping[str, Any] | None = None,
    reset_bot: bool = False,
) -> list[Op]:
    """The owner becomes ``to`` only if it is one of ``expected`` (and ``where``): a
    required update, with the turn state's copy of the owner (``Store.transition`` alone,
    ``QueueStore.move_ops`` in a unit)."""
    query: Doc = {"_id": conversation_id,
                  "owner": {"$in": [s.value for s in expected]}, **(where or {})}
    update: Doc = {"owner": to.value, "updated_at": now, **(also or {})}
    return [Op("conversations", query, {"$set": update}, required=True),
            owner_copy_op(conversation_id, to, reset_bot=reset_bot)]


def profile_update(changes: Mapping[str, Any]) -> Doc:
    """The update that sets (or, for None, removes) keys of a contact's profile, and marks
    when it changed (``profile_at``: other processes' change feeds see it)."""
    sets: Doc = {f"profile.{k}": v for k, v in changes.items() if v is not None}
    unsets = {f"profile.{k}": "" for k, v in changes.items() if v is None}
    if not sets and not unsets:
        return {}
    update: Doc = {"$set": {**sets, "profile_at": utcnow()}}
    if unsets:
        update["$unset"] = unsets
    return update
