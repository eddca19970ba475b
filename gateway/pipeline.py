"""``ingest``: the only orchestration code. Every channel's messages take this road.

    connector ─► ingest: contact + identity ─► conversation ─► store (durable, deduped)
              ◄─ ack (the connector answers its network only now)
    background, per conversation, in seq order, in the process holding its lease:
       owner bot      ─► Bot.respond ─► one commit: replies + bot state + processed mark
                      ─► outbox (deliver what the commit stored) ─► maybe handoff
       owner queued / agent ─► nothing: the agent reads it from the store
       owner resolved ─► reopened to the bot, then as above

Processing state lives in the store: a bot turn that answers records what it changed
(the item it answered, the bot's memory) on its first reply, written with the replies
and nothing else; the conversation's turn state is a checkpoint of that, written every
few seconds while it is busy and when it goes idle (gateway/store/turn_records.py). Its
turns run where its lease is (gateway/store/turns.py).
The holder keeps what it needs for the next turn in memory (the conversation, the
contact's profile, the inbound items waiting) and learns of changes made elsewhere from
the change feed (a message stored by another process, an agent taking over, a channel
switch, a profile answered in another conversation); whatever it could have missed is
caught by the commit, which requires the lease and the bot's ownership. A crash or a
restart loses nothing: the sweeper finds recent inbound items above ``processed_seq``,
and replies carry a ``dedupe_key`` (their id) so a re-processed message is still
answered only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pymongo
from pymongo.errors import PyMongoError

from connectors.base import IngestResult
from flows.bot import Bot, BotTurn, Reply, TurnContext
from gateway.aio import Background
from gateway.feed import Change, ChangeKind
from gateway.files import Files
from gateway.identity import Identity, is_link_payload
from gateway.metrics import Metrics
from gateway.model import (
    Activity,
    ActivityType,
    Contact,
    Conversation,
    Direction,
    InboundMessage,
    OutboundDraft,
    OwnerState,
    Party,
    Role,
    TurnState,
    utcnow,
)
from gateway.outbox import Outbox
from gateway.routing import Routing
from gateway.store import NotFound, Store
from gateway.store.contacts import NO_SWITCH_FROM
from gateway.store.items import inbound_id
from gateway.store.mongo import SHUTDOWN_WAIT, Doc, Op, epoch_is, from_doc, profile_update
from gateway.store.turn_records import brought_forward, events_op, keep_record
from gateway.store.turn_records import history as bot_history
from gateway.store.turns import LEASE, Acquired, Turns, instance_name
from gateway.store.writer import Duplicate, Missing, Precondition

log = logging.getLogger(__name__)

COUNTED = (Direction.INBOUND.value, Direction.OUTBOUND.value)  # omnigate_messages_total

STALE_AFTER = timedelta(seconds=15)
# A bot turn that takes longer is abandoned (well inside LEASE, so no other process can
# take over the conversation while the turn still runs).
BOT_TIMEOUT = 20.0
RENEW_BELOW = timedelta(seconds=BOT_TIMEOUT + 3)  # lease left before a turn starts
FIRST_SWEEP = timedelta(hours=1)  # how far back a first sweep ever looks
MARK_SAVE_EVERY = timedelta(seconds=60)
CACHE = 10_000  # web chat threads whose conversation is remembered
# A bot turn writes the conversation's last_activity_at when it is older than this
# (the turn itself commits to the small turn state only).
ACTIVITY_EVERY = timedelta(seconds=60)
# A conversation whose turn records are ahead of its checkpoint gets the checkpoint
# written once it has been idle this long (the sweeper looks every sweep_seconds).
CHECKPOINT_IDLE = 2.0
# What the customer is told when the bot fails on their message (it raised or timed out).
BOT_ERROR_TEXT = (
    "Sorry, something went wrong on my side and I could not answer that. "
    "Please try again in a moment."
)


@dataclass(eq=False)
class Held:
    """A conversation whose lease this process holds, and what its next turn needs."""

    id: str
    until: datetime
    known: bool = False  # ``pending`` holds every inbound item above ``processed``
    processed: int = 0
    pending: dict[int, Activity] = field(default_factory=dict)
    conversation: Conversation | None = None  # None: read it before the next turn
    bot_state: dict[str, Any] = field(default_factory=dict)  # read with ``conversation``
    bot_since: int = 0  # TurnState.bot_since, read with it
    epoch: int = 0  # TurnState.epoch, read with it
    # The seq up to which what the turns decide on (owner, memory) is known: a turn's
    # commit is fenced there (Unit.fence).
    fence: int = 0
    # Turn records are ahead of the turn state's checkpoint (``_checkpoint`` writes it).
    dirty: bool = False
    checkpoint_due: bool = False
    active_at: float = 0.0  # time.monotonic() of the last turn
    contact: Contact | None = None
    lost: bool = False
    # Every item up to ``seen`` is known here (stored by this process, read, or seen on
    # the feed); ``above`` holds the known seqs past a gap. A pending item after a gap
    # waits until the gap is read: another process may have stored an inbound item there.
    seen: int = 0
    above: set[int] = field(default_factory=set)

    def note(self, seq: int) -> None:
        if seq > self.seen:
            self.above.add(seq)
            self._close()

    def known_upto(self, seq: int) -> None:
        """Every item up to ``seq`` is known (read from the store: a conversation's seqs
        are committed in order, so one missing below a stored one never comes)."""
        self.seen = max(self.seen, seq)
        self._close()

    def _close(self) -> None:
        self.above = {s for s in self.above if s > self.seen}
        while self.seen + 1 in self.above:
            self.seen += 1
            self.above.discard(self.seen)

    def next(self) -> Activity | None:
        """The next inbound item to answer (None: nothing waits, or a gap comes first:
        see ``gap``)."""
        for seq in sorted(self.pending):
            if seq <= self.processed:
                del self.pending[seq]
                continue
            return self.pending[seq] if seq <= self.seen + 1 else None
        return None

    def gap(self) -> bool:
        """An unanswered item waits behind seqs this process has not seen."""
        return any(seq > self.seen + 1 for seq in self.pending if seq > self.processed)


@dataclass(eq=False)
class _Commit:
    """What a bot turn's commit writes besides its replies (``Pipeline._commit``)."""

    ops: list[Op] = field(default_factory=list)
    until: datetime | None = None  # the lease's new end, if the commit renews it
    seen: int | None = None  # a delivered mark it carries
    touch: bool = False  # it brings the conversation's last activity forward


