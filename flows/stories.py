"""Conversation test stories: what the customer says, and what the bot should do.

A story file is YAML::

    stories:
      - name: order status is asked, then answered
        contact: {name: Ada, profile: {email: ada@example.com}}   # optional
        steps:
          - user: where is my order          # the customer writes
          - bot: "What's your order number?" # the bot's next reply, exactly
          - user: "12345"
          - bot: /shipped|on its way/         # /.../: a regular expression, searched
          - buttons: [Yes, No]                # the buttons of that reply, in order
          - button: "Yes"                     # the customer presses one (title or value)
          - slots: {order_number: "12345"}    # slot values now (null: not set)
          - handoff: {reason: asked for a human, skill: returns}   # or: handoff: true
          - resolved: true                    # the bot closed the conversation

Stories run offline against the real flow engine (flows/engine.py), with the turn's
memory, profile changes, handoff and resolve applied between turns as the pipeline does.
They are strict: every reply the bot gives must be expected by a ``bot`` step before the
customer speaks again (or the story ends), and so must a handoff or a resolve.
"""

from __future__ import annotations

import re
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.bot import BotTurn, Reply, TurnContext
from flows.ports import ActionRunner
from flows.validate import FLOW_SUFFIXES, Problem, close
from flows.yamlpos import PosIndex, YamlSyntaxError, load_yaml
from gateway.model import (
    Activity,
    Contact,
    Conversation,
    ConversationRef,
    Direction,
    Party,
    Role,
    utcnow,
)

STEP_KEYS = ("user", "button", "bot", "buttons", "slots", "handoff", "resolved")
CHANNEL = "story"


@dataclass(frozen=True)
class StoryStep:
    kind: str
    value: Any
    line: int


@dataclass(frozen=True)
class Story:
    name: str
    file: Path
    line: int
    steps: list[StoryStep]
    contact_name: str | None = None
    profile: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class StoryResult:
    story: Story
    passed: bool
    seconds: float
    failure: str | None = None  # the readable diff


# ------------------------------------------------------------------------ load


def story_files(location: Path) -> list[Path]:
    if location.is_file():
        return [location]
    if not location.is_dir():
        return []
    return sorted(p for p in location.rglob("*") if p.suffix in FLOW_SUFFIXES and p.is_file()
                  and not p.name.startswith((".", "~")))


def load_stories(location: Path) -> tuple[list[Story], list[Problem]]:
    """Every story in a file or a directory (recursively); problems with positions."""
    stories: list[Story] = []
    problems: list[Problem] = []
    for path in story_files(location):
        try:
            data, index = load_yaml(path.read_text(encoding="utf-8"))
        except YamlSyntaxError as exc:
            problems.append(Problem(path, exc.pos.line, exc.pos.column, exc.message, exc.hint))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(path, 1, 1, f"cannot read the file: {exc}"))
            continue
        found: list[Problem] = []
        _parse_file(path, data, index, stories, found)
        problems.extend(sorted(found, key=Problem.sort_key))
    return stories, problems


def _parse_file(path: Path, data: Any, index: PosIndex, stories: list[Story],
                problems: list[Problem]) -> None:
    def problem(where: tuple[Hashable, ...], message: str, hint: str | None = None,
                *, key: bool = False) -> None:
        pos = index.key(where) if key else index.value(where)
        problems.append(Problem(path, pos.line, pos.column, message, hint))

    if not isinstance(data, dict) or not isinstance(data.get("stories"), list):
        problem((), "a story file has a 'stories:' list", "stories: [{name: ..., steps: [...]}]")
        return
    for extra in set(data) - {"stories"}:
        problem((extra,), f"unknown field '{extra}' in a story file",
                close(str(extra), ["stories"]), key=True)
    for number, raw in enumerate(data["stories"]):
        where: tuple[Hashable, ...] = ("stories", number)
        if not isinstance(raw, dict):
            problem(where, "a story is a mapping with name and steps")
            continue
        for extra in set(raw) - {"name", "contact", "steps"}:
            problem((*where, extra), f"unknown field '{extra}' in a story",
                    close(str(extra), ["name", "contact", "steps"]) or
                    "a story has name, contact and steps", key=True)
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            problem(where, "a story needs a name", "name: what the story shows")
            name = f"story {number + 1}"
        contact = raw.get("contact") or {}
        if not isinstance(contact, dict) or set(contact) - {"name", "profile"} or not \
                isinstance(contact.get("profile", {}), dict):
            problem((*where, "contact"), "contact is {name: ..., profile: {key: value}}")
            contact = {}
        raw_steps = raw.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            problem(where, f"story {name!r} has no steps", "steps: [{user: hi}, {bot: Hello}]")
            continue
        steps = []
        for step_number, step in enumerate(raw_steps):
            step_where = (*where, "steps", step_number)
            parsed = _parse_step(step)
            if isinstance(parsed, StepProblem):
                at = step_where
                if parsed.at_value:  # the kind is right, its value is not: point at it
                    at = (*step_where, next(iter(step)))
                problem(at, parsed.message, parsed.hint)
                continue
            kind, value = parsed
            steps.append(StoryStep(kind, value, index.value(step_where).line))
        stories.append(Story(name, path, index.value(where).line, steps,
                             contact.get("name"), dict(contact.get("profile") or {})))


