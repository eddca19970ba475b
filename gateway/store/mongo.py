"""The conversation store: MongoDB through pymongo's ``AsyncMongoClient``.

Everything that must be decided once for all gateway processes is decided here, in the
store: dedupe (unique indexes), sequence numbers (a transaction per append), ownership
(conditional updates). Nothing of that lives in one process's memory.

Append is a transaction: increment the conversation's and the contact's counters and insert
the item. So every item of a conversation has a ``seq`` that is contiguous and becomes
visible in order (a concurrent append conflicts on the conversation document and retries
after this one commits). That gives web chat an exact watermark, and history pages by an
index range (``seq`` in ``(top - n, top]``), so the last 50 items cost the same in a
conversation of 100 or 100,000 items — even on servers that do not use an index for sort.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from gateway.aio import KeyedLocks
from gateway.model import (
    Activity,
    ActivityType,
    Contact,
    Conversation,
    ConversationRef,
    Delivery,
    Direction,
    Identity,
    InboundMessage,
    OutboundDraft,
    OwnerState,
    utcnow,
)

log = logging.getLogger(__name__)

Doc = dict[str, Any]
M = TypeVar("M", Activity, Contact, Conversation, Identity)

UPSERT_ATTEMPTS = 5
FREE = datetime(1970, 1, 1, tzinfo=UTC)  # a lease that expired long ago


class StoreError(Exception):
    """The store could not be reached or refused an operation."""


class NotFound(StoreError):
    pass


def new_id() -> str:
    return str(ObjectId())


def inbound_key(channel: str, external_id: str) -> str:
    """The idempotency key of an inbound message: its channel's message id."""
    return f"in:{channel}:{external_id}"


def outbound_key(dedupe_key: str) -> str:
    """The idempotency key of an outbound item: its dedupe key (or its own id)."""
    return f"out:{dedupe_key}"


def from_doc(model: type[M], doc: Mapping[str, Any]) -> M:
    data = dict(doc)
    data["id"] = data.pop("_id")
    return model.model_validate(data)


def to_doc(item: Activity | Contact | Conversation | Identity) -> Doc:
    data = item.model_dump(mode="python", exclude_none=False)
    data["_id"] = data.pop("id")
    return data


