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
from collections.abc import Callable
from datetime import datetime, timedelta

import pymongo
from pymongo.errors import PyMongoError

from connectors.base import IngestResult
from flows.bot import Bot
from gateway.aio import Background
from gateway.bot_turn import BOT_TIMEOUT, BotTurns
from gateway.feed import Change, ChangeKind
from gateway.files import Files, size_text
from gateway.held import Held
from gateway.identity import Identity, is_continue_request, is_link_payload
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
from gateway.store.mongo import SHUTDOWN_WAIT, Doc, Op, from_doc
from gateway.store.turn_records import brought_forward
from gateway.store.turns import LEASE, Acquired, Turns, instance_name
from gateway.store.writer import Missing, Precondition

log = logging.getLogger(__name__)

COUNTED = (Direction.INBOUND.value, Direction.OUTBOUND.value)  # omnigate_messages_total

STALE_AFTER = timedelta(seconds=15)
RENEW_BELOW = timedelta(seconds=BOT_TIMEOUT + 3)  # lease left before a turn starts
FIRST_SWEEP = timedelta(hours=1)  # how far back a first sweep ever looks
MARK_SAVE_EVERY = timedelta(seconds=60)
CACHE = 10_000  # web chat threads whose conversation is remembered
# A conversation whose turn records are ahead of its checkpoint gets the checkpoint
# written once it has been idle this long (the sweeper looks every sweep_seconds).
CHECKPOINT_IDLE = 2.0


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
        self.bot_turns = BotTurns(store, bot, outbox, routing, self.turns,
                                  bot_party=self.bot_party, lost=self._lost)
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

    @property
    def metrics(self) -> Metrics | None:
        """Set by the app (gateway/metrics.py); the bot turns report to it too."""
        return self.bot_turns.metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        self.bot_turns.metrics = metrics

    # ------------------------------------------------------------------ inbound

    async def open_conversation(
        self, channel: str, thread_key: str, sender_external_id: str, name: str | None = None,
        *, one_to_one: bool = False,
    ) -> Conversation:
        identity = await self.store.resolve_identity(channel, sender_external_id, name)
        if not identity.reachable:  # they wrote to us: reachable again (unblocked, ...)
            await self.store.set_identity_reachable(channel, sender_external_id, True)
        if identity.conversation_id is not None:  # a web chat visitor who came by a link
            bound = await self.store.get_conversation(identity.conversation_id)
            if bound is not None:
                return bound
        # channel switch: a linked customer's open conversation elsewhere goes on here
        # (one_to_one: the connector vouches that only the sender and we are in it)
        elsewhere = await self.identity.continue_elsewhere(
            channel, thread_key, identity.contact_id, sender_external_id,
            one_to_one=one_to_one)
        if elsewhere is not None:
            return elsewhere
        return await self.store.resolve_conversation(
            channel, thread_key, identity.contact_id,
            one_to_one=one_to_one or thread_key == sender_external_id)

    async def _conversation_for(self, message: InboundMessage,
                                continued: str | None = None) -> Conversation:
        """The message's conversation (``continued``: the one a link it redeemed was
        asked for in). A web chat thread always keeps its conversation (no channel switch
        from it), so that is remembered; the feed says when it moved to another contact
        or its replies to another channel."""
        key = (message.channel, message.thread_key)
        cacheable = message.channel in NO_SWITCH_FROM
        if cacheable and (known := self._threads.get(key)) is not None:
            return known
        found = None if continued is None else await self.store.get_conversation(continued)
        conversation = found or await self.open_conversation(
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
        continued = None
        if link:  # a link token: link first (verified)
            continued = await self.identity.redeem(message)
        conversation = await self._conversation_for(message, continued)
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
        text = (f"Sorry, we could not receive {', '.join(names)}: files can be at most "
                f"{size_text(self.files.max_bytes)}. Please send a smaller file or a link.")
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
        if (held is not None and not held.lost and held.dirty
                and await self.bot_turns.checkpoint(held)):
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
                    await self.bot_turns.checkpoint(held)
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
                *self.bot_turns.memory_ops(held),
                Op("conversations", {"_id": held.id},
                   {"$set": {"updated_at": now}, "$max": {"last_activity_at": now}})])
        except Precondition:
            self._lost(held)
            return
        held.processed = max(held.processed, item.seq)
        held.until = now + LEASE
        held.dirty = False

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
        if item.value is None and is_continue_request(item.text):  # links elsewhere: ours
            await self.identity.answer_continue(conversation, item)
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
        await self.bot_turns.run(held, conversation, item)

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
                    *(self.bot_turns.checkpoint(h) for h in dirty)), SHUTDOWN_WAIT)
        try:
            with pymongo.timeout(SHUTDOWN_WAIT):
                await self.turns.release_all()
        except PyMongoError as exc:
            log.info("pipeline: leases not released (they expire): %s", exc)


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