@dataclass(frozen=True)
class StepProblem:
    message: str
    hint: str | None = None
    at_value: bool = True  # at the step's value (else at the step)


def _parse_step(step: Any) -> tuple[str, Any] | StepProblem:
    """(kind, value), or what is wrong with it."""
    kinds = "a step is one of: " + ", ".join(STEP_KEYS)
    if not isinstance(step, dict) or len(step) != 1:
        return StepProblem("a story step is a mapping with one key, e.g. '- user: hi'",
                           kinds, at_value=False)
    kind, value = next(iter(step.items()))
    if kind not in STEP_KEYS:
        return StepProblem(f"unknown story step '{kind}'", close(str(kind), STEP_KEYS) or kinds,
                           at_value=False)
    if kind in ("user", "button", "bot") and not isinstance(value, str | int | float):
        return StepProblem(f"'{kind}' takes a text", "put it in quotes")
    if kind == "bot" and _regex(str(value)) is not None:
        try:
            re.compile(str(_regex(str(value))))
        except re.error as exc:
            return StepProblem(f"bad regular expression {value!r}: {exc}",
                               "/.../ is a Python regular expression, searched in the reply")
    if kind == "buttons" and not (isinstance(value, list) and all(
            isinstance(v, str | int | float) for v in value)):
        return StepProblem("'buttons' takes a list of button titles", "buttons: [Yes, No]")
    if kind == "slots" and not isinstance(value, dict):
        return StepProblem("'slots' takes a mapping of slot: value",
                           "slots: {order_number: '12345', email: null}")
    if kind == "handoff" and not (value is True or (isinstance(value, dict) and not
                                  set(value) - {"reason", "skill", "team", "priority"})):
        return StepProblem("'handoff' takes true or {reason, skill, team, priority}")
    if kind == "resolved" and value is not True:
        return StepProblem("'resolved' takes true")
    if kind in ("user", "button", "bot"):
        value = str(value)
    if kind == "buttons":
        value = [str(v) for v in value]
    return kind, value


def _regex(expected: str) -> str | None:
    if len(expected) >= 2 and expected.startswith("/") and expected.endswith("/"):
        return expected[1:-1]
    return None


# ------------------------------------------------------------------------- run


class _Failed(Exception):
    pass


