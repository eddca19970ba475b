"""The flow language: what bot designers write in YAML, as typed models.

A flows directory holds any number of ``*.yaml`` files; together they make one domain:

    intents:   name -> example phrases            (what the customer means)
    entities:  name -> a regex or a list of values (what the customer mentions)
    slots:     name -> type, validation, profile?, ttl   (what the bot remembers)
    flows:     name -> trigger + steps            (what the bot does)
    menu:      the options offered when nothing is going on
    globals:   intents that work anywhere (talk to a human, start over, cancel)
    fallback:  what happens when the bot does not understand, and after how many misses

A step is a mapping whose one *kind* key says what it does:
``say``, ``ask``, ``set``, ``if``, ``action``, ``http``, ``handoff``, ``resolve``, ``goto``.
Any step may carry an ``id`` (a target for ``goto``). This module only describes the
shape; flows/validate.py checks the meaning (references, reachability, templates) and
reports errors with file:line:column. The JSON Schema shipped in docs/ is generated from
these models (``omnigate flows schema``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

NAME = r"^[a-z][a-z0-9_]*$"  # intents, entities, slots, flows, step ids
DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_duration(text: str) -> int:
    """``"30d"`` -> seconds. Units: s, m, h, d, w."""
    match = DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30m, 12h, 30d or 2w")
    return int(match.group(1)) * DURATION_SECONDS[match.group(2)]


# ------------------------------------------------------------------- vocabulary


class Intent(_Strict):
    """What the customer means, taught by example phrases."""

    examples: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    description: str | None = None


class Entity(_Strict):
    """Something the customer mentions: matched by a regex, or one of listed values."""

    pattern: str | None = Field(None, description="a regular expression (Python syntax)")
    values: list[str] | None = Field(None, description="the accepted values (any case)")
    synonyms: dict[str, list[str]] = Field(
        default_factory=dict, description="value -> other words for it"
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:  # not a ValueError: pydantic would not catch it
                raise ValueError(f"bad regular expression: {exc}") from None
        return value


class Validation(_Strict):
    pattern: str | None = Field(None, description="the answer must match this regex")
    min: float | None = None
    max: float | None = None
    min_length: int | None = None
    max_length: int | None = None


class Slot(_Strict):
    """A value the bot remembers. ``profile`` slots are saved on the contact (every
    channel, every conversation) and not asked again until ``ttl`` has passed."""

    type: Literal["text", "number", "bool", "email", "choice"] = "text"
    choices: list[str] | None = Field(None, description="for type choice")
    entity: str | None = Field(None, description="filled from this entity when mentioned")
    validate_: Validation | None = Field(None, alias="validate")
    profile: bool = Field(False, description="saved on the contact, not the conversation")
    ttl: str | None = Field(None, description="how long the value is still true: 30d, 12h")
    description: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("ttl")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value


# ------------------------------------------------------------------------ steps


class ButtonSpec(_Strict):
    """A button: pressing it answers with ``value``, or starts ``flow``."""

    title: str = Field(min_length=1, max_length=80)
    value: str | None = None
    flow: str | None = None


class _Step(_Strict):
    id: str | None = Field(None, pattern=NAME, description="a label other steps can goto")


class Say(_Step):
    say: str = Field(min_length=1, description="text; {slot} and {profile.x} are filled in")
    buttons: list[ButtonSpec] = Field(default_factory=list)


class Ask(_Step):
    ask: str = Field(pattern=NAME, description="the slot to fill")
    say: str = Field(min_length=1, description="the question")
    buttons: list[ButtonSpec] = Field(default_factory=list, description="quick replies")
    reprompt: str | None = Field(None, description="said when the answer is not valid")
    attempts: int = Field(3, ge=1, le=10, description="then on_fail")
    on_fail: Literal["handoff", "cancel"] | str = Field(
        "handoff", description="handoff, cancel, or a step id"
    )
    force: bool = Field(False, description="ask even if the slot already has a value")


class SetSlots(_Step):
    set: dict[str, Any] = Field(min_length=1, description="slot -> value or template")


class If(_Step):
    if_: str = Field(alias="if", min_length=1, description="a condition over slots")
    then: list[Step] = Field(min_length=1)
    else_: list[Step] = Field(default_factory=list, alias="else")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Action(_Step):
    action: str = Field(min_length=1, description="a rasa-sdk Action's name()")
    timeout: float = Field(10.0, gt=0, le=120)


class Http(_Step):
    http: str = Field(pattern=r"^https?://", description="URL; {slot} templates allowed")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    json_: dict[str, Any] | None = Field(None, alias="json", description="body (templated)")
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(5.0, gt=0, le=60)
    save: dict[str, str] = Field(
        default_factory=dict, description="slot -> dotted path into the JSON answer"
    )
    on_error: list[Step] = Field(default_factory=list, description="steps if it fails")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HandoffSpec(_Strict):
    reason: str = Field(min_length=1)
    skill: str | None = Field(None, description="route to agents with this skill")
    team: str | None = Field(None, description="route to this team")
    priority: Literal["low", "normal", "high", "urgent"] = "normal"
    say: str | None = Field(None, description="said to the customer before the handoff")


class Handoff(_Step):
    handoff: HandoffSpec


class Resolve(_Step):
    resolve: str | Literal[True] = Field(description="true, or a goodbye text")


class Goto(_Step):
    goto: str = Field(pattern=NAME, description="a step id in this flow, or a flow name")


STEP_KINDS = ("say", "ask", "set", "if", "action", "http", "handoff", "resolve", "goto")


def step_kind(value: Any) -> str | None:
    """The kind key of a raw or parsed step (``ask`` wins over its ``say`` prompt)."""
    keys = set(value) if isinstance(value, dict) else {
        k for k in STEP_KINDS if getattr(value, k if k != "if" else "if_", None) is not None
    }
    for kind in ("ask", "if", "http", *STEP_KINDS):
        if kind in keys:
            return kind
    return None


Step = Annotated[
    Annotated[Say, Tag("say")]
    | Annotated[Ask, Tag("ask")]
    | Annotated[SetSlots, Tag("set")]
    | Annotated[If, Tag("if")]
    | Annotated[Action, Tag("action")]
    | Annotated[Http, Tag("http")]
    | Annotated[Handoff, Tag("handoff")]
    | Annotated[Resolve, Tag("resolve")]
    | Annotated[Goto, Tag("goto")],
    Discriminator(step_kind),
]


# ------------------------------------------------------------------------ flows


class Trigger(_Strict):
    intent: str | None = Field(None, pattern=NAME)
    button: str | None = Field(None, description="a button value that starts the flow")


class Flow(_Strict):
    description: str | None = None
    when: Trigger | None = Field(None, description="what starts it (menus can too)")
    steps: list[Step] = Field(min_length=1)


class MenuOption(_Strict):
    title: str = Field(min_length=1, max_length=80)
    flow: str = Field(pattern=NAME)


class Menu(_Strict):
    say: str = Field(min_length=1)
    options: list[MenuOption] = Field(min_length=1)
    order_by_history: bool = Field(
        True, description="options this customer chose before come first"
    )


class GlobalIntent(_Strict):
    intent: str = Field(pattern=NAME)
    do: Literal["handoff", "restart", "cancel", "menu"] | str = Field(
        description="handoff, restart, cancel, menu, or a flow name"
    )
    reason: str | None = Field(None, description="for handoff: shown to agents")
    skill: str | None = None
    team: str | None = None
    priority: Literal["low", "normal", "high", "urgent"] = "normal"
    say: str | None = None


class Fallback(_Strict):
    say: str = Field(min_length=1)
    max_misses: int = Field(2, ge=1, le=10)
    handoff: HandoffSpec


class Domain(_Strict):
    """Everything in one flows directory, merged."""

    version: Literal[1] = 1
    bot_name: str = "Bot"
    greeting: str | None = Field(None, description="said at the start of a conversation")
    intents: dict[str, Intent] = Field(default_factory=dict)
    entities: dict[str, Entity] = Field(default_factory=dict)
    slots: dict[str, Slot] = Field(default_factory=dict)
    flows: dict[str, Flow] = Field(default_factory=dict)
    menu: Menu | None = None
    globals_: list[GlobalIntent] = Field(default_factory=list, alias="globals")
    fallback: Fallback | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


If.model_rebuild()
Http.model_rebuild()
Flow.model_rebuild()
