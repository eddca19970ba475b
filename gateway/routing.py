"""Ownership of a conversation: bot → queued → agent → resolved (or back to the bot).

Each change is one conditional update in the store, so when two agents claim at once
exactly one wins, and the bot and a human never both own a conversation. Every change
also leaves an ``event`` item in the conversation's history (delivered to the customer's
channel like any other item) so agents and customers see the chronology: the update and
its event are one writer unit (``_change``), written together or not at all, so the
events are in the order of the changes even when the next change is made by another
process the moment the first is visible (assigned, then resolved at once elsewhere).

A conversation with no activity for ``OMNIGATE_IDLE_RESOLVE_HOURS`` is resolved by the
idle resolver (gateway/idle.py, ``resolve_idle``) the same way: one conditional change
with its event, counted as abandoned.

Agents' load changes in the same store transaction as the owner (gateway/store/queue.py):
a claim or a transfer adds one, resolve, hand back, transfer away and re-queue take one
off; automatic assignment (``assign``) takes a slot only below capacity. Whenever a
conversation may have become assignable, ``wake()`` asks the assigner (gateway/assign.py)
to hand out waiting conversations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from gateway.analytics import Outcomes
from gateway.csat import CsatConfig, CsatSurvey
from gateway.model import (
    Activity,
    ActivityType,
    Agent,
    Attachment,
    Conversation,
    Handoff,
    OutboundDraft,
    OwnerState,
    Party,
    Presence,
    Role,
    utcnow,
)
from gateway.outbox import Outbox
from gateway.sla import ServiceLevels
from gateway.store import NotFound, Store
from gateway.store.items import private_doc
from gateway.store.queue import Assigned, QueueStore
from gateway.store.turn_records import current as current_turn_state
from gateway.store.writer import Duplicate, Op, Precondition

__all__ = ["SYSTEM", "Assigned", "Conflict", "Routing", "who"]

log = logging.getLogger(__name__)

SYSTEM = Party(role=Role.SYSTEM, name="Omnigate")


class Conflict(Exception):
    """The conversation is not in a state that allows this (HTTP 409)."""

    def __init__(self, message: str, conversation: Conversation | None = None) -> None:
        super().__init__(message)
        self.conversation = conversation


def _nothing() -> None:
    return None


def who(agent: Agent) -> str:
    """An agent as log lines name them: the name people know, the id that is unique."""
    return f"{agent.name} ({agent.id})"


class Routing:
    def __init__(self, store: Store, outbox: Outbox) -> None:
        self.store = store
        self.outbox = outbox
        self.queue = QueueStore(store)
        self._wake: Callable[[], None] = _nothing
        # Every resolve records an outcome (analytics) and may ask CSAT (gateway/csat.py).
        self.outcomes = Outcomes(store)
        self.csat = CsatSurvey(store, outbox, self.outcomes)
        # SLA timers and business hours (gateway/sla.py; configured in app.core_ctx).
        self.levels = ServiceLevels(store, outbox)

    def on_wake(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a conversation may now be assignable."""
        self._wake = callback

    def wake(self) -> None:
        self._wake()

    async def _event(
        self, conversation: Conversation, name: str, text: str, dedupe_key: str | None = None,
        ops: list[Op] | None = None,
    ) -> None:
        draft = OutboundDraft(
            type=ActivityType.EVENT, sender=SYSTEM, name=name, text=text, dedupe_key=dedupe_key
        )
        await self.outbox.enqueue(conversation, [draft], ops or [])

    async def _change(
        self,
        conversation_id: str,
        expected: set[OwnerState],
        to: OwnerState,
        event: tuple[str, str],
        *,
        also: Mapping[str, Any] | None = None,
        where: Mapping[str, Any] | None = None,
        joins: str | None = None,
        leaves: str | None = None,
        dedupe_key: str | None = None,
        reset_bot: bool = False,
    ) -> Conversation | None:
        """Move the conversation to ``to`` if it is in an ``expected`` state (and
        ``where``), with agents' loads (``QueueStore.move_ops``) and the ``event`` (name,
        text) in the same transaction. Returns the updated conversation, or None if it
        was not in an expected state (of two concurrent callers exactly one wins) or
        this change was made before (its ``dedupe_key`` event is stored)."""
        current = await self.store.get_conversation(conversation_id)
        if current is None or current.owner not in expected:
            return None
        ops = self.queue.move_ops(conversation_id, expected, to, utcnow(), also=also,
                                  where=where, joins=joins, leaves=leaves,
                                  reset_bot=reset_bot)
        if not await self._with_event(current, event, ops, dedupe_key):
            return None
        return await self.store.get_conversation(conversation_id)

    async def _with_event(self, conversation: Conversation, event: tuple[str, str],
                          ops: list[Op], dedupe_key: str | None = None) -> bool:
        """Write ``ops`` and the event in one unit. False: nothing was written (a required
        update matched nothing, or the ``dedupe_key`` event is stored already)."""
        try:
            await self._event(conversation, *event, dedupe_key, ops)
        except (Precondition, Duplicate):
            return False
        return True

    async def _get(self, conversation_id: str) -> Conversation:
        conversation = await self.store.get_conversation(conversation_id)
        if conversation is None:
            raise NotFound(f"conversation {conversation_id} does not exist")
        return conversation

    async def handoff(
        self,
        conversation_id: str,
        reason: str,
        *,
        skill: str | None = None,
        team: str | None = None,
        priority: str = "normal",
        dedupe_key: str | None = None,
        topic: str | None = None,
    ) -> Conversation | None:
        """Bot → queue, with a reason. None if the bot did not own the conversation."""
        handoff = Handoff(reason=reason, skill=skill, team=team, priority=priority,
                          requested_at=utcnow(), topic=topic)
        conversation = await self._change(
            conversation_id, {OwnerState.BOT}, OwnerState.QUEUED,
            ("handoff", "You are in the queue for a human agent. They will see everything "
                        "you have written so far."),
            also={"handoff": handoff.model_dump(mode="python"), "assignee_id": None,
                  "sla": self.levels.plan(handoff, self.levels.clock()).model_dump()},
            dedupe_key=dedupe_key,
        )
        if conversation is None:
            return None
        log.info("conversation %s handed off: %s", conversation_id, reason)
        await self.levels.handed_off(conversation)  # closed now? tell them when we open
        self.wake()
        return conversation

    async def claim(self, conversation_id: str, agent: Agent) -> Conversation:
        """Queue → this agent. Exactly one of concurrent claimers wins; others get Conflict."""
        # A claim is the agent's own choice: it counts toward the load, but is not held
        # to the capacity (that limits what the assigner hands out).
        conversation = await self._change(
            conversation_id, {OwnerState.QUEUED}, OwnerState.AGENT,
            ("assigned", f"{agent.name} joined the conversation."),
            also={"assignee_id": agent.id}, joins=agent.id,
        )
        if conversation is None:
            current = await self._get(conversation_id)
            if current.owner is OwnerState.AGENT and current.assignee_id == agent.id:
                return current  # claiming twice is harmless
            raise Conflict(await self._why_not(current, agent, "claim"), current)
        log.info("conversation %s claimed by %s", conversation_id, who(agent))
        return conversation

    async def assign(self, conversation_id: str, agent: Agent) -> Assigned:
        """Queue → this agent, automatically, never beyond the agent's capacity."""
        current = await self.store.get_conversation(conversation_id)
        if current is None or current.owner is not OwnerState.QUEUED:
            return Assigned.TAKEN
        ops = self.queue.assign_ops(conversation_id, agent, utcnow())
        if not await self._with_event(
                current, ("assigned", f"{agent.name} joined the conversation."), ops):
            # the agent was full or the conversation taken: the conversation tells which
            now = await self.store.get_conversation(conversation_id)
            queued = now is not None and now.owner is OwnerState.QUEUED
            return Assigned.AGENT_FULL if queued else Assigned.TAKEN
        log.info("conversation %s assigned to %s", conversation_id, who(agent))
        return Assigned.ASSIGNED

    async def require_assignee(self, conversation_id: str, agent: Agent,
                               action: str = "answer") -> Conversation:
        conversation = await self._get(conversation_id)
        if conversation.owner is not OwnerState.AGENT or conversation.assignee_id != agent.id:
            raise Conflict(await self._why_not(conversation, agent, action), conversation)
        return conversation

    async def _why_not(self, conversation: Conversation, agent: Agent, action: str) -> str:
        """Why ``agent`` cannot ``action`` the conversation (a 409's message): what state it
        is in, and what can be done, for people. ``action``: "answer", "hand back", ..."""
        owner = conversation.owner
        it = " it ".join(action.split(" ", 1)) if " " in action else f"{action} it"
        if owner is OwnerState.QUEUED:
            return (f"this conversation is waiting in the queue: claim it before you {it}"
                    if action != "claim" else "this conversation changed just now; try again")
        if owner is OwnerState.BOT:
            return ("the bot is answering this conversation; it reaches the queue when the "
                    "customer asks for a person")
        if owner is OwnerState.RESOLVED:
            return ("this conversation is resolved; it opens again when the customer writes "
                    "(the bot answers first, then hands it to the queue)")
        if conversation.assignee_id == agent.id:
            return "this conversation is already yours"
        other = (await self.queue.get_agent(conversation.assignee_id)
                 if conversation.assignee_id else None)
        who = other.name if other is not None else "another agent"
        return (f"{who} has this conversation; only they can {it}"
                if action != "claim" else f"{who} has this conversation already")

    async def reply(
        self, conversation_id: str, agent: Agent, text: str | None, *,
        channel: str | None = None, attachments: list[Attachment] | None = None,
    ) -> Activity:
        """Store the agent's reply for delivery on the customer's channel (where they wrote
        last, or ``channel``: another of the contact's channels), with ``attachments``
        (kept in the attachment store already)."""
        conversation = await self.require_assignee(conversation_id, agent)
        draft = OutboundDraft(
            sender=Party(role=Role.AGENT, id=agent.id, name=agent.name), text=text,
            channel=channel, attachments=attachments or [],
        )
        [item] = await self.outbox.enqueue(conversation, [draft])
        await self.levels.replied(conversation)  # the first reply meets the first target
        return item

    async def resolve(self, conversation_id: str, agent: Agent) -> Conversation:
        conversation = await self._change(
            conversation_id, {OwnerState.AGENT}, OwnerState.RESOLVED,
            ("resolved", f"{agent.name} marked this conversation as resolved."),
            where={"assignee_id": agent.id}, leaves=agent.id,
        )
        if conversation is None:
            current = await self._get(conversation_id)
            raise Conflict(await self._why_not(current, agent, "resolve"), current)
        log.info("conversation %s resolved by %s", conversation_id, who(agent))
        conversation = await self.levels.resolved(conversation)  # SLA: resolved_at
        self.wake()
        await self._ended(conversation, "agent", agent=agent)
        return conversation

    async def handback(self, conversation_id: str, agent: Agent) -> Conversation:
        """Agent → bot: the bot answers the customer's next message again."""
        conversation = await self._change(
            conversation_id, {OwnerState.AGENT}, OwnerState.BOT,
            ("handback", "You are chatting with the bot again. Ask for a human any time."),
            also={"assignee_id": None, "handoff": None}, reset_bot=True,
            where={"assignee_id": agent.id}, leaves=agent.id,
        )
        if conversation is None:
            current = await self._get(conversation_id)
            raise Conflict(await self._why_not(current, agent, "hand back"), current)
        log.info("conversation %s handed back to the bot by %s", conversation_id, who(agent))
        self.wake()
        return conversation

    async def transfer_to_agent(
        self, conversation_id: str, agent: Agent, target_id: str
    ) -> Conversation:
        """The assigned agent gives the conversation to another agent (any capacity: a
        person decided it, like a claim)."""
        target = await self.queue.get_agent(target_id)
        if target is None or not target.active:
            raise NotFound(f"agent {target_id} does not exist")
        if target.id == agent.id:
            return await self.require_assignee(conversation_id, agent, "transfer")
        conversation = await self._change(
            conversation_id, {OwnerState.AGENT}, OwnerState.AGENT,
            ("transferred", f"{agent.name} transferred the conversation to {target.name}."),
            also={"assignee_id": target.id}, where={"assignee_id": agent.id},
            joins=target.id, leaves=agent.id,
        )
        if conversation is None:
            current = await self._get(conversation_id)
            raise Conflict(await self._why_not(current, agent, "transfer"), current)
        log.info("conversation %s transferred by %s to %s", conversation_id, who(agent),
                 who(target))
        self.wake()
        return conversation

    async def transfer_to_team(self, conversation_id: str, agent: Agent, team: str) -> Conversation:
        """The assigned agent sends the conversation back to the queue, for ``team``. It
        keeps its place (the original handoff time) and priority; the skill is dropped
        (the team decides who answers)."""
        if not await self.queue.in_team(team):
            raise NotFound(f"no active agent is in team {team!r}")
        current = await self.require_assignee(conversation_id, agent, "transfer")
        handoff = (current.handoff or Handoff(reason="transferred", requested_at=utcnow()))
        handoff = handoff.model_copy(update={"team": team, "skill": None})
        conversation = await self._change(
            conversation_id, {OwnerState.AGENT}, OwnerState.QUEUED,
            ("transferred",
             f"{agent.name} transferred the conversation to the {team} team. You are in the "
             "queue; they will see everything you have written so far."),
            also={"assignee_id": None, "handoff": handoff.model_dump(mode="python")},
            where={"assignee_id": agent.id}, leaves=agent.id,
        )
        if conversation is None:
            current = await self._get(conversation_id)
            raise Conflict(await self._why_not(current, agent, "transfer"), current)
        log.info("conversation %s transferred by %s to the %s team", conversation_id,
                 who(agent), team)
        self.wake()
        return conversation

    async def requeue_agent(self, agent: Agent) -> int:
        """Put every conversation the agent owns back in the queue (they went offline or
        were deactivated). Returns how many this call re-queued."""
        agent_id, moved = agent.id, 0
        for conversation_id in await self.queue.assigned_to(agent_id):
            conversation = await self._change(
                conversation_id, {OwnerState.AGENT}, OwnerState.QUEUED,
                ("requeued",
                 "Your agent is no longer available. You are back in the queue; the next "
                 "agent will see everything you have written so far."),
                also={"assignee_id": None}, where={"assignee_id": agent_id}, leaves=agent_id,
            )
            if conversation is None:
                continue  # it moved on meanwhile (resolved, transferred, ...)
            moved += 1
        if moved:
            log.info("%d conversation(s) of %s re-queued (offline past the grace period, "
                     "or deactivated)", moved, who(agent))
            self.wake()
        return moved

    async def set_presence(self, agent: Agent, presence: Presence, grace: timedelta) -> Agent:
        """Online, away or offline. Online may make waiting conversations assignable;
        offline re-queues the agent's conversations after ``grace`` (the sweeper)."""
        now = utcnow()
        updated = await self.queue.set_presence(agent.id, presence, now, now + grace)
        if updated is None:
            raise NotFound(f"agent {agent.id} does not exist")
        if presence is Presence.ONLINE:
            self.wake()
        return updated

    async def set_capacity(self, agent_id: str, capacity: int) -> Agent:
        updated = await self.queue.set_capacity(agent_id, capacity)
        if updated is None:
            raise NotFound(f"agent {agent_id} does not exist")
        self.wake()
        return updated

    async def bot_resolve(
        self, conversation_id: str, dedupe_key: str, topic: str | None = None
    ) -> Conversation | None:
        """The bot closed the conversation (the customer's need is met); ``topic``: the
        flow that did it (analytics)."""
        conversation = await self._change(
            conversation_id, {OwnerState.BOT}, OwnerState.RESOLVED,
            ("resolved", "Conversation resolved."), reset_bot=True,
            dedupe_key=dedupe_key,
        )
        if conversation is not None:
            log.info("conversation %s resolved by the bot%s", conversation_id,
                     f" ({topic})" if topic else "")
            await self._ended(conversation, "bot", topic=topic)
        return conversation

    async def _ended(self, conversation: Conversation, resolved_by: str, *,
                     agent: Agent | None = None, topic: str | None = None) -> None:
        """Record the outcome (analytics) and ask CSAT if configured (gateway/csat.py)."""
        outcome = await self.outcomes.record(conversation, resolved_by=resolved_by,
                                             agent=agent, topic=topic)
        if self.csat.wants(resolved_by):
            await self.csat.ask(conversation, outcome)

    async def resolve_idle(self, conversation: Conversation, idle_for: str,
                           notice: str | None) -> Conversation | None:
        """Bot, queue or agent → resolved: nothing happened in ``conversation`` since its
        ``last_activity_at`` as the caller read it (``idle_for``: how long that is, for
        the timeline). Only if that is still so (last activity, owner and assignee
        unchanged): of concurrent callers (sweeps in several processes) one wins, and a
        message, reply or owner change since the read keeps it open. The change, a
        private event for the agents' timeline and, with ``notice``, that text to the
        customer on their channel are one unit (a second call finds the event stored).
        Recorded as abandoned (analytics, with the owner it had); no CSAT question, no
        SLA resolution. None: not resolved by this call."""
        owner = conversation.owner
        if owner not in (OwnerState.BOT, OwnerState.QUEUED, OwnerState.AGENT):
            return None
        where: dict[str, Any] = {"last_activity_at": conversation.last_activity_at}
        leaves = conversation.assignee_id if owner is OwnerState.AGENT else None
        if owner is OwnerState.AGENT:
            where["assignee_id"] = leaves
        since = conversation.last_activity_at or conversation.created_at
        key = f"{conversation.id}:idle:{int(since.timestamp() * 1000)}"
        topic = await self._bot_flow(conversation.id) if owner is OwnerState.BOT else None
        now = utcnow()
        ops = self.queue.move_ops(conversation.id, {owner}, OwnerState.RESOLVED, now,
                                  where=where, leaves=leaves, reset_bot=True)
        docs = [private_doc(conversation, ActivityType.EVENT, SYSTEM,
                            f"Resolved automatically: no activity for {idle_for}.", now,
                            key=key, name="resolved")]
        if notice:  # from the bot, as CSAT's question: email sends no such mail to an
            # automatic sender (an out-of-office reply would reopen it, daily)
            docs += await self.outbox.prepare(conversation, [OutboundDraft(
                sender=Party(role=Role.BOT, name=None), name="idle", text=notice,
                dedupe_key=f"{key}:notice")])
        try:
            items = await self.store.append(conversation.id, docs, ops)
        except (Precondition, Duplicate, NotFound):  # changed, done already, or erased
            return None
        self.outbox.deliver(conversation, [i for i in items if i.delivery is not None])
        agent = await self.queue.get_agent(leaves) if leaves is not None else None
        log.info("conversation %s resolved: no activity for %s (it was %s%s)",
                 conversation.id, idle_for, owner.value,
                 f", {who(agent)}" if agent is not None else "")
        if leaves is not None:
            self.wake()  # a slot of the agent's capacity is free
        resolved = await self.store.get_conversation(conversation.id) or conversation
        await self.outcomes.record(resolved, resolved_by="idle", agent=agent, topic=topic,
                                   abandoned_in=owner.value)
        return resolved

    async def _bot_flow(self, conversation_id: str) -> str | None:
        """The bot flow the conversation is in (its turn state brought forward by the
        turn records), for analytics' topic."""
        state = await current_turn_state(self.store, conversation_id)
        flow = state.bot_state.get("flow") if state is not None else None
        return flow if isinstance(flow, str) and flow else None

    def configure_csat(self, config: CsatConfig) -> None:
        self.csat.config = config

    async def reopen(self, conversation_id: str, dedupe_key: str) -> Conversation | None:
        """Resolved → bot, when the customer writes again (the intents the bot recognised
        start afresh: analytics counts them per resolve)."""
        return await self._change(
            conversation_id, {OwnerState.RESOLVED}, OwnerState.BOT,
            ("reopened", "Conversation reopened."),
            also={"assignee_id": None, "handoff": None, "intents": []}, reset_bot=True,
            dedupe_key=dedupe_key,
        )
