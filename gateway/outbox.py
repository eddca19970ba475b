"""Durable delivery of outbound items: stored first, then sent, with status recorded.

Every outbound item (bot reply, agent reply, event) is appended to the store with
``delivery.status = pending``. Delivery then runs per conversation, in ``seq`` order (a
failed item blocks the ones after it until it is delivered or given up, so customers never
see replies out of order). A worker claims an item with a lease in the store, so several
gateway processes can share the outbox; a crashed worker's lease expires and the sweeper
picks the item up again. Transient errors retry with exponential backoff (or the channel's
``retry_after``); permanent ones and exhausted retries mark the item ``failed``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta

from pymongo.errors import PyMongoError

from connectors.base import Connector, DeliveryError, DeliveryResult
from gateway.aio import Background, KeyedLocks
from gateway.model import (
    Activity,
    Conversation,
    ConversationRef,
    DeliveryStatus,
    OutboundDraft,
    utcnow,
)
from gateway.store import Store
from gateway.store.contacts import ContactStore
from gateway.store.mongo import from_doc

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=60)
MAX_BACKOFF = 300.0


def _addressed(conversation: Conversation, ref: ConversationRef) -> Conversation:
    """The conversation as a connector must address it: on ``ref``'s channel and thread
    (another of the contact's channels after a channel switch)."""
    if (ref.channel, ref.thread_key) == (conversation.channel, conversation.thread_key):
        return conversation
    return conversation.model_copy(update={"channel": ref.channel, "thread_key": ref.thread_key})


class Outbox:
    def __init__(
        self,
        store: Store,
        connectors: Mapping[str, Connector],
        *,
        max_attempts: int = 8,
        sweep_seconds: float = 2.0,
    ) -> None:
        self.store = store
        self.connectors = connectors
        self.max_attempts = max_attempts
        self.sweep_seconds = sweep_seconds
        self._locks = KeyedLocks()
        self._background = Background("outbox")
        self._dirty: set[str] = set()
        self._known: dict[str, Conversation] = {}

    async def enqueue(
        self, conversation: Conversation, drafts: Sequence[OutboundDraft]
    ) -> list[Activity]:
        """Store the drafts (idempotent per ``dedupe_key``) and start delivering them.

        Each goes where the customer wrote last, or on the channel the draft names
        (``ContactStore.route``); the item records that channel and thread.
        """
        items = [(await self.store.append_outbound(await self._to(conversation, d), d))[0]
                 for d in drafts]
        if items:
            self.kick(conversation.id, conversation)
        return items

    async def _to(self, conversation: Conversation, draft: OutboundDraft) -> Conversation:
        """``conversation`` addressed at the draft's channel and thread (see ``route``)."""
        if draft.channel is None and conversation.reply_channel is None:
            return conversation  # the common case: no lookup
        ref = await ContactStore(self.store).route(conversation, draft.channel)
        return _addressed(conversation, ref)

    def kick(self, conversation_id: str, conversation: Conversation | None = None) -> None:
        """Deliver whatever is pending in this conversation, in the background.

        ``conversation``, when the caller has it, saves reading it again (the fields a
        connector needs to address the customer never change).
        """
        if conversation is not None:
            self._known[conversation_id] = conversation
        if conversation_id in self._dirty:
            return
        self._dirty.add(conversation_id)
        self._background.spawn(self._run(conversation_id), f"outbox:{conversation_id}")

    async def _run(self, conversation_id: str) -> None:
        async with self._locks.hold(conversation_id):
            self._dirty.discard(conversation_id)
            try:
                await self.deliver_conversation(conversation_id)
            except PyMongoError as exc:
                log.warning(
                    "outbox: store error on %s, sweeper will retry: %s", conversation_id, exc
                )
            except Exception:
                log.exception("outbox: unexpected error on conversation %s", conversation_id)
            finally:
                if conversation_id not in self._dirty:
                    self._known.pop(conversation_id, None)

    async def deliver_conversation(self, conversation_id: str) -> None:
        while True:
            now = utcnow()
            doc = await self.store.messages.find_one(
                {  # only outbound items have a delivery
                    "conversation_id": conversation_id,
                    "delivery.status": {
                        "$in": [DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value]
                    },
                },
                sort=[("seq", 1)],
            )
            if doc is None:
                return
            item = from_doc(Activity, doc)
            delivery = item.delivery
            assert delivery is not None
            if delivery.next_attempt_at and delivery.next_attempt_at > now:
                return  # backing off; the sweeper comes back when it is due
            if delivery.status is DeliveryStatus.SENDING and (
                delivery.lease_until and delivery.lease_until > now
            ):
                return  # another worker holds it
            lease_until = now + LEASE
            claimed = await self.store.messages.update_one(
                {
                    "_id": item.id,
                    "delivery.status": delivery.status.value,
                    "delivery.attempts": delivery.attempts,
                },
                {
                    "$set": {
                        "delivery.status": DeliveryStatus.SENDING.value,
                        "delivery.lease_until": lease_until,
                        "delivery.updated_at": now,
                    },
                    "$inc": {"delivery.attempts": 1},
                },
            )
            if claimed.matched_count == 0:
                return  # lost the race to another worker
            mine = delivery.model_copy(update={
                "status": DeliveryStatus.SENDING, "lease_until": lease_until,
                "updated_at": now, "attempts": delivery.attempts + 1})
            await self._attempt(item.model_copy(update={"delivery": mine}))

    async def _attempt(self, item: Activity) -> None:
        assert item.delivery is not None
        attempts = item.delivery.attempts
        if item.private:  # a private note is for agents only: never given to a connector
            await self._finish(item, DeliveryResult(DeliveryStatus.SKIPPED))
            return
        connector = self.connectors.get(item.channel)
        conversation = self._known.get(item.conversation_id)
        if conversation is None:
            conversation = await self.store.get_conversation(item.conversation_id)
        error: DeliveryError
        if connector is None or conversation is None:
            error = DeliveryError(f"channel {item.channel!r} is not enabled")
        else:
            try:
                result = await connector.send(_addressed(conversation, item.conversation_ref),
                                              item)
            except DeliveryError as exc:
                error = exc
            except Exception as exc:
                log.exception("outbox: %s connector crashed sending %s", item.channel, item.id)
                error = DeliveryError(f"connector error: {exc!r}")
            else:
                await self._finish(item, result)
                return
        now = utcnow()
        if error.permanent or attempts >= self.max_attempts:
            status, next_at = DeliveryStatus.FAILED, None
            log.warning("outbox: giving up on %s after %d attempt(s): %s", item.id, attempts, error)
        else:
            delay = (
                error.retry_after
                if error.retry_after is not None
                else min(MAX_BACKOFF, 0.5 * 2 ** (attempts - 1))
            )
            status, next_at = DeliveryStatus.PENDING, now + timedelta(seconds=delay)
            log.info(
                "outbox: %s attempt %d failed (%s); retry in %.1f s",
                item.id,
                attempts,
                error,
                delay,
            )
        await self.store.messages.update_one(
            self._still_mine(item),
            {
                "$set": {
                    "delivery.status": status.value,
                    "delivery.next_attempt_at": next_at,
                    "delivery.lease_until": None,
                    "delivery.last_error": str(error),
                    "delivery.updated_at": now,
                }
            },
        )

    @staticmethod
    def _still_mine(item: Activity) -> dict[str, object]:
        """Match the item only while this worker's claim stands (not re-claimed since)."""
        assert item.delivery is not None
        return {"_id": item.id, "delivery.status": DeliveryStatus.SENDING.value,
                "delivery.attempts": item.delivery.attempts}

    async def _finish(self, item: Activity, result: DeliveryResult) -> None:
        await self.store.messages.update_one(
            self._still_mine(item),
            {
                "$set": {
                    "delivery.status": result.status.value,
                    "delivery.external_id": result.external_id,
                    "delivery.lease_until": None,
                    "delivery.last_error": None,
                    "delivery.updated_at": utcnow(),
                }
            },
        )

    # ------------------------------------------------------------------ sweeper

    async def sweep_once(self) -> None:
        """Kick every conversation with an item that is due (or whose lease expired)."""
        now = utcnow()
        # Two queries, not one $or: SecantusDB scans the whole collection for an $or.
        due = await self.store.messages.distinct(
            "conversation_id",
            {"delivery.status": DeliveryStatus.PENDING.value,
             "delivery.next_attempt_at": {"$lte": now}},
        )
        stale = await self.store.messages.distinct(
            "conversation_id",
            {"delivery.status": DeliveryStatus.SENDING.value,
             "delivery.lease_until": {"$lte": now}},
        )
        ids = dict.fromkeys([*due, *stale])
        for conversation_id in ids:
            self.kick(str(conversation_id))

    def start(self) -> None:
        self._background.every(self.sweep_seconds, lambda _first: self.sweep_once())

    async def stop(self, grace: float = 5.0) -> None:
        await self._background.stop(grace)
