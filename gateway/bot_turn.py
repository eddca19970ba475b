"""A bot turn: the bot answers one inbound item of a conversation this process holds.

What the turn changed is committed with its replies: the first reply carries the turn's
record (the item it answered, the bot's memory after it, its event-log entries) and
nothing else is written for it; a turn without a reply writes the turn state instead.
The commit is fenced at what the turn saw, so it never lands after an owner change or
another process's turn (gateway/store/turn_records.py). The turn state is a checkpoint of
the records, written by ``checkpoint`` (with the lease's renewal, when the conversation
goes idle, on shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pymongo.errors import PyMongoError

from flows.bot import Bot, BotTurn, Reply, TurnContext
from gateway.held import Held
from gateway.metrics import Metrics
from gateway.model import Activity, Contact, Conversation, OutboundDraft, Party, utcnow
from gateway.outbox import Outbox
from gateway.routing import Routing
from gateway.store import Store
from gateway.store.mongo import Doc, Op, epoch_is, profile_update
from gateway.store.turn_records import events_op, keep_record
from gateway.store.turn_records import history as bot_history
from gateway.store.turns import LEASE, Turns
from gateway.store.writer import Duplicate, Precondition

log = logging.getLogger(__name__)

# A bot turn that takes longer is abandoned (well inside LEASE, so no other process can
# take over the conversation while the turn still runs).
BOT_TIMEOUT = 20.0
# A bot turn writes the conversation's last_activity_at when it is older than this
# (the turn itself writes its replies only).
ACTIVITY_EVERY = timedelta(seconds=60)
# What the customer is told when the bot fails on their message (it raised or timed out).
BOT_ERROR_TEXT = (
    "Sorry, something went wrong on my side and I could not answer that. "
    "Please try again in a moment."
)


@dataclass(eq=False)
class _Commit:
    """What a bot turn's commit writes besides its replies (``BotTurns._commit``)."""

    ops: list[Op] = field(default_factory=list)
    until: datetime | None = None  # the lease's new end, if the commit renews it
    seen: int | None = None  # a delivered mark it carries
    touch: bool = False  # it brings the conversation's last activity forward
    intent: str | None = None  # it adds this intent to the conversation's


class BotTurns:
    """Runs the bot's turns for the pipeline, and writes their checkpoints."""

    def __init__(self, store: Store, bot: Bot, outbox: Outbox, routing: Routing, turns: Turns,
                 *, bot_party: Party, lost: Callable[[Held], None]) -> None:
        self.store = store
        self.bot = bot
        self.outbox = outbox
        self.routing = routing
        self.turns = turns
        self.instance = turns.instance
        self.bot_party = bot_party
        self.metrics: Metrics | None = None
        self._lost = lost

    def memory_ops(self, held: Held) -> list[Op]:
        """The checkpoint moves past turn records: the bot's memory goes with it (unless it
        was cleared meanwhile: another epoch)."""
        if not held.dirty:
            return []
        return [Op("turn_state", {"_id": held.id, **epoch_is(held.epoch)},
                   {"$set": {"bot_state": dict(held.bot_state), "bot_since": held.bot_since}})]

    def _state_op(self, conversation_id: str, *, state: Mapping[str, Any], since: int,
                  processed: int, until: datetime, epoch: int | None = None
                  ) -> tuple[Op, int | None]:
        """The turn state written from a turn (required: the lease is this process's and
        the bot owns the conversation; of ``epoch``, if given), with the delivered mark
        waiting for it; the mark is returned, to give back if the write fails."""
        highs: Doc = {"processed_seq": processed}
        if (seen := self.outbox.marks.take(conversation_id)) is not None:
            highs["delivered_seq"] = seen
        query = self.turns.commit_filter(conversation_id, bot=True)
        if epoch is not None:
            query.update(epoch_is(epoch))
        return Op("turn_state", query, {
            "$set": {"bot_state": dict(state), "bot_since": since, "lease.until": until},
            "$max": highs}, required=True), seen

    async def checkpoint(self, held: Held) -> bool:
        """Write the turn state from what the held conversation's turns recorded, with
        its lease renewed. False: not written (the bot no longer owns it, its memory was
        cleared, or the lease is gone): read again before the next turn."""
        held.checkpoint_due = False
        until = utcnow() + LEASE
        op, seen = self._state_op(held.id, state=held.bot_state, since=held.bot_since,
                                  processed=held.processed, until=until, epoch=held.epoch)
        try:
            await self.store.apply([op])
        except BaseException as exc:
            if seen is not None:
                self.outbox.marks.seen(held.id, seen)
            if not isinstance(exc, Precondition):
                raise
            held.conversation, held.known = None, False
            return False
        held.until, held.dirty = until, False
        return True

    async def _contact(self, held: Held, contact_id: str) -> Contact | None:
        if held.contact is None or held.contact.id != contact_id:
            held.contact = await self.store.get_contact(contact_id, with_identities=False)
        return held.contact

    async def run(self, held: Held, conversation: Conversation, item: Activity) -> None:
        """The bot answers ``item``; its replies, record and effects are committed."""
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
        if held.conversation is not None and (commit.touch or commit.intent):
            update: dict[str, Any] = {"last_activity_at": now} if commit.touch else {}
            if commit.intent:
                update["intents"] = [*conversation.intents, commit.intent]
            held.conversation = conversation.model_copy(update=update)
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
        lease) and keeps its event-log entries apart. The intent the turn recognised
        goes on the conversation the first time it is seen there (analytics)."""
        commit = _Commit()
        if docs:
            keep_record(docs, seq=item.seq, epoch=held.epoch, state=dict(turn.state),
                        since=since, events=turn.events)
        else:
            commit.until = now + LEASE
            op, commit.seen = self._state_op(conversation.id, state=turn.state, since=since,
                                             processed=item.seq, until=commit.until)
            commit.ops.append(op)
            if turn.events:
                commit.ops.append(events_op(conversation.id, item.seq, turn.events, now))
        active = conversation.last_activity_at
        if active is None or now - active >= ACTIVITY_EVERY:
            commit.touch = True
            commit.ops.append(Op(
                "conversations", {"_id": conversation.id},
                {"$set": {"updated_at": now}, "$max": {"last_activity_at": now}}))
        if turn.intent and turn.intent not in conversation.intents:  # analytics' intents
            commit.intent = turn.intent
            commit.ops.append(Op("conversations", {"_id": conversation.id},
                                 {"$addToSet": {"intents": turn.intent}}))
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


def _flow(state: Mapping[str, Any]) -> str | None:
    """The bot flow a bot state was in (analytics' topic), if any."""
    flow = state.get("flow")
    return flow if isinstance(flow, str) and flow else None
