"""The contracts between the flow engine and its parts: understanding text and running
custom actions. The engine depends only on these; flows/nlu.py and flows/actions.py
implement them (tests may pass fakes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class EntityMatch:
    entity: str
    value: str  # normalised (a listed value, not the synonym the customer typed)
    start: int
    end: int
    text: str  # what the customer typed


@dataclass(frozen=True, slots=True)
class Understanding:
    text: str
    intent: str | None  # None: nothing matched well enough
    confidence: float
    ranking: list[tuple[str, float]] = field(default_factory=list)  # best first
    entities: list[EntityMatch] = field(default_factory=list)


class Understander(Protocol):
    def parse(self, text: str) -> Understanding: ...


@dataclass(frozen=True, slots=True)
class ActionCall:
    """What a rasa-sdk action needs (the /webhook request's content)."""

    action: str
    sender_id: str
    slots: dict[str, Any]
    latest_message: dict[str, Any]  # {"text", "intent": {"name", "confidence"}, "entities"}
    events: list[dict[str, Any]]  # the conversation so far, as Rasa events
    domain: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    events: list[dict[str, Any]]  # e.g. {"event": "slot", "name": ..., "value": ...}
    responses: list[dict[str, Any]]  # e.g. {"text": ..., "buttons": [...]}


class ActionError(Exception):
    """The action failed, timed out, or is not registered; the message says which."""


class ActionRunner(Protocol):
    async def run(self, call: ActionCall, limit: float) -> ActionOutcome:
        """Run one action within ``limit`` seconds; raise ActionError on failure or timeout."""
        ...

    def registered(self) -> set[str] | None:
        """The action names known to this runner, or None if it cannot tell (remote)."""
        ...
