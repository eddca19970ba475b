"""The minimal, data-driven bot that holds the seam until the flow engine arrives.

It reads a YAML script (examples/flows/demo.yaml shows every field): a greeting, a menu
of buttons, FAQ entries with example phrases, a handoff intent and a fallback policy
(N misunderstandings in a row → hand off). Matching is deliberately simple (token overlap
and a character-sequence ratio); real intent matching is the flow engine's job.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.bot import BotTurn, HandoffRequest, Reply, TurnContext
from gateway.model import Button

MATCH_THRESHOLD = 0.72
_WORD = re.compile(r"[\w']+")


class ScriptError(Exception):
    """The bot script is invalid; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Greeting(_Strict):
    text: str
    examples: list[str] = Field(default_factory=list)


class Menu(_Strict):
    text: str
    buttons: list[Button] = Field(default_factory=list)


class FaqEntry(_Strict):
    id: str = Field(pattern=r"^[a-z0-9_-]+$")
    examples: list[str] = Field(min_length=1)
    answer: str


class HandoffIntent(_Strict):
    examples: list[str] = Field(min_length=1)
    text: str
    reason: str = "customer asked for a human"


class Fallback(_Strict):
    text: str
    max_misses: int = Field(2, ge=1)
    handoff_text: str
    handoff_reason: str = "the bot did not understand the customer"


class Script(_Strict):
    bot_name: str = "Bot"
    greeting: Greeting
    menu: Menu
    faq: list[FaqEntry] = Field(default_factory=list)
    handoff: HandoffIntent
    fallback: Fallback

    @model_validator(mode="after")
    def _check_buttons(self) -> Script:
        ids = {entry.id for entry in self.faq}
        for button in self.menu.buttons:
            if (
                button.value not in {"handoff", "menu"}
                and button.value.removeprefix("faq:") not in ids
            ):
                raise ValueError(
                    f"menu button {button.title!r} points to unknown "
                    f"{button.value!r} (use faq:<id>, handoff or menu)"
                )
        return self


def load_script(flows_dir: Path) -> Script:
    """Merge every ``*.yaml`` in ``flows_dir`` (later files extend ``faq``) and validate."""
    files = sorted(flows_dir.glob("*.yaml")) + sorted(flows_dir.glob("*.yml"))
    if not files:
        raise ScriptError(
            f"{flows_dir}: no *.yaml bot script found (set OMNIGATE_FLOWS_DIR to the "
            "directory with your bot's script; examples/flows/ in the source tree is the demo)"
        )
    merged: dict[str, Any] = {"faq": []}
    origin: dict[str, Path] = {}  # top-level key -> the file that set it
    faq_origin: list[Path] = []  # faq entry (by merged index) -> its file
    for path in files:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ScriptError(f"{path}: {exc}") from None
        if not isinstance(data, dict):
            raise ScriptError(f"{path}: expected a mapping at the top level")
        faq = data.pop("faq", None) or []
        if not isinstance(faq, list):
            raise ScriptError(f"{path}: faq: expected a list of entries")
        merged["faq"] += faq
        faq_origin += [path] * len(faq)
        merged.update(data)
        origin.update(dict.fromkeys(map(str, data), path))
    try:
        return Script.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = error["loc"]
            if loc[:1] == ("faq",) and len(loc) > 1 and isinstance(loc[1], int):
                where = faq_origin[loc[1]]
            elif loc:
                where = origin.get(str(loc[0]), flows_dir)
            else:  # the script-wide check: a menu button pointing nowhere
                where = origin.get("menu", flows_dir)
            field = ".".join(str(p) for p in loc) or "menu"
            problems.append(f"{where}: {field}: {error['msg']}")
        raise ScriptError("; ".join(problems)) from None


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def similarity(text: str, example: str) -> float:
    """0..1: how well ``text`` matches one example phrase."""
    words, example_words = _words(text), _words(example)
    if not words or not example_words:
        return 0.0
    if words == example_words:
        return 1.0
    shared = set(words) & set(example_words)
    # every word of the example appears in the text ("what are your opening hours?")
    containment = len(shared) / len(set(example_words))
    containment *= 0.95 if len(example_words) > 1 else 0.8
    ratio = difflib.SequenceMatcher(None, " ".join(words), " ".join(example_words)).ratio()
    return max(containment, ratio)


def best_match(text: str, examples: list[str]) -> float:
    return max((similarity(text, example) for example in examples), default=0.0)


class FaqBot:
    """Implements ``flows.bot.Bot`` from a ``Script``."""

    def __init__(self, script: Script) -> None:
        self.script = script

    @classmethod
    def from_dir(cls, flows_dir: Path) -> FaqBot:
        return cls(load_script(flows_dir))

    def _menu_reply(self, text: str | None = None) -> Reply:
        return Reply(text or self.script.menu.text, list(self.script.menu.buttons))

    def _answer(self, faq_id: str) -> Reply | None:
        for entry in self.script.faq:
            if entry.id == faq_id:
                return Reply(entry.answer, list(self.script.menu.buttons))
        return None

    def _classify(self, text: str) -> tuple[str, str | None]:
        """(kind, faq id): kind is handoff, greeting, faq or none."""
        script = self.script
        scores: list[tuple[float, str, str | None]] = [
            (best_match(text, script.handoff.examples), "handoff", None),
            (best_match(text, script.greeting.examples), "greeting", None),
        ]
        scores += [(best_match(text, e.examples), "faq", e.id) for e in script.faq]
        score, kind, faq_id = max(scores, key=lambda s: s[0])
        return (kind, faq_id) if score >= MATCH_THRESHOLD else ("none", None)

    async def respond(self, turn: TurnContext) -> BotTurn:
        script = self.script
        state = {
            "greeted": bool(turn.state.get("greeted")),
            "misses": int(turn.state.get("misses", 0)),
        }
        value = (turn.message.value or "").strip()
        text = (turn.message.text or "").strip()
        if value:
            kind, faq_id = (
                ("handoff", None)
                if value == "handoff"
                else (
                    ("faq", value.removeprefix("faq:"))
                    if value.startswith("faq:")
                    else ("greeting", None)
                )
            )
        else:
            kind, faq_id = self._classify(text)

        result = BotTurn(state=state)
        if kind == "handoff":
            result.replies.append(Reply(script.handoff.text))
            result.handoff = HandoffRequest(script.handoff.reason)
            state["misses"] = 0
        elif kind == "faq" and faq_id is not None and (answer := self._answer(faq_id)):
            result.replies.append(answer)
            state["misses"] = 0
        elif kind == "greeting" or not state["greeted"]:
            result.replies += [Reply(script.greeting.text), self._menu_reply()]
            state["misses"] = 0
        else:
            state["misses"] += 1
            if state["misses"] >= script.fallback.max_misses:
                result.replies.append(Reply(script.fallback.handoff_text))
                result.handoff = HandoffRequest(script.fallback.handoff_reason)
                state["misses"] = 0
            else:
                result.replies.append(self._menu_reply(script.fallback.text))
        state["greeted"] = True
        return result
