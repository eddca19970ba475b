"""``ingest``: the only orchestration code. Every channel's messages take this road.

    connector ─► ingest: dedupe ─► contact + identity ─► conversation ─► store (durable)
              ◄─ ack (the connector answers its network only now)
    background, per conversation, in seq order:
       owner bot      ─► Bot.respond ─► outbox (stored, then delivered) ─► maybe handoff
       owner queued / agent ─► nothing: the agent reads it from the store
       owner resolved ─► reopened to the bot, then as above

Processing state lives in the store: an inbound item is ``processed: false`` until its
turn is done, and a conversation is processed by whoever holds its lease. A crash or a
restart loses nothing: the sweeper finds unprocessed items and processes them again, and
replies carry a ``dedupe_key`` so a re-processed message is still answered only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from pymongo.errors import PyMongoError

from connectors.base import IngestResult
from flows.bot import Bot, BotTurn, Reply, TurnContext
from gateway.aio import Background
from gateway.identity import Identity, is_link_payload
from gateway.model import (
    Activity,
    Conversation,
    InboundMessage,
    OutboundDraft,
    OwnerState,
    Party,
    Role,
    utcnow,
)
from gateway.outbox import Outbox
from gateway.routing import Routing
from gateway.store import Store
from gateway.store.mongo import FREE

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=30)
BATCH = 20
STALE_AFTER = timedelta(seconds=10)
# A bot turn that takes longer is abandoned (well inside LEASE, so no other process can
# take over the conversation while the turn still runs).
BOT_TIMEOUT = 20.0
# What the customer is told when the bot fails on their message (it raised or timed out).
BOT_ERROR_TEXT = (
    "Sorry, something went wrong on my side and I could not answer that. "
    "Please try again in a moment."
)


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
    ) -> None:
        self.store = store
        self.bot = bot
        self.outbox = outbox
        self.routing = routing
        self.identity = Identity(store, outbox)
        self.bot_party = Party(role=Role.BOT, name=bot_name)
        self.sweep_seconds = sweep_seconds
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._background = Background("pipeline")
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

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

    async def ingest(self, message: InboundMessage) -> IngestResult:
        """Store one inbound message durably (once) and schedule its processing.

        Returns only after the write is acknowledged by the store; raises ``PyMongoError``
        if it could not be stored (the connector must then tell its network to retry).
        """
        duplicate = await self.store.find_by_external_id(message.channel, message.external_id)
        if duplicate is not None:
            conversation = await self.store.get_conversation(duplicate.conversation_id)
            assert conversation is not None
            return IngestResult(duplicate, conversation, True)
        if is_link_payload(message.deep_link):  # a link token: link first (verified)
            await self.identity.redeem(message)
        conversation = await self.open_conversation(
            message.channel, message.thread_key, message.sender_external_id, message.sender.name,
            one_to_one=message.channel_data.get("one_to_one") is True,
        )
        conversation = await self.identity.note_inbound(
            conversation, message.channel, message.thread_key)
        item, is_duplicate = await self.store.append_inbound(conversation, message, checked=True)
        if not is_duplicate:
            self.schedule(conversation.id)
        return IngestResult(item, conversation, is_duplicate)

    # --------------------------------------------------------------- processing

    def schedule(self, conversation_id: str) -> None:
        """Process the conversation's unprocessed messages, in order, in the background."""
        if conversation_id in self._running:
            self._again.add(conversation_id)
            return
        task = self._background.spawn(self._drain(conversation_id), f"turns:{conversation_id}")
        self._running[conversation_id] = task

    async def _drain(self, conversation_id: str) -> None:
        try:
            while True:
                self._again.discard(conversation_id)
                try:
                    await self._process(conversation_id)
                except PyMongoError as exc:
                    log.warning(
                        "pipeline: store error on %s (the sweeper retries): %s",
                        conversation_id,
                        exc,
                    )
                    return
                except Exception:
                    log.exception("pipeline: unexpected error on %s", conversation_id)
                    return
                if conversation_id not in self._again:
                    return
        finally:
            self._running.pop(conversation_id, None)

    async def _acquire(self, conversation_id: str) -> bool:
        """Take (or extend) the conversation's processing lease in the store."""
        now = utcnow()
        lease = {"$set": {"lease": {"owner": self.instance, "until": now + LEASE}}}
        conversations = self.store.conversations
        # Two plain conditions, not one $or: SecantusDB scans the collection for an $or.
        free = await conversations.update_one(
            {"_id": conversation_id, "lease.until": {"$lt": now}}, lease
        )
        if free.matched_count:
            return True
        mine = await conversations.update_one(
            {"_id": conversation_id, "lease.owner": self.instance}, lease
        )
        return mine.matched_count == 1

    async def _release(self, conversation_id: str) -> None:
        await self.store.conversations.update_one(
            {"_id": conversation_id, "lease.owner": self.instance},
            {"$set": {"lease": {"owner": None, "until": FREE}}},
        )

    async def _process(self, conversation_id: str) -> None:
        while await self._acquire(conversation_id):
            try:
                while True:
                    batch = await self.store.unprocessed(conversation_id, limit=BATCH)
                    for item in batch:
                        await self._turn(item)
                        await self.store.mark_processed(item.id)
                    if len(batch) < BATCH:
                        break
                    if not await self._acquire(conversation_id):  # extend the lease
                        return  # lost it (we were too slow): the new holder goes on
            finally:
                with contextlib.suppress(PyMongoError):
                    await self._release(conversation_id)
            # A message stored (by another process) while we held the lease found it taken
            # and was left to us: look again now that the lease is released.
            if not await self.store.unprocessed(conversation_id, limit=1):
                return
        # another process holds the lease and will process what is there

    async def _turn(self, item: Activity) -> None:
        """One inbound message, dispatched to the conversation's owner."""
        conversation = await self.store.get_conversation(item.conversation_id)
        if conversation is None:
            log.error("pipeline: message %s has no conversation", item.id)
            return
        if is_link_payload(item.deep_link):  # answered here, whoever owns it; not the bot's
            await self.identity.answer_link(conversation, item)
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
            return
        if await self.routing.csat.take_answer(conversation, item):
            return  # the answer to the CSAT question: recorded, thanked, not reopened
        if conversation.owner is OwnerState.RESOLVED:
            reopened = await self.routing.reopen(conversation.id, f"{item.id}:reopen")
            conversation = reopened or conversation
        if conversation.owner is not OwnerState.BOT:
            return  # a human owns it (or will): the bot stays silent
        contact = await self.store.get_contact(conversation.contact_id, with_identities=False)
        context = TurnContext(conversation, contact, item, dict(conversation.bot_state))
        try:
            async with asyncio.timeout(BOT_TIMEOUT):
                turn = await self.bot.respond(context)
            drafts = self._drafts(item, turn)
        except PyMongoError:
            raise  # the store, not the bot: leave the message for the sweeper
        except Exception:
            # A bot bug must not wedge the conversation (the message would fail again on
            # every retry, and block every message after it): apologise, keep the bot's
            # previous memory, and mark the message processed like any other.
            log.exception(
                "pipeline: the bot failed on message %s of %s", item.id, conversation.id
            )
            turn = BotTurn([Reply(BOT_ERROR_TEXT)], dict(conversation.bot_state))
            drafts = self._drafts(item, turn)
        if not await self.store.set_bot_state(conversation.id, turn.state):
            return  # ownership changed while the bot was thinking: say nothing
        if turn.profile:
            await self.store.update_profile(conversation.contact_id, turn.profile)
        await self.outbox.enqueue(conversation, drafts)
        if turn.handoff is not None:
            await self.routing.handoff(
                conversation.id,
                turn.handoff.reason,
                skill=turn.handoff.skill,
                team=turn.handoff.team,
                priority=turn.handoff.priority,
                dedupe_key=f"{item.id}:handoff",
                # a flow begun and handed off in this turn has ended: the handoff names it
                topic=_flow(conversation.bot_state) or turn.handoff.flow or _flow(turn.state),
            )
        elif turn.resolve:
            await self.routing.bot_resolve(
                conversation.id, f"{item.id}:resolve",
                topic=_flow(conversation.bot_state) or _flow(turn.state))

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
        """Schedule every conversation with messages left unprocessed (crash, restart)."""
        ids = await self.store.conversations_with_unprocessed(utcnow() - older_than)
        for conversation_id in ids:
            self.schedule(conversation_id)
        return len(ids)

    async def _sweep(self, first: bool) -> None:
        # At start-up everything unprocessed is left over from before; later, only what
        # has waited long enough that no running turn will pick it up.
        found = await self.sweep_once(timedelta(0) if first else STALE_AFTER)
        if found:
            log.info("pipeline: resuming %d conversation(s) with unprocessed messages", found)

    def start(self) -> None:
        self._background.every(self.sweep_seconds, self._sweep)

    async def stop(self, grace: float = 5.0) -> None:
        await self._background.stop(grace)


def _flow(state: Mapping[str, Any]) -> str | None:
    """The bot flow a bot state was in (analytics' topic), if any."""
    flow = state.get("flow")
    return flow if isinstance(flow, str) and flow else None
