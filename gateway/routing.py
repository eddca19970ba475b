"""Ownership of a conversation: bot → queued → agent → resolved (or back to the bot).

Each change is one conditional update in the store (``Store.transition``), so when two
agents claim at once exactly one wins, and the bot and a human never both own a
conversation. Every change also leaves an ``event`` item in the conversation's history
(delivered to the customer's channel like any other item) so agents and customers see the
chronology.
"""

from __future__ import annotations

import logging

from gateway.model import (
    Activity,
    ActivityType,
    Agent,
    Conversation,
    Handoff,
    OutboundDraft,
    OwnerState,
    Party,
    Role,
    utcnow,
)
from gateway.outbox import Outbox
from gateway.store import NotFound, Store

log = logging.getLogger(__name__)

SYSTEM = Party(role=Role.SYSTEM, name="Omnigate")


class Conflict(Exception):
    """The conversation is not in a state that allows this (HTTP 409)."""

    def __init__(self, message: str, conversation: Conversation | None = None) -> None:
        super().__init__(message)
        self.conversation = conversation


class Routing:
    def __init__(self, store: Store, outbox: Outbox) -> None:
        self.store = store
        self.outbox = outbox

    async def _event(
        self, conversation: Conversation, name: str, text: str, dedupe_key: str | None = None
    ) -> None:
        draft = OutboundDraft(
            type=ActivityType.EVENT, sender=SYSTEM, name=name, text=text, dedupe_key=dedupe_key
        )
        await self.outbox.enqueue(conversation, [draft])

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
    ) -> Conversation | None:
        """Bot → queue, with a reason. None if the bot did not own the conversation."""
        handoff = Handoff(reason=reason, skill=skill, team=team, priority=priority,
                          requested_at=utcnow())
        conversation = await self.store.transition(
            conversation_id,
            {OwnerState.BOT},
            OwnerState.QUEUED,
            also={"handoff": handoff.model_dump(mode="python"), "assignee_id": None},
        )
        if conversation is None:
            return None
        log.info("conversation %s handed off: %s", conversation_id, reason)
        await self._event(
            conversation,
            "handoff",
            "You are in the queue for a human agent. They will see everything "
            "you have written so far.",
            dedupe_key,
        )
        return conversation

    async def claim(self, conversation_id: str, agent: Agent) -> Conversation:
        """Queue → this agent. Exactly one of concurrent claimers wins; others get Conflict."""
        conversation = await self.store.transition(
            conversation_id,
            {OwnerState.QUEUED},
            OwnerState.AGENT,
            also={"assignee_id": agent.id},
        )
        if conversation is None:
            current = await self._get(conversation_id)
            if current.owner is OwnerState.AGENT and current.assignee_id == agent.id:
                return current  # claiming twice is harmless
            raise Conflict(f"conversation is {current.owner.value}, not queued", current)
        await self._event(conversation, "assigned", f"{agent.name} joined the conversation.")
        return conversation

    async def require_assignee(self, conversation_id: str, agent: Agent) -> Conversation:
        conversation = await self._get(conversation_id)
        if conversation.owner is not OwnerState.AGENT or conversation.assignee_id != agent.id:
            raise Conflict("you do not own this conversation; claim it first", conversation)
        return conversation

    async def reply(self, conversation_id: str, agent: Agent, text: str) -> Activity:
        """Store the agent's reply for delivery on the customer's channel."""
        conversation = await self.require_assignee(conversation_id, agent)
        draft = OutboundDraft(
            sender=Party(role=Role.AGENT, id=agent.id, name=agent.name), text=text
        )
        [item] = await self.outbox.enqueue(conversation, [draft])
        return item

    async def resolve(self, conversation_id: str, agent: Agent) -> Conversation:
        conversation = await self.store.transition(
            conversation_id,
            {OwnerState.AGENT},
            OwnerState.RESOLVED,
            where={"assignee_id": agent.id},
        )
        if conversation is None:
            current = await self._get(conversation_id)
            raise Conflict("only the assigned agent can resolve this conversation", current)
        await self._event(
            conversation, "resolved", f"{agent.name} marked this conversation as resolved."
        )
        return conversation

    async def handback(self, conversation_id: str, agent: Agent) -> Conversation:
        """Agent → bot: the bot answers the customer's next message again."""
        conversation = await self.store.transition(
            conversation_id,
            {OwnerState.AGENT},
            OwnerState.BOT,
            also={"assignee_id": None, "handoff": None, "bot_state": {}},
            where={"assignee_id": agent.id},
        )
        if conversation is None:
            current = await self._get(conversation_id)
            raise Conflict("only the assigned agent can hand this conversation back", current)
        await self._event(
            conversation,
            "handback",
            "You are chatting with the bot again. Ask for a human any time.",
        )
        return conversation

    async def bot_resolve(self, conversation_id: str, dedupe_key: str) -> Conversation | None:
        """The bot closed the conversation (the customer's need is met)."""
        conversation = await self.store.transition(
            conversation_id, {OwnerState.BOT}, OwnerState.RESOLVED, also={"bot_state": {}}
        )
        if conversation is not None:
            await self._event(conversation, "resolved", "Conversation resolved.", dedupe_key)
        return conversation

    async def reopen(self, conversation_id: str, dedupe_key: str) -> Conversation | None:
        """Resolved → bot, when the customer writes again."""
        conversation = await self.store.transition(
            conversation_id,
            {OwnerState.RESOLVED},
            OwnerState.BOT,
            also={"assignee_id": None, "handoff": None, "bot_state": {}},
        )
        if conversation is not None:
            await self._event(conversation, "reopened", "Conversation reopened.", dedupe_key)
        return conversation