class _Chat:
    """One story's conversation, driven like the pipeline drives the bot."""

    def __init__(self, engine: Any, story: Story, number: int) -> None:
        self.engine = engine
        now = utcnow()
        self.conversation = Conversation(
            id=f"story{number}", channel=CHANNEL, thread_key=f"story{number}",
            contact_id=f"contact{number}", created_at=now, updated_at=now)
        self.contact = Contact(id=f"contact{number}", name=story.contact_name,
                               profile=dict(story.profile), created_at=now)
        self.state: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []  # the bot's event log (the pipeline's store)
        self.seq = 0
        self.transcript: list[str] = []
        self.pending: list[Reply] = []  # replies of the last turn not yet expected
        self.shown: Reply | None = None  # the reply the last ``bot`` step matched
        self.turn: BotTurn | None = None
        self.handoff_open = False  # the last turn's handoff, not yet expected
        self.resolve_open = False
        self.handed_off = False

    async def say(self, text: str, value: str | None = None) -> None:
        if self.handed_off:
            raise _Failed("the customer writes after the handoff, but a human owns the "
                          "conversation now: the bot would not answer")
        self.settle("before the customer writes again")
        self.seq += 1
        now = utcnow()
        message = Activity(
            id=f"{self.conversation.id}m{self.seq}", conversation_id=self.conversation.id,
            contact_id=self.contact.id, seq=self.seq, contact_seq=self.seq,
            direction=Direction.INBOUND, channel=CHANNEL,
            conversation_ref=ConversationRef(channel=CHANNEL,
                                             thread_key=self.conversation.thread_key),
            sender=Party(role=Role.CUSTOMER, id="customer", name=self.contact.name),
            timestamp=now, created_at=now, text=text, value=value)
        self.transcript.append(f"user: {text}" + (f"  [button {value}]" if value else ""))
        turn = await self.engine.respond(
            TurnContext(self.conversation, self.contact, message, dict(self.state),
                        history=self._history))
        # What the pipeline does with a turn: keep the memory, save the profile changes,
        # then hand off or resolve (a resolved conversation starts afresh when they write).
        self.turn = turn
        self.state = dict(turn.state)
        self.events.extend(turn.events)
        if turn.profile:
            profile = dict(self.contact.profile)
            for key, value_ in turn.profile.items():
                if value_ is None:
                    profile.pop(key, None)
                else:
                    profile[key] = value_
            self.contact = self.contact.model_copy(update={"profile": profile})
        self.pending = list(turn.replies)
        self.shown = None
        self.handoff_open = turn.handoff is not None
        self.resolve_open = turn.resolve and turn.handoff is None
        if turn.handoff is not None:
            self.handed_off = True
        elif turn.resolve:
            self.state, self.events = {}, []

    async def _history(self) -> list[dict[str, Any]]:
        return list(self.events)

    def settle(self, when: str) -> None:
        """Everything the last turn did must have been expected by now."""
        if self.pending:
            extra = "\n".join(f"    {_show(r)}" for r in self.pending)
            raise _Failed(f"the bot said more than the story expects ({when}):\n{extra}")
        if self.handoff_open and self.turn is not None and self.turn.handoff is not None:
            h = self.turn.handoff
            raise _Failed(f"the bot handed off, which the story does not expect ({when}): "
                          f"reason {h.reason!r}, skill {h.skill!r}, priority {h.priority!r}")
        if self.resolve_open:
            raise _Failed(f"the bot resolved the conversation, which the story does not "
                          f"expect ({when})")

    def press(self, wanted: str) -> tuple[str, str]:
        """(title, value) of a shown button whose title or value is ``wanted``."""
        shown = [b for r in self.turn.replies for b in r.buttons] if self.turn else []
        for button in shown:
            if wanted in (button.title, button.value):
                return button.title, button.value
        offered = ", ".join(repr(b.title) for b in shown) or "none"
        raise _Failed(f"the customer presses {wanted!r}, but no such button is shown "
                      f"(shown: {offered})")

    def expect_bot(self, expected: str) -> None:
        if not self.pending:
            raise _Failed(f"expected the bot to say:\n    {expected!r}\n  got: nothing more")
        reply = self.pending[0]
        pattern = _regex(expected)
        if pattern is not None:
            ok = re.search(pattern, reply.text) is not None
        else:
            ok = " ".join(reply.text.split()) == " ".join(expected.split())
        if not ok:
            raise _Failed(f"expected the bot to say:\n    {expected!r}\n  got:\n    "
                          f"{reply.text!r}")
        self.pending.pop(0)
        self.shown = reply
        self.transcript.append(f"bot:  {_show(reply)}")

    def expect_buttons(self, titles: list[str]) -> None:
        if self.shown is None:
            raise _Failed("'buttons' checks the reply of the 'bot' step before it: "
                          "put a 'bot' step first")
        got = [b.title for b in self.shown.buttons]
        if got != titles:
            raise _Failed(f"expected the buttons:\n    {titles}\n  got:\n    {got}")

    def expect_slots(self, expected: dict[str, Any]) -> None:
        values = self.slot_values()
        wrong = {k: v for k, v in expected.items() if values.get(k) != v}
        if wrong:
            lines = "\n".join(f"    {k}: expected {v!r}, got {values.get(k)!r}"
                              for k, v in wrong.items())
            raise _Failed(f"slots differ:\n{lines}")

    def slot_values(self) -> dict[str, Any]:
        """Conversation slots, then the contact's profile (unexpired) under its keys."""
        from flows.state import FlowState  # noqa: PLC0415
        from flows.steps import read_profile  # noqa: PLC0415

        values: dict[str, Any] = {}
        now = datetime.now(UTC)
        for key, entry in self.contact.profile.items():
            if key.startswith("_"):  # the engine's own bookkeeping (menu history)
                continue
            found = read_profile(entry, now)
            if found is not None:
                values[key] = found.value
        values.update(FlowState.load(self.state).slots)
        return values

    def expect_handoff(self, expected: Any) -> None:
        handoff = self.turn.handoff if self.turn is not None else None
        if handoff is None or not self.handoff_open:
            raise _Failed("expected a handoff to a human, got none")
        if isinstance(expected, dict):
            got = {"reason": handoff.reason, "skill": handoff.skill, "team": handoff.team,
                   "priority": handoff.priority}
            wrong = {k: v for k, v in expected.items() if got[k] != v}
            if wrong:
                lines = "\n".join(f"    {k}: expected {v!r}, got {got[k]!r}"
                                  for k, v in wrong.items())
                raise _Failed(f"the handoff differs:\n{lines}")
        self.handoff_open = False
        self.transcript.append(f"(handoff: {handoff.reason})")

    def expect_resolved(self) -> None:
        if not self.resolve_open:
            raise _Failed("expected the bot to resolve the conversation; it did not")
        self.resolve_open = False
        self.transcript.append("(resolved)")