class Pipeline:
    def __init__(
        self,
        store: Store,
        bot: Bot,
        outbox: Outbox,
        routing: Routing,
        *,
        bot_name: str = "Bot",
        sweep_seconds: float = 5.0,
        files: Files | None = None,
    ) -> None:
        self.store = store
        self.files = files or Files(store)
        self.bot = bot
        self.outbox = outbox
        self.routing = routing
        self.identity = Identity(store, outbox)
        self.bot_party = Party(role=Role.BOT, name=bot_name)
        self.sweep_seconds = sweep_seconds
        self.instance = instance_name()
        self.turns = Turns(store, self.instance)
        self.metrics: Metrics | None = None  # set by the app (gateway/metrics.py)
        self.fetch_now: Callable[[], None] | None = None  # set by the app (the fetcher)
        self._background = Background("pipeline")
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._held: dict[str, Held] = {}
        self._threads: dict[tuple[str, str], Conversation] = {}  # web chat thread cache
        self._waiting: dict[str, int] = {}  # conversation -> our item another process holds
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._mark: datetime | None = None
        self._mark_saved: datetime | None = None
        store.writer.on_foreign = self._foreign
        store.writer.on_stored = self._stored

    # ------------------------------------------------------------------ inbound

    async def open_conversation(
        self, channel: str, thread_key: str, sender_external_id: str, name: str | None = None,
        *, one_to_one: bool = False,
    ) -> Conversation:
        identity = await self.store.resolve_identity(channel, sender_external_id, name)
        if not identity.reachable:  # they wrote to us: reachable again (unblocked, ...)
            await self.store.set_identity_reachable(channel, sender_external_id, True)
        # channel switch: a linked customer's open conversation elsewhere goes on here
        # (one_to_one: the connector vouches that only the sender and we are in it)
        elsewhere = await self.identity.continue_elsewhere(
            channel, thread_key, identity.contact_id, sender_external_id,
            one_to_one=one_to_one)
        if elsewhere is not None:
            return elsewhere
        return await self.store.resolve_conversation(channel, thread_key, identity.contact_id)

    async def _conversation_for(self, message: InboundMessage) -> Conversation:
        """The message's conversation. A web chat thread always keeps its conversation
        (no channel switch from it), so that is remembered; the feed says when it moved
        to another contact or its replies to another channel."""
        key = (message.channel, message.thread_key)
        cacheable = message.channel in NO_SWITCH_FROM
        if cacheable and (known := self._threads.get(key)) is not None:
            return known
        conversation = await self.open_conversation(
            message.channel, message.thread_key, message.sender_external_id,
            message.sender.name, one_to_one=message.channel_data.get("one_to_one") is True)
        conversation = await self.identity.note_inbound(
            conversation, message.channel, message.thread_key)
        if cacheable:
            if len(self._threads) >= CACHE:
                self._threads.pop(next(iter(self._threads)))
            self._threads[key] = conversation
        return conversation

    async def ingest(self, message: InboundMessage) -> IngestResult:
        """Store one inbound message durably (once) and schedule its processing.

        Returns only after the write is acknowledged by the store; raises ``PyMongoError``
        if it could not be stored (the connector must then tell its network to retry).
        """
        link = is_link_payload(message.deep_link)
        if link or message.channel not in NO_SWITCH_FROM:
            # A redelivery (webhooks retry) is answered from one lookup by id, before
            # the identity and channel-switch lookups a new message needs. Web chat
            # threads are cached, so there the insert's duplicate id is the check.
            duplicate = await self.store.find_by_external_id(message.channel,
                                                             message.external_id)
            if duplicate is not None:
                return await self._duplicate(duplicate, None)
        if link:  # a link token: link first (verified)
            await self.identity.redeem(message)
        conversation = await self._conversation_for(message)
        if not message.files:
            item, is_duplicate = await self.store.append_inbound(conversation, message)
        else:  # kept (or a fetch job written with the item) before the item is stored
            accepted = await self.files.accept(
                message, conversation, inbound_id(message.channel, message.external_id))
            item, is_duplicate = await self.store.append_inbound(
                conversation, message, attachments=[*message.attachments,
                                                    *accepted.attachments],
                ops=accepted.ops)
            if accepted.too_large and not is_duplicate:
                await self._too_large(conversation, item, accepted.too_large)
            if accepted.ops and self.fetch_now is not None:
                self.fetch_now()  # its files, from the channel (gateway/fetcher.py)
        if is_duplicate:
            return await self._duplicate(item, conversation)
        self._arrived(conversation.id, item)
        return IngestResult(item, conversation, False)

    async def too_large(self, conversation_id: str, item_id: str, names: list[str]) -> None:
        """A file of an item turned out too large when fetched (gateway/fetcher.py)."""
        conversation = await self.store.get_conversation(conversation_id)
        item = await self.store.get_message(item_id)
        if conversation is not None and item is not None:
            await self._too_large(conversation, item, names)

    async def _too_large(self, conversation: Conversation, item: Activity,
                         names: list[str]) -> None:
        """Tell the customer, on their channel, which of their files were not kept (the
        agent sees them in the item, marked too large)."""
        limit = self.files.max_bytes / (1024 * 1024)
        text = (f"Sorry, we could not receive {', '.join(names)}: files can be at most "
                f"{limit:g} MB. Please send a smaller file or a link.")
        await self.outbox.enqueue(conversation, [OutboundDraft(
            sender=self.bot_party, text=text, reply_to_id=item.id,
            dedupe_key=f"{item.id}:too-large")])

    async def _duplicate(self, item: Activity, conversation: Conversation | None
                         ) -> IngestResult:
        if conversation is None or conversation.id != item.conversation_id:
            conversation = await self.store.get_conversation(item.conversation_id)
        assert conversation is not None
        return IngestResult(item, conversation, True)

    def _arrived(self, conversation_id: str, item: Activity) -> None:
        self._waiting[conversation_id] = max(self._waiting.get(conversation_id, 0), item.seq)
        held = self._held.get(conversation_id)
        if held is not None and not held.lost:
            held.pending[item.seq] = item
        self.schedule(conversation_id)

    def _foreign(self, docs: list[Doc]) -> None:
        """Items another process stored, found by this one's writer: inbound ones of a
        conversation whose turns run here wait for their turn."""
        for doc in docs:
            held = self._held.get(str(doc["conversation_id"]))
            if held is None or held.lost:
                continue
            held.note(int(doc["seq"]))
            if doc.get("direction") == Direction.INBOUND.value:
                held.pending.setdefault(int(doc["seq"]), from_doc(Activity, doc))

    def _stored(self, docs: list[Doc]) -> None:
        """Items this process stored: their seqs are known (no gap to read)."""
        for doc in docs:
            if (self.metrics is not None and doc.get("type") == ActivityType.MESSAGE.value
                    and doc.get("direction") in COUNTED):  # not private notes (internal)
                self.metrics.message_stored(str(doc["channel"]), Direction(doc["direction"]))
            held = self._held.get(str(doc["conversation_id"]))
            if held is not None and not held.lost:
                held.note(int(doc["seq"]))

    async def on_change(self, change: Change) -> None:
        """The change feed: what other processes did that the held conversations need."""
        if change.kind is ChangeKind.ITEM and change.doc is not None:
            doc = change.doc
            cid = str(doc.get("conversation_id"))
            mine = self._held.get(cid)
            if mine is not None and not mine.lost:
                mine.note(int(doc["seq"]))
                if doc.get("direction") == Direction.INBOUND.value:
                    if int(doc["seq"]) > mine.processed:
                        mine.pending.setdefault(int(doc["seq"]), from_doc(Activity, doc))
                    self.schedule(cid)
                elif mine.gap():
                    self.schedule(cid)
        elif change.kind is ChangeKind.CONVERSATION:
            held = self._held.get(change.id)
            if held is not None:
                held.conversation = None
                if "contact_id" in change.fields:
                    held.contact = None
            if "contact_id" in change.fields:
                self.store.writer.forget(change.id)
            for key, conversation in list(self._threads.items()):
                if conversation.id == change.id:
                    del self._threads[key]
        elif change.kind is ChangeKind.CONTACT:
            for held in self._held.values():
                if (held.contact is not None and held.contact.id == change.id
                        and not _profile_current(held.contact, change)):
                    held.contact = None
        elif change.kind is ChangeKind.RESYNC:
            self._threads.clear()
            for held in self._held.values():
                held.known, held.conversation, held.contact = False, None, None

    # --------------------------------------------------------------- processing

    def schedule(self, conversation_id: str) -> None:
        """Process the conversation's unprocessed messages, in order, in the background."""
        if conversation_id in self._running:
            self._again.add(conversation_id)
            return
        task = self._background.spawn(self._drain(conversation_id), f"turns:{conversation_id}")
        self._running[conversation_id] = task

    def busy(self) -> bool:
        """True while a turn runs or waits to run in this process (tests: settle)."""
        return bool(self._running) or any(
            h.next() is not None for h in self._held.values() if not h.lost)

    async def _drain(self, conversation_id: str) -> None:
        try:
            while True:
                self._again.discard(conversation_id)
                try:
                    await self._process(conversation_id)
                except PyMongoError as exc:
                    log.warning("pipeline: store error on %s (the sweeper retries): %s",
                                conversation_id, exc)
                    self._forget(conversation_id)
                    return
                except NotFound:
                    log.error("pipeline: conversation %s does not exist", conversation_id)
                    self._forget(conversation_id)
                    return
                except Exception:
                    log.exception("pipeline: unexpected error on %s", conversation_id)
                    self._forget(conversation_id)
                    return
                if conversation_id not in self._again:
                    return
        finally:
            self._running.pop(conversation_id, None)

    def _forget(self, conversation_id: str) -> None:
        held = self._held.pop(conversation_id, None)
        if held is not None:
            held.lost = True

    async def _hold(self, conversation_id: str) -> Held | None:
        """The conversation's lease, taken or renewed when needed (no round trip while
        a recent turn left enough of it); None if another process holds it."""
        held = self._held.get(conversation_id)
        now = utcnow()
        if held is not None and not held.lost and held.until - now > RENEW_BELOW:
            return held
        if held is not None and not held.lost and held.dirty and await self._checkpoint(held):
            return held  # renewed with the checkpoint
        got = await self.turns.acquire(conversation_id)
        if not isinstance(got, Acquired):
            self._forget(conversation_id)
            self._retry_at(conversation_id, got)
            return None
        if held is None or held.lost or not got.continuous:
            held = Held(conversation_id, got.until)
            self._held[conversation_id] = held
        held.until = got.until
        self._waiting.pop(conversation_id, None)
        return held

    def _retry_at(self, conversation_id: str, until: datetime) -> None:
        """Another process holds the lease and answers what is there (it sees our items
        through its feed). If it died, take over when its lease ends."""
        delay = max(0.5, (until - utcnow()).total_seconds() + 0.5)
        if conversation_id in self._timers:
            self._timers[conversation_id].cancel()
        loop = asyncio.get_running_loop()
        self._timers[conversation_id] = loop.call_later(
            delay, lambda: self._background.spawn(self._recheck(conversation_id),
                                                  f"recheck:{conversation_id}"))

    async def _recheck(self, conversation_id: str) -> None:
        self._timers.pop(conversation_id, None)
        waiting = self._waiting.get(conversation_id)
        try:
            done = await self.turns.processed(conversation_id)
        except PyMongoError:
            done = None
        if waiting is not None and done is not None and done >= waiting:
            self._waiting.pop(conversation_id, None)
            return  # the holder answered it
        self.schedule(conversation_id)

    async def _load(self, held: Held) -> None:
        """Read what the turns need: the conversation, how far it is processed, and the
        inbound items after that."""
        state = await self._read(held)
        held.processed = state.processed_seq
        after = held.processed
        while True:
            items = await self.store.items_after(held.id, after, 500)
            for item in items:
                if item.direction is Direction.INBOUND:
                    held.pending.setdefault(item.seq, item)
            if items:
                after = items[-1].seq
            if len(items) < 500:
                break
        held.known_upto(after)
        held.known = True

    async def _process(self, conversation_id: str) -> None:
        held = await self._hold(conversation_id)
        if held is None:
            return
        while not held.lost:
            if not held.known or held.gap():
                await self._load(held)
            item = held.next()
            if item is None:
                if held.dirty and held.checkpoint_due:
                    await self._checkpoint(held)
                return
            if held.until - utcnow() <= RENEW_BELOW:
                renewed = await self._hold(conversation_id)
                if renewed is None:
                    return
                held = renewed
                continue
            await self._turn(held, item)

    async def _read(self, held: Held) -> TurnState:
        """Read the conversation and its turn state (the bot's memory, how far it is
        processed: the checkpoint and the turn records after it) into ``held``. What is
        read reflects every item up to the fence, taken before reading."""
        try:
            fence = await self.store.writer.known_top(held.id)
        except Missing as exc:
            raise NotFound(f"conversation {held.id} does not exist") from exc
        conversation = await self.store.get_conversation(held.id)
        checkpoint = await self.store.get_turn_checkpoint(held.id)
        if conversation is None or checkpoint is None:
            raise NotFound(f"conversation {held.id} does not exist")
        state = await brought_forward(self.store, checkpoint)
        held.conversation, held.bot_state = conversation, state.bot_state
        held.bot_since, held.epoch, held.fence = state.bot_since, state.epoch, fence
        held.dirty = state.processed_seq != checkpoint.processed_seq
        return state

    async def _conversation(self, held: Held) -> Conversation:
        """The held conversation; read again unless the bot owns it (a cached human
        owner is never trusted: the bot must not stay silent after a hand back)."""
        if held.conversation is None or held.conversation.owner is not OwnerState.BOT:
            await self._read(held)
        assert held.conversation is not None
        return held.conversation

    async def _contact(self, held: Held, contact_id: str) -> Contact | None:
        if held.contact is None or held.contact.id != contact_id:
            held.contact = await self.store.get_contact(contact_id, with_identities=False)
        return held.contact

    async def _done(self, held: Held, item: Activity) -> None:
        """Mark ``item`` processed without a bot turn (a human owns the conversation, a
        link answer, a CSAT answer, ...); what it did changed the conversation."""
        now = utcnow()
        held.conversation = None
        try:
            await self.store.apply([
                Op("turn_state", self.turns.commit_filter(held.id, bot=False),
                   {"$set": {"lease.until": now + LEASE}, "$max": {"processed_seq": item.seq}},
                   required=True),
                *self._memory_ops(held),
                Op("conversations", {"_id": held.id},
                   {"$set": {"updated_at": now}, "$max": {"last_activity_at": now}})])
        except Precondition:
            self._lost(held)
            return
        held.processed = max(held.processed, item.seq)
        held.until = now + LEASE
        held.dirty = False

    def _memory_ops(self, held: Held) -> list[Op]:
        """The checkpoint moves past turn records: the bot's memory goes with it (unless it
        was cleared meanwhile: another epoch)."""
        if not held.dirty:
            return []
        return [Op("turn_state", {"_id": held.id, **epoch_is(held.epoch)},
                   {"$set": {"bot_state": dict(held.bot_state), "bot_since": held.bot_since}})]

    async def _checkpoint(self, held: Held) -> bool:
        """Write the turn state from what the held conversation's turns recorded, with
        its lease renewed. False: not written (the bot no longer owns it, its memory was
        cleared, or the lease is gone): read again before the next turn."""
        held.checkpoint_due = False
        now = utcnow()
        until = now + LEASE
        highs: Doc = {"processed_seq": held.processed}
        if (seen := self.outbox.marks.take(held.id)) is not None:
            highs["delivered_seq"] = seen
        query = {**self.turns.commit_filter(held.id, bot=True), **epoch_is(held.epoch)}
        try:
            await self.store.apply([Op("turn_state", query, {
                "$set": {"bot_state": dict(held.bot_state), "bot_since": held.bot_since,
                         "lease.until": until},
                "$max": highs}, required=True)])
        except BaseException as exc:
            if seen is not None:
                self.outbox.marks.seen(held.id, seen)
            if not isinstance(exc, Precondition):
                raise
            held.conversation, held.known = None, False
            return False
        held.until, held.dirty = until, False
        return True

    def _lost(self, held: Held) -> None:
        log.info("pipeline: lease of %s taken over by another process", held.id)
        self._forget(held.id)

    async def _turn(self, held: Held, item: Activity) -> None:
        """One inbound message, dispatched to the conversation's owner."""
        conversation = await self._conversation(held)
        if is_link_payload(item.deep_link):  # answered here, whoever owns it; not the bot's
            await self.identity.answer_link(conversation, item)
            await self._done(held, item)
            return
        needs_human = item.channel_data.get("needs_human")
        if isinstance(needs_human, str) and needs_human:
            # The connector says this is for a human (an automatic or unreadable mail):
            # the bot never sees it, an open conversation is handed off with that reason.
            if conversation.owner is OwnerState.RESOLVED:
                conversation = await self.routing.reopen(
                    conversation.id, f"{item.id}:reopen") or conversation
            if conversation.owner is OwnerState.BOT:
                await self.routing.handoff(conversation.id, needs_human[:500],
                                           dedupe_key=f"{item.id}:handoff")
            await self._done(held, item)
            return
        if await self.routing.csat.take_answer(conversation, item):
            await self._done(held, item)
            return  # the answer to the CSAT question: recorded, thanked, not reopened
        if conversation.owner is OwnerState.RESOLVED:
            conversation = await self.routing.reopen(conversation.id, f"{item.id}:reopen") \
                or conversation
            held.conversation = None
            if conversation.owner is OwnerState.BOT:
                conversation = await self._conversation(held)
        if conversation.owner is not OwnerState.BOT:
            await self._done(held, item)
            return  # a human owns it (or will): the bot stays silent
        await self._bot_turn(held, conversation, item)

    async def _bot_turn(self, held: Held, conversation: Conversation, item: Activity) -> None:
        contact = await self._contact(held, conversation.contact_id)
        before = held.bot_state
        # A cleared memory (a new conversation, a hand back): the event log starts here.
        since = held.bot_since if before else item.seq
        held.active_at = time.monotonic()

        async def earlier() -> list[dict[str, Any]]:
            return await bot_history(self.store, conversation.id, since, item.seq)

        turn = await self._respond(
            TurnContext(conversation, contact, item, dict(before), history=earlier), before)
        docs = await self.outbox.prepare(conversation, self._drafts(item, turn))
        now = utcnow()
        commit = self._commit(held, conversation, item, turn, docs=docs, since=since, now=now)
        try:
            try:
                items = await self.store.append(conversation.id, docs, commit.ops,
                                                fence=held.fence)
            except Duplicate:
                # The replies are stored already (a re-run of a turn done before): say
                # nothing twice; record the turn in the turn state, and read again.
                commit = self._commit(held, conversation, item, turn, docs=[], since=since,
                                      now=now)
                items = await self.store.append(conversation.id, [], commit.ops)
                held.conversation, held.known = None, False
        except BaseException as exc:
            if commit.seen is not None:  # not written: the next write carries it
                self.outbox.marks.seen(conversation.id, commit.seen)
            if not isinstance(exc, Precondition):
                raise
            # Something the turn did not see came first (an agent took over while it was
            # thinking, another process's turn) or the lease went to another process:
            # read again; the turn is decided anew.
            held.conversation, held.known = None, False
            fresh = await self.store.get_turn_checkpoint(conversation.id)
            if fresh is None or fresh.lease is None or fresh.lease.owner != self.instance:
                self._lost(held)
            return
        held.processed = max(held.processed, item.seq)
        held.pending.pop(item.seq, None)
        held.bot_state, held.bot_since = dict(turn.state), since
        if items:
            held.fence = max(held.fence, items[-1].seq)
        if commit.until is None:
            held.dirty = True
        else:
            held.until, held.dirty = commit.until, False
        if commit.touch and held.conversation is not None:
            held.conversation = conversation.model_copy(update={"last_activity_at": now})
        if turn.profile and contact is not None:
            merged = {**contact.profile, **turn.profile}
            held.contact = contact.model_copy(update={
                "profile": {k: v for k, v in merged.items() if v is not None}})
        self.outbox.deliver(conversation, items)
        if self.metrics is not None:
            self.metrics.turn_done((utcnow() - item.created_at).total_seconds())
        await self._ends(held, item, before, turn)

    def _commit(self, held: Held, conversation: Conversation, item: Activity,
                turn: BotTurn, *, docs: list[Doc], since: int, now: datetime) -> _Commit:
        """What a bot turn writes besides its replies. A turn that answers records itself
        on its first reply and writes no turn state (``until`` None: the lease is not
        renewed by it); a silent one writes the turn state (memory, processed mark,
        lease) and keeps its event-log entries apart."""
        commit = _Commit()
        if docs:
            keep_record(docs, seq=item.seq, epoch=held.epoch, state=dict(turn.state),
                        since=since, events=turn.events)
        else:
            commit.until = now + LEASE
            highs: Doc = {"processed_seq": item.seq}
            if (seen := self.outbox.marks.take(conversation.id)) is not None:
                highs["delivered_seq"] = commit.seen = seen
            commit.ops.append(Op(
                "turn_state", self.turns.commit_filter(conversation.id, bot=True),
                {"$set": {"bot_state": dict(turn.state), "bot_since": since,
                          "lease.until": commit.until}, "$max": highs}, required=True))
            if turn.events:
                commit.ops.append(events_op(conversation.id, item.seq, turn.events, now))
        active = conversation.last_activity_at
        if active is None or now - active >= ACTIVITY_EVERY:
            commit.touch = True
            commit.ops.append(Op(
                "conversations", {"_id": conversation.id},
                {"$set": {"updated_at": now}, "$max": {"last_activity_at": now}}))
        if turn.profile and (profile := profile_update(turn.profile)):
            commit.ops.append(Op("contacts", {"_id": conversation.contact_id}, profile))
        return commit

    async def _respond(self, context: TurnContext, before: Mapping[str, Any]) -> BotTurn:
        try:
            async with asyncio.timeout(BOT_TIMEOUT):
                return await self.bot.respond(context)
        except PyMongoError:
            raise  # the store, not the bot: leave the message for the sweeper
        except Exception:
            # A bot bug must not wedge the conversation (the message would fail again on
            # every retry, and block every message after it): apologise, keep the bot's
            # previous memory, and mark the message processed like any other.
            log.exception("pipeline: the bot failed on message %s of %s",
                          context.message.id, context.conversation.id)
            return BotTurn([Reply(BOT_ERROR_TEXT)], dict(before))

    async def _ends(self, held: Held, item: Activity, before: Mapping[str, Any],
                    turn: BotTurn) -> None:
        """The turn asked for a human, or closed the conversation."""
        conversation_id = held.id
        if turn.handoff is not None:
            held.conversation = None
            await self.routing.handoff(
                conversation_id,
                turn.handoff.reason,
                skill=turn.handoff.skill,
                team=turn.handoff.team,
                priority=turn.handoff.priority,
                dedupe_key=f"{item.id}:handoff",
                # a flow begun and handed off in this turn has ended: the handoff names it
                topic=_flow(before) or turn.handoff.flow or _flow(turn.state),
            )
        elif turn.resolve:
            held.conversation = None
            await self.routing.bot_resolve(
                conversation_id, f"{item.id}:resolve",
                topic=_flow(before) or _flow(turn.state))

    def _drafts(self, item: Activity, turn: BotTurn) -> list[OutboundDraft]:
        """The bot's replies to ``item``; the dedupe key makes a re-run say them once."""
        return [
            OutboundDraft(
                sender=self.bot_party,
                text=reply.text,
                buttons=reply.buttons,
                reply_to_id=item.id,
                dedupe_key=f"{item.id}:reply:{n}",
            )
            for n, reply in enumerate(turn.replies)
        ]

    # ------------------------------------------------------------------ sweeper

    async def sweep_once(self, older_than: timedelta = STALE_AFTER) -> int:
        """Schedule every conversation with inbound messages left unprocessed (a crash, a
        restart, a missed signal). Looks at what was stored since the last sweep."""
        now = utcnow()
        before = now - older_than
        if self._mark is None:
            self._mark = await self.turns.load_mark() or now - FIRST_SWEEP
        since = min(self._mark, before)
        waiting, oldest = await self.turns.unprocessed(since, before)
        self._checkpoint_idle()
        for conversation_id in waiting:
            held = self._held.get(conversation_id)
            if held is not None and conversation_id not in self._running:
                held.known = False  # it should have known: read the store again
            self.schedule(conversation_id)
        self._mark = oldest if oldest is not None else before
        if self._mark_saved is None or self._mark - self._mark_saved >= MARK_SAVE_EVERY:
            await self.turns.save_mark(self._mark)
            self._mark_saved = self._mark
        return len(waiting)

    def _checkpoint_idle(self) -> None:
        """Conversations whose turns recorded more than their checkpoint says, idle for
        CHECKPOINT_IDLE: their turn state is written (in their turn, by ``_process``)."""
        idle_since = time.monotonic() - CHECKPOINT_IDLE
        for held in list(self._held.values()):
            if held.dirty and not held.lost and held.active_at <= idle_since:
                held.checkpoint_due = True
                self.schedule(held.id)

    async def _sweep(self, first: bool) -> None:
        # At start-up everything unprocessed is left over from before; later, only what
        # has waited long enough that no running turn will pick it up.
        found = await self.sweep_once(timedelta(0) if first else STALE_AFTER)
        if found:
            log.info("pipeline: resuming %d conversation(s) with unprocessed messages", found)

    def start(self) -> None:
        self._background.every(self.sweep_seconds, self._sweep)

    async def stop(self, grace: float = 5.0) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self._background.stop(grace)
        dirty = [h for h in self._held.values() if h.dirty and not h.lost]
        if dirty:  # a courtesy (the turn records count anyway), in one group commit
            with contextlib.suppress(TimeoutError, PyMongoError):
                await asyncio.wait_for(asyncio.gather(
                    *(self._checkpoint(h) for h in dirty)), SHUTDOWN_WAIT)
        try:
            with pymongo.timeout(SHUTDOWN_WAIT):
                await self.turns.release_all()
        except PyMongoError as exc:
            log.info("pipeline: leases not released (they expire): %s", exc)


def _flow(state: Mapping[str, Any]) -> str | None:
    """The bot flow a bot state was in (analytics' topic), if any."""
    flow = state.get("flow")
    return flow if isinstance(flow, str) and flow else None


def _profile_current(contact: Contact, change: Change) -> bool:
    """True if a contact's profile change leaves the cached ``contact`` as it is (the
    turn that wrote it updated the cache already): every changed key has the cached
    value. Anything else (a removed key, another field) reads the contact again."""
    for name in change.removed:
        if name.removeprefix("profile.") in contact.profile or not name.startswith("profile."):
            return False
    for name, value in change.fields.items():
        if name == "profile_at":
            continue
        key = name.removeprefix("profile.")
        if key == name or "." in key or key not in contact.profile:
            return False
        if contact.profile[key] != value:
            return False
    return True
