"""Durable delivery of outbound items: stored first, then sent, with status recorded.

Every outbound item (bot reply, agent reply, event) is stored before anything is sent,
with the write that produced it (a bot turn's replies in the turn's own transaction).

Network channels (Telegram, Slack, email): the item is stored *claimed* by this process
(``delivery.status = sending``, a lease, ``owner`` = this process), so the process that
stored it sends it right away without another round trip; its outcome is recorded
after the send (group-committed). Delivery runs per conversation in ``seq`` order: a
failed item blocks the ones after it until it is delivered or given up, so customers
never see replies out of order. Transient errors retry with exponential backoff (or the
channel's ``retry_after``); permanent ones and exhausted retries mark the item
``failed``. A crashed worker's claim expires and the sweeper of any process sends the
item again: at least once, never lost (docs/delivery.md says what each channel then
gets twice, and how rarely).

A channel that says a bot turn in one message (``Connector.combines_turns``: email) gets
the turn's replies together: the undelivered items that follow the one due, with the
next seqs, the same ``reply_to_id``, sent by the bot on the same thread, are claimed with
it (each by its own conditional update, in seq order; a claim that fails ends the group
there) and handed to ``send_together``; the one outcome is recorded on each of them
(delivered with one external id, or retried or given up together).

Store-backed channels (web chat, ``Connector.store_backed``): the item is stored as
``stored``; the visitor's sockets read the conversation from the store by ``seq``, live
through the change feed of whichever process holds them, so there is nothing to send
and nothing to retry. What a live socket received is recorded per conversation
(``TurnState.delivered_seq``, ``DeliveredMarks``), written with the conversation's
next turn or within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from pymongo.errors import PyMongoError

from connectors.base import Connector, DeliveryError, DeliveryResult
from gateway.aio import Background, KeyedLocks
from gateway.model import (
    Activity,
    ActivityType,
    Conversation,
    ConversationRef,
    DeliveryStatus,
    Direction,
    OutboundDraft,
    Role,
    utcnow,
)
from gateway.store import Store
from gateway.store.contacts import ContactStore
from gateway.store.items import delivery, outbound_doc
from gateway.store.mongo import SHUTDOWN_WAIT, Doc, Op, from_doc
from gateway.store.writer import Duplicate

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=60)
# An item's claim lasts this much longer per file it carries: uploading several large
# files on a slow link must not outlast it (another worker would send them again).
FILE_LEASE = timedelta(seconds=90)
MAX_BACKOFF = 300.0
FINISH_MARGIN = timedelta(seconds=5)  # a status write is given up this long before the claim ends
MARK_EVERY = 1.0  # seconds: delivered marks not carried by a turn are written this often
ACTIVE = [DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value]


def _addressed(conversation: Conversation, ref: ConversationRef) -> Conversation:
    """The conversation as a connector must address it: on ``ref``'s channel and thread
    (another of the contact's channels after a channel switch)."""
    if (ref.channel, ref.thread_key) == (conversation.channel, conversation.thread_key):
        return conversation
    return conversation.model_copy(update={"channel": ref.channel, "thread_key": ref.thread_key})


def store_backed(connector: Connector | None) -> bool:
    return bool(getattr(connector, "store_backed", False))


def lease_for(files: int) -> timedelta:
    """How long a claim to send an item with ``files`` files lasts."""
    return LEASE + files * FILE_LEASE


def combines_turns(connector: Connector | None) -> bool:
    return bool(getattr(connector, "combines_turns", False))


def _bot_reply(item: Activity) -> bool:
    """A bot's message answering an inbound item: what a combined turn is made of."""
    return (item.type is ActivityType.MESSAGE and item.direction is Direction.OUTBOUND
            and item.sender.role is Role.BOT and item.reply_to_id is not None
            and not item.private)


def same_turn(head: Activity, item: Activity) -> bool:
    """``item`` belongs to the bot turn that ``head`` starts (next seqs are checked by
    the caller): a bot reply to the same message, on the same channel and thread."""
    return (_bot_reply(item) and item.reply_to_id == head.reply_to_id
            and item.channel == head.channel and item.conversation_ref == head.conversation_ref)


Claimed = tuple[Activity, int]  # an item claimed for a send (attempts counting it), its claim


class DeliveredMarks:
    """How far live sockets got, per conversation, written in few commands: a turn's
    commit carries its conversation's mark (``take``), the rest go every second."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._marks: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def seen(self, conversation_id: str, seq: int) -> None:
        if seq > self._marks.get(conversation_id, 0):
            self._marks[conversation_id] = seq
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush_soon())

    def take(self, conversation_id: str) -> int | None:
        return self._marks.pop(conversation_id, None)

    async def _flush_soon(self) -> None:
        await asyncio.sleep(MARK_EVERY)
        await self.flush()

    async def flush(self) -> None:
        """Write the marks seen so far; when it returns, they are in the store (or kept
        for the next flush if the store refused): one in flight is waited for."""
        async with self._flushing:
            marks, self._marks = self._marks, {}
            if not marks:
                return
            ops = [Op("turn_state", {"_id": cid}, {"$max": {"delivered_seq": seq}})
                   for cid, seq in marks.items()]
            try:
                await self.store.apply(ops)
            except BaseException as exc:  # kept: the next flush or turn carries them
                for cid, seq in marks.items():
                    self._marks[cid] = max(seq, self._marks.get(cid, 0))
                if not isinstance(exc, PyMongoError):
                    raise
                log.info("outbox: delivered marks not written (%s)", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._marks:  # flush() keeps what it could not write: lost with the process
            with contextlib.suppress(PyMongoError, TimeoutError):
                await asyncio.wait_for(self.flush(), SHUTDOWN_WAIT)


class Outbox:
    def __init__(
        self,
        store: Store,
        connectors: Mapping[str, Connector],
        *,
        max_attempts: int = 8,
        sweep_seconds: float = 2.0,
        instance: str | None = None,
    ) -> None:
        self.store = store
        self.connectors = connectors
        self.max_attempts = max_attempts
        self.sweep_seconds = sweep_seconds
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.marks = DeliveredMarks(store)
        self.on_failed: Callable[[str], None] | None = None  # channel: an item given up
        self._locks = KeyedLocks()
        self._background = Background("outbox")
        self._dirty: set[str] = set()
        self._known: dict[str, Conversation] = {}

    # ------------------------------------------------------------------ storing

    async def prepare(
        self, conversation: Conversation, drafts: Sequence[OutboundDraft]
    ) -> list[Doc]:
        """The stored form of the drafts: each addressed where it goes (where the customer
        wrote last, or the channel the draft names: ``ContactStore.route``), claimed by
        this process for sending, or ``stored`` on a store-backed channel."""
        now = utcnow()
        docs: list[Doc] = []
        for draft in drafts:
            addressed = await self._to(conversation, draft)
            if store_backed(self.connectors.get(addressed.channel)):
                state = delivery(DeliveryStatus.STORED, now)
            else:
                # claimed, not yet attempted (attempts counts sends: the first makes it 1)
                state = delivery(DeliveryStatus.SENDING, now, attempts=0,
                                 lease_until=now + lease_for(len(draft.attachments)),
                                 owner=self.instance)
            docs.append(outbound_doc(addressed, draft, now, state))
        return docs

    async def enqueue(
        self, conversation: Conversation, drafts: Sequence[OutboundDraft],
        ops: Sequence[Op] = (),
    ) -> list[Activity]:
        """Store the drafts (idempotent per ``dedupe_key``) and start delivering them.

        ``ops``: updates written in the same transaction (an owner change and its event:
        ``Routing._change``); then a ``Precondition`` or ``Duplicate`` means nothing was
        written and is the caller's to handle."""
        docs = await self.prepare(conversation, drafts)
        if not docs:
            return []
        now = utcnow()
        touch = Op("conversations", {"_id": conversation.id},
                   {"$set": {"updated_at": now}, "$max": {"last_activity_at": now}})
        try:
            items = await self.store.append(conversation.id, docs, [touch, *ops])
        except Duplicate:  # a re-run: store what is new, one by one; keep what exists
            if ops:
                raise
            items = []
            fresh: list[Activity] = []
            for doc in docs:
                try:
                    [item] = await self.store.append(conversation.id, [doc])
                    fresh.append(item)
                except Duplicate:
                    existing = await self.store.get_message(str(doc["_id"]))
                    if existing is None:  # pragma: no cover - it collided, so it exists
                        raise
                    item = existing
                items.append(item)
            self.deliver(conversation, fresh)
            return items
        self.deliver(conversation, items)
        return items

    async def _to(self, conversation: Conversation, draft: OutboundDraft) -> Conversation:
        """``conversation`` addressed at the draft's channel and thread (see ``route``)."""
        if draft.channel is None and conversation.reply_channel is None:
            return conversation  # the common case: no lookup
        ref = await ContactStore(self.store).route(conversation, draft.channel)
        return _addressed(conversation, ref)

    # --------------------------------------------------------------- delivering

    def deliver(self, conversation: Conversation, items: Sequence[Activity]) -> None:
        """Hand just-stored items to their connectors, in order, in the background."""
        if items:
            self._background.spawn(self._deliver(conversation, list(items)),
                                   f"outbox:{conversation.id}")

    async def _deliver(self, conversation: Conversation, items: list[Activity]) -> None:
        async with self._locks.hold(conversation.id):
            try:
                sent = False
                for item in items:
                    connector = self.connectors.get(item.channel)
                    if store_backed(connector):
                        await self._push(conversation, item, connector)
                    elif not sent:
                        # in seq order with whatever else of the conversation is
                        # undelivered (written by any process): one indexed read
                        born = {i.id: i for i in items
                                if i.delivery is not None and i.delivery.owner == self.instance
                                and i.delivery.status is DeliveryStatus.SENDING}
                        await self.deliver_conversation(conversation.id, born, conversation)
                        sent = True
            except PyMongoError as exc:
                log.warning("outbox: store error on %s, sweeper will retry: %s",
                            conversation.id, exc)
            except Exception:
                log.exception("outbox: unexpected error on conversation %s", conversation.id)

    async def _push(self, conversation: Conversation, item: Activity,
                    connector: Connector | None) -> None:
        """A store-backed channel: show it on the sockets open here (others see it
        through their change feed); record how far they got."""
        if connector is None:
            return
        try:
            result = await connector.send(_addressed(conversation, item.conversation_ref), item)
        except Exception:  # stored: the visitor gets it on the next catch-up
            log.exception("outbox: %s could not show %s live", item.channel, item.id)
            return
        if result.status is DeliveryStatus.DELIVERED:
            self.marks.seen(item.conversation_id, item.seq)

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

    async def deliver_conversation(
        self, conversation_id: str, born: Mapping[str, Activity] | None = None,
        conversation: Conversation | None = None,
    ) -> None:
        """Send the conversation's undelivered items in seq order (retries, claims that
        expired, items a crashed process left). ``born``: items this process just stored
        claimed for itself (sent without claiming them again)."""
        born = dict(born or {})
        try:
            await self._in_order(conversation_id, born, conversation)
        finally:
            if born:  # waiting behind an earlier item: whoever sends that sends these
                await self.store.apply([Op(
                    "messages", self._still_mine(item, 0),
                    {"$set": {"delivery.status": DeliveryStatus.PENDING.value,
                              "delivery.owner": None, "delivery.lease_until": None,
                              "delivery.next_attempt_at": utcnow()}})
                    for item in born.values()])

    async def _in_order(self, conversation_id: str, born: dict[str, Activity],
                        conversation: Conversation | None) -> None:
        while True:
            now = utcnow()
            # The few undelivered items of every conversation, by the outbox index (a sort
            # on seq inside the conversation would not use an index on every server).
            docs = await self.store.messages.find(
                {"delivery.status": {"$in": ACTIVE}, "conversation_id": conversation_id}
            ).to_list()
            if not docs:
                return
            docs.sort(key=lambda d: int(d["seq"]))
            head = from_doc(Activity, docs[0])
            taken = await self._take(head, born, now)
            if taken is None:
                return  # backing off, held by another worker, or lost the race
            group = [taken]
            if combines_turns(self.connectors.get(head.channel)) and _bot_reply(head):
                for doc in docs[1:]:  # the rest of the turn, while it follows seq by seq
                    item = from_doc(Activity, doc)
                    if item.seq != group[-1][0].seq + 1 or not same_turn(head, item):
                        break
                    if (more := await self._take(item, born, now)) is None:
                        break
                    group.append(more)
            if not await self._attempt(group, conversation):
                return

    async def _take(self, item: Activity, born: dict[str, Activity],
                    now: datetime) -> Claimed | None:
        """Claim ``item`` for a send: one this process stored claimed is its already;
        else a conditional update. None: not due, another worker's, or lost the race."""
        state = item.delivery
        assert state is not None
        if state.status is DeliveryStatus.PENDING and (
                state.next_attempt_at and state.next_attempt_at > now):
            return None  # backing off; the sweeper comes back when it is due
        if item.id in born and state.status is DeliveryStatus.SENDING:
            mine = born.pop(item.id)
            assert mine.delivery is not None
            return mine.model_copy(update={"delivery": mine.delivery.model_copy(
                update={"attempts": mine.delivery.attempts + 1})}), mine.delivery.attempts
        if state.status is DeliveryStatus.SENDING and state.owner != self.instance and (
                state.lease_until and state.lease_until > now):
            return None  # another worker holds it
        lease_until = now + lease_for(len(item.attachments))
        claimed = await self.store.messages.update_one(
            {"_id": item.id, "delivery.status": state.status.value,
             "delivery.attempts": state.attempts},
            {"$set": {"delivery.status": DeliveryStatus.SENDING.value,
                      "delivery.lease_until": lease_until, "delivery.owner": self.instance,
                      "delivery.updated_at": now},
             "$inc": {"delivery.attempts": 1}},
        )
        if claimed.matched_count == 0:
            return None  # lost the race to another worker
        claim = state.model_copy(update={
            "status": DeliveryStatus.SENDING, "lease_until": lease_until,
            "owner": self.instance, "updated_at": now, "attempts": state.attempts + 1})
        return item.model_copy(update={"delivery": claim}), state.attempts + 1

    async def _attempt(self, group: list[Claimed],
                       conversation: Conversation | None = None) -> bool:
        """Send claimed items (one, or a bot turn's replies for ``send_together``) and
        record the outcome on each. True if they are done with (sent, skipped or given
        up), False if they wait for a retry (later items wait too). Each item's
        ``delivery.attempts`` counts this send; its claim is the count stored with the
        claim (they differ for an item stored claimed, not yet sent)."""
        item = group[0][0]
        assert item.delivery is not None
        attempts = max(i.delivery.attempts for i, _ in group if i.delivery is not None)
        if item.private:  # a private note is for agents only: never given to a connector
            await self._finish(group, DeliveryResult(DeliveryStatus.SKIPPED))
            return True
        connector = self.connectors.get(item.channel)
        conversation = conversation or self._known.get(item.conversation_id)
        if conversation is None:
            conversation = await self.store.get_conversation(item.conversation_id)
        error: DeliveryError
        if connector is None or conversation is None:
            error = DeliveryError(f"channel {item.channel!r} is not enabled")
        else:
            addressed = _addressed(conversation, item.conversation_ref)
            try:
                if len(group) == 1:
                    result = await connector.send(addressed, item)
                else:
                    result = await connector.send_together(addressed, [i for i, _ in group])
            except DeliveryError as exc:
                error = exc
            except Exception as exc:
                log.exception("outbox: %s connector crashed sending %s", item.channel,
                              _ids(group))
                error = DeliveryError(f"connector error: {exc!r}")
            else:
                await self._finish(group, result)
                return True
        now = utcnow()
        if error.permanent or attempts >= self.max_attempts:
            status, next_at = DeliveryStatus.FAILED, None
            if self.on_failed is not None:
                for _ in group:
                    self.on_failed(item.channel)
            log.warning("outbox: giving up on %s after %d attempt(s): %s",
                        _ids(group), attempts, error)
        else:
            delay = (
                error.retry_after
                if error.retry_after is not None
                else min(MAX_BACKOFF, 0.5 * 2 ** (attempts - 1))
            )
            status, next_at = DeliveryStatus.PENDING, now + timedelta(seconds=delay)
            log.info("outbox: %s attempt %d failed (%s); retry in %.1f s",
                     _ids(group), attempts, error, delay)
        await self.store.apply([Op("messages", self._still_mine(member, claim), {"$set": {
            "delivery.status": status.value,
            "delivery.attempts": member.delivery.attempts if member.delivery else attempts,
            "delivery.next_attempt_at": next_at,
            "delivery.lease_until": None,
            "delivery.last_error": str(error),
            "delivery.updated_at": now,
        }}) for member, claim in group])
        return status is DeliveryStatus.FAILED

    @staticmethod
    def _still_mine(item: Activity, claim: int) -> dict[str, object]:
        """Match the item only while this worker's claim stands (not re-claimed since)."""
        return {"_id": item.id, "delivery.status": DeliveryStatus.SENDING.value,
                "delivery.attempts": claim}

    async def _finish(self, group: list[Claimed], result: DeliveryResult) -> None:
        """Record a send's outcome (on each item it sent). The network has it now: while
        the store is away the write is retried for as long as this process's claim lasts,
        so that a store outage does not make another worker send it again when the claim
        expires (the duplicate window is then only a crash of this process between the
        send and this write; docs/delivery.md)."""
        now = utcnow()
        ops: list[Op] = []
        claim_ends = now + LEASE
        for item, claim in group:
            assert item.delivery is not None
            ops.append(Op("messages", self._still_mine(item, claim), {"$set": {
                "delivery.status": result.status.value,
                "delivery.attempts": item.delivery.attempts,
                "delivery.external_id": result.external_id,
                "delivery.lease_until": None,
                "delivery.last_error": None,
                "delivery.updated_at": now,
            }}))
            claim_ends = min(claim_ends, item.delivery.lease_until or claim_ends)
        pause = 0.2
        while True:
            try:
                await self.store.apply(ops)
                return
            except PyMongoError as exc:
                if utcnow() + timedelta(seconds=pause) >= claim_ends - FINISH_MARGIN:
                    raise
                log.warning("outbox: %s sent, its status not yet written (%s); retrying",
                            _ids(group), exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    # ------------------------------------------------------------------ sweeper

    async def sweep_once(self) -> None:
        """Kick every conversation with an item that is due (or whose claim expired)."""
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
        await self.marks.stop()


def _ids(group: Sequence[Claimed]) -> str:
    """The items of a send, for the log: one id, or the first and how many more."""
    first = group[0][0].id
    return first if len(group) == 1 else f"{first} (+{len(group) - 1} of its turn)"