def _show(reply: Reply) -> str:
    buttons = f"  [{' | '.join(b.title for b in reply.buttons)}]" if reply.buttons else ""
    return reply.text + buttons


def make_engine(loaded: Any, actions: ActionRunner | None) -> Any:
    """The real flow engine over one loaded version of the flows."""
    from flows.engine import FlowEngine  # noqa: PLC0415 - the engine imports much
    from flows.registry import StaticFlows  # noqa: PLC0415

    return FlowEngine(StaticFlows(loaded), actions)


async def run_story(engine: Any, story: Story, number: int = 1) -> StoryResult:
    """Run one story; a failure says which step, what was expected, and what came."""
    started = time.perf_counter()
    chat = _Chat(engine, story, number)
    step: StoryStep | None = None
    try:
        for step in story.steps:
            if step.kind == "user":
                await chat.say(step.value)
            elif step.kind == "button":
                chat.settle("before the customer presses a button")
                title, value = chat.press(step.value)
                await chat.say(title, value)
            elif step.kind == "bot":
                chat.expect_bot(step.value)
            elif step.kind == "buttons":
                chat.expect_buttons(step.value)
            elif step.kind == "slots":
                chat.expect_slots(step.value)
            elif step.kind == "handoff":
                chat.expect_handoff(step.value)
            elif step.kind == "resolved":
                chat.expect_resolved()
        step = None
        chat.settle("at the end of the story")
    except _Failed as exc:
        return StoryResult(story, False, time.perf_counter() - started,
                           _diff(story, step, str(exc), chat.transcript))
    return StoryResult(story, True, time.perf_counter() - started)


def _diff(story: Story, step: StoryStep | None, what: str, transcript: list[str]) -> str:
    if step is not None:
        where = f"step {story.steps.index(step) + 1} ({step.kind}) at {story.file}:{step.line}"
    else:
        where = f"the end of the story ({story.file}:{story.line})"
    lines = [f"story {story.name!r} failed at {where}:", f"  {what}"]
    if transcript:
        lines.append("  the conversation until then:")
        lines.extend(f"    {line}" for line in transcript)
    return "\n".join(lines)


async def run_stories(loaded: Any, stories: list[Story],
                      actions: ActionRunner | None = None) -> list[StoryResult]:
    engine = make_engine(loaded, actions)
    return [await run_story(engine, story, n) for n, story in enumerate(stories, 1)]