class Store:
    """Typed access to the collections. One per app, opened in a cleanup context."""

    def __init__(self, client: AsyncMongoClient[Doc], db_name: str) -> None:
        self.client = client
        self.db: AsyncDatabase[Doc] = client[db_name]
        self.contacts: AsyncCollection[Doc] = self.db["contacts"]
        self.identities: AsyncCollection[Doc] = self.db["identities"]
        self.conversations: AsyncCollection[Doc] = self.db["conversations"]
        self.messages: AsyncCollection[Doc] = self.db["messages"]
        self.agents: AsyncCollection[Doc] = self.db["agents"]
        self.channel_state: AsyncCollection[Doc] = self.db["channel_state"]
        # Serialises appends to one conversation inside this process, so they do not
        # conflict with each other; across processes the transaction does that job.
        self._append_locks = KeyedLocks()

    @classmethod
    def connect(cls, uri: str, db_name: str, *, timeout_ms: int = 5000) -> Store:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(
            uri,
            tz_aware=True,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            appname="omnigate",
        )
        return cls(client, db_name)

    async def close(self) -> None:
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
                IndexModel([("conversation_id", ASCENDING), ("seq", ASCENDING)], unique=True),
                IndexModel([("contact_id", ASCENDING), ("contact_seq", ASCENDING)], unique=True),
                # One unique key per item makes both dedupes (inbound by the channel's
                # message id, outbound by dedupe_key) a plain index: SecantusDB 0.7 does
                # not use partial indexes, so they would be collection scans.
                IndexModel([("idem_key", ASCENDING)], unique=True, name="idempotency"),
                IndexModel(
                    [("processed", ASCENDING), ("conversation_id", ASCENDING)],
                    name="processed_conversation",
                ),
                IndexModel(
                    [("delivery.status", ASCENDING), ("delivery.next_attempt_at", ASCENDING)],
                    name="outbox_due",
                ),
                IndexModel(
                    [("conversation_id", ASCENDING), ("delivery.status", ASCENDING)],
                    name="outbox_conversation",
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
        sets = {f"profile.{k}": v for k, v in changes.items() if v is not None}
        unsets = {f"profile.{k}": "" for k, v in changes.items() if v is None}
        update: Doc = {}
        if sets:
            update["$set"] = sets
        if unsets:
            update["$unset"] = unsets
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
        self, channel: str, thread_key: str, contact_id: str
    ) -> Conversation:
        """The conversation for (channel, thread key), created in the bot's hands if new."""
        now = utcnow()
        doc, _ = await self._upsert(
            self.conversations,
            {"channel": channel, "thread_key": thread_key},
            {
                "_id": new_id(),
                "contact_id": contact_id,
                "owner": OwnerState.BOT.value,
                "assignee_id": None,
                "handoff": None,
                "bot_state": {},
                "seq": 0,
                "created_at": now,
                "updated_at": now,
                "last_activity_at": None,
                "lease": {"owner": None, "until": FREE},
            },
        )
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
        """Change the owner state atomically if it is one of ``expected`` (and ``where``).

        Returns the updated conversation, or None if the conversation was not in an
        expected state: of two concurrent callers, exactly one wins.
        """
        query: Doc = {"_id": conversation_id, "owner": {"$in": [s.value for s in expected]}}
        query.update(where or {})
        update: Doc = {"owner": to.value, "updated_at": utcnow()}
        update.update(also or {})
        result = await self.conversations.update_one(query, {"$set": update})
        if result.matched_count == 0:
            return None
        return await self.get_conversation(conversation_id)

    async def set_bot_state(self, conversation_id: str, state: Mapping[str, Any]) -> bool:
        """Save the bot's memory, only while the bot still owns the conversation."""
        result = await self.conversations.update_one(
            {"_id": conversation_id, "owner": OwnerState.BOT.value},
            {"$set": {"bot_state": dict(state), "updated_at": utcnow()}},
        )
        return result.matched_count == 1

    async def list_conversations(
        self, owners: list[OwnerState], *, assignee_id: str | None = None, limit: int = 100
    ) -> list[Conversation]:
        query: Doc = {"owner": {"$in": [o.value for o in owners]}}
        if assignee_id is not None:
            query["assignee_id"] = assignee_id
        cursor = self.conversations.find(query).sort(
            [("handoff.requested_at", ASCENDING), ("_id", ASCENDING)]
        )
        return [from_doc(Conversation, d) async for d in cursor.limit(limit)]

    # ----------------------------------------------------------------- messages

    async def find_by_external_id(self, channel: str, external_id: str) -> Activity | None:
        doc = await self.messages.find_one({"idem_key": inbound_key(channel, external_id)})
        return None if doc is None else from_doc(Activity, doc)

    async def find_by_dedupe_key(self, key: str) -> Activity | None:
        doc = await self.messages.find_one({"idem_key": outbound_key(key)})
        return None if doc is None else from_doc(Activity, doc)

    async def get_message(self, message_id: str) -> Activity | None:
        doc = await self.messages.find_one({"_id": message_id})
        return None if doc is None else from_doc(Activity, doc)

    async def append_inbound(
        self, conversation: Conversation, message: InboundMessage, *, checked: bool = False
    ) -> tuple[Activity, bool]:
        """Store an inbound message once. Returns (stored item, was it a duplicate).

        ``checked``: the caller just looked it up by external id and found nothing (the
        unique index still catches a concurrent duplicate).
        """
        if not checked:
            existing = await self.find_by_external_id(message.channel, message.external_id)
            if existing is not None:
                return existing, True
        now = utcnow()
        reply_to: str | None = None
        if message.reply_to_external_id:
            parent = await self.find_by_external_id(message.channel, message.reply_to_external_id)
            reply_to = parent.id if parent else None
        doc: Doc = {
            "_id": new_id(),
            "type": ActivityType.MESSAGE.value,
            "direction": Direction.INBOUND.value,
            "channel": message.channel,
            "conversation_ref": {"channel": message.channel, "thread_key": message.thread_key},
            "sender": message.sender.model_dump(mode="python"),
            "recipient": {"role": "bot", "id": None, "name": None},
            "external_id": message.external_id,
            "timestamp": message.timestamp or now,
            "created_at": now,
            "text": message.text,
            "value": message.value,
            "deep_link": message.deep_link,
            "name": None,
            "attachments": [a.model_dump(mode="python") for a in message.attachments],
            "buttons": [],
            "reply_to_id": reply_to,
            "channel_data": message.channel_data,
            "processed": False,
            "delivery": None,
            "dedupe_key": None,
            "idem_key": inbound_key(message.channel, message.external_id),
        }
        try:
            return await self._append(conversation.id, doc), False
        except DuplicateKeyError:
            existing = await self.find_by_external_id(message.channel, message.external_id)
            if existing is None:  # pragma: no cover - a different unique index fired
                raise
            return existing, True

    async def append_outbound(
        self, conversation: Conversation, draft: OutboundDraft
    ) -> tuple[Activity, bool]:
        """Store an outbound item with a pending delivery, once per ``dedupe_key``.

        A repeated key is caught by the unique index (the transaction is rolled back, so
        no seq is used up); that only happens when a turn is processed again.
        """
        now = utcnow()
        doc: Doc = {
            "_id": new_id(),
            "type": draft.type.value,
            "direction": Direction.OUTBOUND.value,
            "channel": conversation.channel,
            "conversation_ref": ConversationRef(
                channel=conversation.channel, thread_key=conversation.thread_key
            ).model_dump(),
            "sender": draft.sender.model_dump(mode="python"),
            "recipient": {"role": "customer", "id": None, "name": None},
            "external_id": None,
            "timestamp": now,
            "created_at": now,
            "text": draft.text,
            "value": None,
            "name": draft.name,
            "attachments": [a.model_dump(mode="python") for a in draft.attachments],
            "buttons": [b.model_dump(mode="python") for b in draft.buttons],
            "reply_to_id": draft.reply_to_id,
            "channel_data": {},
            "processed": None,
            "delivery": Delivery(next_attempt_at=now, updated_at=now).model_dump(mode="python"),
            "dedupe_key": draft.dedupe_key,
            "idem_key": None,
        }
        doc["idem_key"] = outbound_key(draft.dedupe_key or doc["_id"])
        try:
            return await self._append(conversation.id, doc), False
        except DuplicateKeyError:
            if draft.dedupe_key is None:  # pragma: no cover
                raise
            existing = await self.find_by_dedupe_key(draft.dedupe_key)
            if existing is None:  # pragma: no cover
                raise
            return existing, True

    async def _append(self, conversation_id: str, doc: Doc) -> Activity:
        async with self._append_locks.hold(conversation_id), self.client.start_session() as s:
            await s.with_transaction(lambda txn: self._append_txn(txn, conversation_id, doc))
        return from_doc(Activity, doc)

    async def _append_txn(
        self, session: AsyncClientSession, conversation_id: str, doc: Doc
    ) -> None:
        now = doc["created_at"]
        await self.conversations.update_one(
            {"_id": conversation_id},
            {"$inc": {"seq": 1}, "$set": {"last_activity_at": now, "updated_at": now}},
            session=session,
        )
        conv = await self.conversations.find_one(
            {"_id": conversation_id}, {"seq": 1, "contact_id": 1}, session=session
        )
        if conv is None:
            raise NotFound(f"conversation {conversation_id} does not exist")
        await self.contacts.update_one(
            {"_id": conv["contact_id"]}, {"$inc": {"seq": 1}}, session=session
        )
        contact = await self.contacts.find_one(
            {"_id": conv["contact_id"]}, {"seq": 1}, session=session
        )
        if contact is None:
            raise NotFound(f"contact {conv['contact_id']} does not exist")
        doc["conversation_id"] = conversation_id
        doc["contact_id"] = conv["contact_id"]
        doc["seq"] = conv["seq"]
        doc["contact_seq"] = contact["seq"]
        await self.messages.insert_one(doc, session=session)

    async def edit_inbound(
        self, channel: str, external_id: str, text: str | None,
        channel_data: Mapping[str, Any] | None = None,
    ) -> Activity | None:
        """The customer edited a message on their channel: store the new text, keep the old.

        Returns the updated item, or None if the original was never stored.
        """
        key = inbound_key(channel, external_id)
        current = await self.messages.find_one({"idem_key": key}, {"text": 1})
        if current is None:
            return None
        update: Doc = {"$set": {"text": text},
                       "$push": {"edits": {"text": current.get("text"), "edited_at": utcnow()}}}
        if channel_data is not None:
            update["$set"]["channel_data.edited"] = dict(channel_data)
        await self.messages.update_one({"idem_key": key}, update)
        return await self.find_by_external_id(channel, external_id)

    async def set_parts_sent(self, message_id: str, parts: int) -> None:
        """Record that the first ``parts`` parts of an outbound item went out, so a retry
        after a failure in the middle sends only the rest (never a part twice)."""
        await self.messages.update_one(
            {"_id": message_id}, {"$set": {"delivery.parts_sent": parts}}
        )

    async def mark_processed(self, message_id: str) -> None:
        await self.messages.update_one({"_id": message_id}, {"$set": {"processed": True}})

    async def unprocessed(self, conversation_id: str, limit: int = 20) -> list[Activity]:
        cursor = self.messages.find({"processed": False, "conversation_id": conversation_id})
        docs = await cursor.sort("seq", ASCENDING).limit(limit).to_list()
        return [from_doc(Activity, d) for d in docs]

    async def conversations_with_unprocessed(self, older_than: datetime) -> list[str]:
        ids = await self.messages.distinct(
            "conversation_id", {"processed": False, "created_at": {"$lt": older_than}}
        )
        return [str(i) for i in ids]

    # ------------------------------------------------------------------ history

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
        conv = await self.conversations.find_one({"_id": conversation_id}, {"seq": 1})
        if conv is None:
            raise NotFound(f"conversation {conversation_id} does not exist")
        top = int(conv["seq"]) + 1
        return await self._page("conversation_id", conversation_id, "seq",
                                before=min(before or top, top), limit=limit)

    async def contact_timeline(
        self, contact_id: str, *, before: int | None = None, limit: int = 50
    ) -> tuple[list[Activity], bool]:
        """A page of everything a contact said and was told, on every channel, newest first."""
        contact = await self.contacts.find_one({"_id": contact_id}, {"seq": 1})
        if contact is None:
            raise NotFound(f"contact {contact_id} does not exist")
        top = int(contact["seq"]) + 1
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
