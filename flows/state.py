"""The flow engine's memory of one conversation, and positions inside a flow.

Everything here is stored as ``TurnState.bot_state`` in MongoDB, so it is plain JSON:

    version  the flows version the active flow runs on (pinned while a flow is active)
    greeted  the conversation has had its first bot turn
    flow     the active flow, or None
    pos      where in it: a path into nested step lists, e.g. [3, "then", 0]
             (step 3 of the flow is an ``if``; position 0 of its ``then`` list)
    ask      the pending question: {"slot": name, "attempts": wrong answers so far}
    slots    conversation slots (profile slots live on the contact)
    misses   misunderstandings in a row (the fallback policy)
    menu     the menu's order for this conversation (fixed at its start)
    chosen   the menu options counted in this conversation (each once: see flows/menu.py)

and, not stored in it, ``events``: this turn's entries of the Rasa-style event log
(user/bot/slot/action), for custom actions. The pipeline keeps each turn's entries apart
(``BotTurn.events``, stored on the turn's first reply: gateway/store/bot_events.py) and
hands the earlier ones back on demand (``TurnContext.history``): the memory rewritten
every turn stays a few hundred bytes instead of growing with the log. A state stored by
an older version still holds its log under ``events``: it is read, and handed on as this
turn's entries (moved once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flows.bot import Reply
from flows.dsl import Flow, Http, If, Step

EVENT_LOG_CAP = 40
# The nested step lists a step can hold, by the key used in a position path.
BRANCHES = ("then", "else", "on_error")
Path = list[int | str]


@dataclass
class FlowState:
    version: str | None = None
    greeted: bool = False
    flow: str | None = None
    pos: Path | None = None
    ask: dict[str, Any] | None = None
    slots: dict[str, Any] = field(default_factory=dict)
    misses: int = 0
    menu: list[str] | None = None
    chosen: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, data: dict[str, Any]) -> FlowState:
        """Read a stored state; anything malformed is dropped rather than trusted."""
        pos = data.get("pos")
        if not (isinstance(pos, list) and pos and _valid_path(pos)):
            pos = None
        ask = data.get("ask")
        if not (isinstance(ask, dict) and isinstance(ask.get("slot"), str)):
            ask = None
        flow = data.get("flow") if isinstance(data.get("flow"), str) else None
        slots = data.get("slots")
        menu = data.get("menu")
        events = data.get("events")
        chosen = data.get("chosen")
        version = data.get("version")
        misses = data.get("misses")
        return cls(
            version=version if isinstance(version, str) else None,
            greeted=bool(data.get("greeted")),
            flow=flow if pos is not None else None,
            pos=pos if flow is not None else None,
            ask=ask if flow is not None and pos is not None else None,
            slots=dict(slots) if isinstance(slots, dict) else {},
            misses=misses if isinstance(misses, int) else 0,
            menu=[m for m in menu if isinstance(m, str)] if isinstance(menu, list) else None,
            chosen=[c for c in chosen if isinstance(c, str)] if isinstance(chosen, list)
            else [],
            events=[e for e in events if isinstance(e, dict)] if isinstance(events, list)
            else [],
        )

    def dump(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "greeted": self.greeted,
            "flow": self.flow,
            "pos": list(self.pos) if self.pos is not None else None,
            "ask": dict(self.ask) if self.ask is not None else None,
            "slots": dict(self.slots),
            "misses": self.misses,
            "menu": list(self.menu) if self.menu is not None else None,
            "chosen": list(self.chosen),
        }

    def log(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def end_flow(self) -> None:
        self.flow, self.pos, self.ask = None, None, None

    def restarted(self, timestamp: float) -> FlowState:
        """A fresh memory (no flow, no slots) that keeps the greeting, the menu's order, the
        options counted and this turn's events, with a Rasa ``restart`` event (rasa-sdk's
        ``applied_events()`` then starts after it)."""
        fresh = FlowState(greeted=self.greeted, menu=self.menu, chosen=self.chosen,
                          events=self.events)
        fresh.log({"event": "restart", "timestamp": timestamp})
        return fresh


def _valid_path(pos: list[Any]) -> bool:
    """[int, (branch, int)*]"""
    if len(pos) % 2 != 1:
        return False
    for n, part in enumerate(pos):
        if n % 2 == 0 and not (isinstance(part, int) and not isinstance(part, bool)
                               and part >= 0):
            return False
        if n % 2 == 1 and part not in BRANCHES:
            return False
    return True


def branch(step: Step, key: str) -> list[Step] | None:
    """The nested step list ``key`` of a step (None if it has none)."""
    if isinstance(step, If):
        return step.then if key == "then" else step.else_ if key == "else" else None
    if isinstance(step, Http) and key == "on_error":
        return step.on_error
    return None


def steps_at(flow: Flow, prefix: Path) -> list[Step] | None:
    """The step list a position's last index points into (``prefix`` = path minus it)."""
    steps: list[Step] = flow.steps
    for n in range(0, len(prefix), 2):
        index, key = prefix[n], prefix[n + 1]
        if not isinstance(index, int) or not isinstance(key, str) or index >= len(steps):
            return None
        nested = branch(steps[index], key)
        if nested is None:
            return None
        steps = nested
    return steps


def step_at(flow: Flow, pos: Path) -> Step | None:
    steps = steps_at(flow, pos[:-1])
    index = pos[-1]
    if steps is None or not isinstance(index, int) or index >= len(steps):
        return None
    return steps[index]


def advance(flow: Flow, pos: Path) -> Path | None:
    """The position after ``pos`` (leaving finished branches); None at the flow's end."""
    pos = list(pos)
    index = pos[-1]
    assert isinstance(index, int)
    pos[-1] = index + 1
    while True:
        steps = steps_at(flow, pos[:-1])
        last = pos[-1]
        assert isinstance(last, int)
        if steps is not None and last < len(steps):
            return pos
        if len(pos) == 1:
            return None
        pos = pos[:-2]  # out of the branch: past the step that holds it
        parent = pos[-1]
        assert isinstance(parent, int)
        pos[-1] = parent + 1


def enter(pos: Path, key: str) -> Path:
    """The first position of the branch ``key`` of the step at ``pos``."""
    return [*pos, key, 0]


def find_step(flow: Flow, step_id: str) -> Path | None:
    """The position of the step labelled ``step_id`` (searching nested branches)."""

    def search(steps: list[Step], prefix: Path) -> Path | None:
        for n, step in enumerate(steps):
            if step.id == step_id:
                return [*prefix, n]
            for key in BRANCHES:
                nested = branch(step, key)
                if nested:
                    found = search(nested, [*prefix, n, key])
                    if found is not None:
                        return found
        return None

    return search(flow.steps, [])


def unique_replies(replies: list[Reply]) -> list[Reply]:
    """A turn's replies, each said once (in order): what the customer is told when a flow
    loops (``say`` then ``goto`` back would otherwise send the same text 50 times)."""
    seen: set[str] = set()
    kept = []
    for reply in replies:
        key = repr((reply.text, reply.buttons))
        if key not in seen:
            seen.add(key)
            kept.append(reply)
    return kept
