"""The seam between the pipeline and whatever answers as the bot.

The pipeline calls ``Bot.respond`` once per inbound customer message, in order, while the
bot owns the conversation. The bot returns what to say, the memory to keep for the next
turn, and optionally a handoff request. It never touches the store or a channel: the
pipeline stores and delivers its replies. The flow engine (flows/engine.py, a later issue)
will implement this same protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.model import Activity, Button, Contact, Conversation


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    buttons: list[Button] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HandoffRequest:
    reason: str
    skill: str | None = None
    priority: str = "normal"  # low, normal, high, urgent
    team: str | None = None
    flow: str | None = None  # the flow that handed off (analytics' topic); None: none ran


@dataclass(frozen=True, slots=True)
class TurnContext:
    conversation: Conversation
    contact: Contact | None
    message: Activity
    state: dict[str, Any]  # the bot's memory from the previous turn (copy; return a new one)
    # The events earlier turns returned (BotTurn.events), oldest first, since the bot's
    # memory was last cleared: read from the store only when called (None: there are none).
    history: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None


@dataclass(slots=True)
class BotTurn:
    replies: list[Reply] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    handoff: HandoffRequest | None = None
    # Saved on the contact (every channel, every conversation): key -> JSON-able value.
    # The pipeline stores each under contact.profile[key]; None deletes the key.
    profile: dict[str, Any] = field(default_factory=dict)
    resolve: bool = False  # the bot closed the conversation (it reopens when they write)
    # This turn's entries of the bot's event log (Rasa events, for custom actions): kept by
    # the pipeline with the turn, handed to later turns as TurnContext.history. Not in
    # ``state``, so the memory rewritten every turn stays small.
    events: list[dict[str, Any]] = field(default_factory=list)
    # The intent the NLU recognised in the customer's message, if any (None: a button
    # press, an answer to a question, nothing recognised): kept for analytics.
    intent: str | None = None


class Bot(Protocol):
    async def respond(self, turn: TurnContext) -> BotTurn: ...
