"""The meaning of a merged flows domain: what the flow language's shape cannot say.

References (a goto to a step or flow that exists, a slot that is declared, an intent
that is defined, a registered action), reachability, template and condition syntax,
duplicate intent examples, and the like. Each problem is reported at the file, line and
column of the offending key or value (``Sources`` maps a path in the merged domain back
to the file that defined it). Used by flows/validate.py.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.dsl import Action as ActionStep
from flows.dsl import (
    Ask,
    ButtonSpec,
    Domain,
    Goto,
    Handoff,
    HandoffSpec,
    Http,
    If,
    Resolve,
    Say,
    SetSlots,
    Step,
    step_kind,
)
from flows.expr import ExpressionError, condition_names, template_fields
from flows.validate import NAMED_SECTIONS, SINGLE_SECTIONS, Problem, close
from flows.yamlpos import DataPath, Pos, PosIndex

ASK_ENDINGS = ("handoff", "cancel")
GLOBAL_ACTIONS = ("handoff", "restart", "cancel", "menu")
CONTACT_FIELDS = ("contact.name",)
TEMPLATE_HINT = "fields are {slot}, {profile.key} or {contact.name}; write {{ or }} for a brace"


@dataclass(slots=True)
class _Origin:
    file: Path
    index: PosIndex
    path: DataPath  # where it is in that file


@dataclass
class Sources:
    """Which file defined each part of the merged domain, and where."""

    named: dict[tuple[str, str], _Origin] = field(default_factory=dict)
    single: dict[str, _Origin] = field(default_factory=dict)
    globals_: list[_Origin] = field(default_factory=list)
    first: _Origin | None = None
    # Every name defined in any file, including files with errors: references to them are
    # not reported as missing (the file's own errors are).
    names: dict[str, set[str]] = field(default_factory=lambda: {s: set() for s in NAMED_SECTIONS})

    def add(
        self, path: Path, data: dict[str, Any], index: PosIndex, merged: dict[str, Any] | None
    ) -> list[Problem]:
        """Record one file; merge its data into ``merged`` (None: the file has errors, record
        its names only). Returns the names it defines a second time."""
        problems = []
        if self.first is None:
            self.first = _Origin(path, index, ())
        for section in NAMED_SECTIONS:
            entries = data.get(section)
            if not isinstance(entries, dict):
                continue
            for name, value in entries.items():
                earlier = self.named.get((section, str(name)))
                if earlier is not None:
                    problems.append(self._again(path, index, (section, name), earlier,
                                                f"{section[:-1]} '{name}'"))
                    continue
                self.names[section].add(str(name))
                self.named[(section, str(name))] = _Origin(path, index, (section, name))
                if merged is not None:
                    merged.setdefault(section, {})[name] = value
        for section in SINGLE_SECTIONS:
            if section not in data:
                continue
            earlier = self.single.get(section)
            if earlier is not None:
                problems.append(self._again(path, index, (section,), earlier, f"'{section}'"))
                continue
            self.single[section] = _Origin(path, index, (section,))
            if merged is not None:
                merged[section] = data[section]
        entries = data.get("globals")
        if merged is not None and isinstance(entries, list):
            for number, entry in enumerate(entries):
                self.globals_.append(_Origin(path, index, ("globals", number)))
                merged.setdefault("globals", []).append(entry)
        return problems

    @staticmethod
    def _again(
        path: Path, index: PosIndex, where: DataPath, earlier: _Origin, what: str
    ) -> Problem:
        pos = index.key(where)
        first = earlier.index.key(earlier.path)
        return Problem(path, pos.line, pos.column,
                       f"{what} is already defined at {earlier.file}:{first.line}:{first.column}",
                       "a name is defined once per flows directory: rename or remove one")

    def locate(self, path: DataPath, *, key: bool = False) -> tuple[Path, Pos]:
        """A path in the merged domain -> (file, position of its key or value)."""
        origin: _Origin | None = None
        rest: DataPath = ()
        if len(path) >= 2 and path[0] in NAMED_SECTIONS:
            origin = self.named.get((str(path[0]), str(path[1])))
            rest = path[2:]
        elif len(path) >= 2 and path[0] == "globals" and isinstance(path[1], int):
            if path[1] < len(self.globals_):
                origin = self.globals_[path[1]]
            rest = path[2:]
        elif path and path[0] in SINGLE_SECTIONS:
            origin = self.single.get(str(path[0]))
            rest = path[1:]
        origin = origin or self.first
        assert origin is not None
        full = (*origin.path, *rest) if origin.path else path
        return origin.file, origin.index.key(full) if key else origin.index.value(full)


class Checker:
    """Semantic checks over a merged domain; fills ``errors`` and ``warnings``."""

    def __init__(self, domain: Domain, sources: Sources, actions: set[str] | None) -> None:
        self.domain = domain
        self.sources = sources
        self.actions = actions
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.slots = sources.names["slots"] | set(domain.slots)
        self.intents = sources.names["intents"] | set(domain.intents)
        self.entities = sources.names["entities"] | set(domain.entities)
        self.flows = sources.names["flows"] | set(domain.flows)
        self.started: set[str] = set()  # flows something can start

    # ------------------------------------------------------------------ report

    def error(self, path: DataPath, message: str, hint: str | None = None, *,
              key: bool = False) -> None:
        file, pos = self.sources.locate(path, key=key)
        self.errors.append(Problem(file, pos.line, pos.column, message, hint))

    def warn(self, path: DataPath, message: str, hint: str | None = None, *,
             key: bool = False) -> None:
        file, pos = self.sources.locate(path, key=key)
        self.warnings.append(Problem(file, pos.line, pos.column, message, hint))

    # --------------------------------------------------------------------- run

    def run(self) -> None:
        self.check_intents()
        self.check_entities()
        self.check_slots()
        triggers: dict[str, str] = {}
        for name, flow in self.domain.flows.items():
            path: DataPath = ("flows", name)
            if flow.when is not None and flow.when.intent is not None:
                self.started.add(name)
                intent = flow.when.intent
                if intent not in self.intents:
                    self.missing_intent((*path, "when", "intent"), intent)
                elif intent in triggers:
                    self.error((*path, "when", "intent"),
                               f"intent '{intent}' already starts flow '{triggers[intent]}'",
                               "one intent starts one flow")
                else:
                    triggers[intent] = name
            if flow.when is not None and flow.when.button is not None:
                self.started.add(name)
            FlowChecker(self, name).run(flow.steps)
        self.check_menu_globals_fallback(triggers)
        for name in self.domain.flows:
            if name not in self.started:
                self.warn(("flows", name), f"flow '{name}' is never started", "give it "
                          "'when: {intent: ...}', a menu option, a button or a goto", key=True)

    def missing_intent(self, path: DataPath, intent: str) -> None:
        self.error(path, f"unknown intent '{intent}'",
                   close(intent, self.intents) or "define it under intents:")

    def missing_flow(self, path: DataPath, flow: str, extra: tuple[str, ...] = ()) -> None:
        self.error(path, f"unknown flow '{flow}'",
                   close(flow, [*self.flows, *extra]) or "define it under flows:")

    # ------------------------------------------------------------- vocabulary

    def check_intents(self) -> None:
        seen: dict[str, tuple[str, int]] = {}
        for name, intent in self.domain.intents.items():
            for number, example in enumerate(intent.examples):
                normal = " ".join(example.casefold().split())
                path: DataPath = ("intents", name, "examples", number)
                if normal in seen:
                    other, other_number = seen[normal]
                    file, pos = self.sources.locate(("intents", other, "examples", other_number))
                    where = "this intent" if other == name else f"intent '{other}'"
                    self.error(path, f"duplicate example {example!r}: already an example of "
                               f"{where} ({file}:{pos.line}:{pos.column})",
                               "an example teaches one intent, once: remove one")
                else:
                    seen[normal] = (name, number)

    def check_entities(self) -> None:
        for name, entity in self.domain.entities.items():
            path: DataPath = ("entities", name)
            if entity.pattern is None and not entity.values:
                self.error(path, f"entity '{name}' has neither a pattern nor values",
                           "add 'pattern: <regex>' or 'values: [...]'", key=True)
            values = {v.casefold() for v in entity.values or ()}
            for value in entity.synonyms:
                if value.casefold() not in values:
                    self.error((*path, "synonyms", value),
                               f"synonyms for '{value}', which is not one of the values",
                               close(value, entity.values or ()) or "add it to values:",
                               key=True)

    def check_slots(self) -> None:
        for name, slot in self.domain.slots.items():
            path: DataPath = ("slots", name)
            if slot.entity is not None and slot.entity not in self.entities:
                self.error((*path, "entity"), f"unknown entity '{slot.entity}'",
                           close(slot.entity, self.entities) or "define it under entities:")
            if slot.type == "choice" and not slot.choices:
                self.error((*path, "type"), f"choice slot '{name}' has no choices",
                           "add 'choices: [first, second]'")
            if slot.type != "choice" and slot.choices:
                self.warn((*path, "choices"), f"slot '{name}' has choices but is of type "
                          f"{slot.type}", "set 'type: choice' to accept only these", key=True)
            rules = slot.validate_
            if rules is None:
                continue
            if rules.pattern is not None:
                try:
                    re.compile(rules.pattern)
                except re.error as exc:
                    self.error((*path, "validate", "pattern"), f"bad regular expression: {exc}",
                               "a Python regular expression")
            for low, high in (("min", "max"), ("min_length", "max_length")):
                lo, hi = getattr(rules, low), getattr(rules, high)
                if lo is not None and hi is not None and lo > hi:
                    self.error((*path, "validate", low), f"'{low}' ({lo}) is above '{high}' "
                               f"({hi}): no answer can be valid")

    # ------------------------------------------------------ templates, slots

    def template(self, path: DataPath, text: str) -> None:
        try:
            fields = template_fields(text)
        except ExpressionError as exc:
            self.error(path, str(exc), TEMPLATE_HINT)
            return
        for name in sorted(fields):
            if name.startswith("profile.") and len(name) > len("profile."):
                continue
            if name in CONTACT_FIELDS or name in self.slots:
                continue
            self.error(path, f"unknown slot '{name}' in template {text!r}",
                       close(name, [*self.slots, *CONTACT_FIELDS]) or
                       "declare it under slots:, or use {profile.key} / {contact.name}")

    def slot(self, path: DataPath, name: str, *, key: bool = False) -> None:
        if name not in self.slots:
            hint = close(name, self.slots) or (
                f"'{name}' is an entity: declare a slot with 'entity: {name}'"
                if name in self.entities else "declare it under slots:")
            self.error(path, f"unknown slot '{name}'", hint, key=key)

    def templates_in(self, path: DataPath, value: Any) -> None:
        """Every text inside a JSON-like value (an http body) is a template."""
        if isinstance(value, str):
            self.template(path, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                self.templates_in((*path, key), item)
        elif isinstance(value, list):
            for number, item in enumerate(value):
                self.templates_in((*path, number), item)

    def buttons(self, path: DataPath, buttons: list[ButtonSpec]) -> None:
        for number, button in enumerate(buttons):
            where = (*path, number)
            self.template((*where, "title"), button.title)
            if (button.value is None) == (button.flow is None):
                self.error(where, f"button {button.title!r} needs exactly one of value or flow",
                           "value: what the press answers; flow: the flow it starts")
            if button.flow is not None:
                self.started.add(button.flow)
                if button.flow not in self.flows:
                    self.missing_flow((*where, "flow"), button.flow)

    def handoff(self, path: DataPath, spec: HandoffSpec) -> None:
        self.template((*path, "reason"), spec.reason)
        if spec.say is not None:
            self.template((*path, "say"), spec.say)

    # ---------------------------------------------------- menu, globals, fallback

    def check_menu_globals_fallback(self, triggers: dict[str, str]) -> None:
        domain = self.domain
        if domain.greeting is not None:
            self.template(("greeting",), domain.greeting)
        if domain.menu is not None:
            self.template(("menu", "say"), domain.menu.say)
            for number, option in enumerate(domain.menu.options):
                self.template(("menu", "options", number, "title"), option.title)
                self.started.add(option.flow)
                if option.flow not in self.flows:
                    self.missing_flow(("menu", "options", number, "flow"), option.flow)
        elif domain.flows:
            self.warn(("menu",), "no menu: after a flow ends the bot offers no options",
                      "add 'menu: {say: ..., options: [{title: ..., flow: ...}]}'")
        seen: dict[str, int] = {}
        for number, entry in enumerate(domain.globals_):
            path: DataPath = ("globals", number)
            if entry.intent not in self.intents:
                self.missing_intent((*path, "intent"), entry.intent)
            elif entry.intent in seen:
                self.error((*path, "intent"), f"intent '{entry.intent}' is already global",
                           "one global entry per intent")
            elif entry.intent in triggers:
                self.error((*path, "intent"), f"intent '{entry.intent}' is global and also "
                           f"starts flow '{triggers[entry.intent]}'", "use one or the other")
            seen[entry.intent] = number
            if entry.do not in GLOBAL_ACTIONS:
                self.started.add(entry.do)
                if entry.do not in self.flows:
                    self.error((*path, "do"), f"unknown flow '{entry.do}'",
                               close(entry.do, [*self.flows, *GLOBAL_ACTIONS]) or
                               "do is handoff, restart, cancel, menu or a flow name")
            for name in ("say", "reason"):
                if (text := getattr(entry, name)) is not None:
                    self.template((*path, name), text)
        if domain.fallback is not None:
            self.template(("fallback", "say"), domain.fallback.say)
            self.handoff(("fallback", "handoff"), domain.fallback.handoff)
        elif domain.flows:
            self.warn(("fallback",), "no fallback: a message the bot does not understand is "
                      "never handed off", "add 'fallback: {say: ..., max_misses: 2, handoff: "
                      "{reason: ...}}'")


def _ends(step: Step) -> str | None:
    """The kind of step after which nothing in the same list runs, if this is one."""
    if isinstance(step, Goto | Handoff | Resolve):
        return step_kind(step)
    if isinstance(step, If) and step.else_ and _ending(step.then) and _ending(step.else_):
        return "if (both branches end)"
    return None


def _ending(steps: list[Step]) -> bool:
    return any(_ends(step) for step in steps)


class FlowChecker:
    """The steps of one flow: ids, gotos, reachability, and each step's references."""

    def __init__(self, checker: Checker, name: str) -> None:
        self.checker = checker
        self.name = name
        self.ids: dict[str, DataPath] = {}
        self.targets: set[str] = set()

    def run(self, steps: list[Step]) -> None:
        path: DataPath = ("flows", self.name, "steps")
        self.collect(path, steps)
        self.steps(path, steps)

    def collect(self, path: DataPath, steps: list[Step]) -> None:
        """Step ids (duplicates are errors) and the ids something jumps to."""
        for number, step in enumerate(steps):
            where = (*path, number)
            if step.id is not None:
                if step.id in self.ids:
                    file, pos = self.checker.sources.locate(self.ids[step.id])
                    self.checker.error((*where, "id"), f"duplicate step id '{step.id}' in flow "
                                       f"'{self.name}' (first at {file}:{pos.line}:{pos.column})",
                                       "step ids are unique within a flow")
                else:
                    self.ids[step.id] = (*where, "id")
            if isinstance(step, Goto):
                self.targets.add(step.goto)
            if isinstance(step, Ask) and step.on_fail not in ASK_ENDINGS:
                self.targets.add(step.on_fail)
            for branch, inner in _branches(step):
                self.collect((*where, branch), inner)

    def steps(self, path: DataPath, steps: list[Step]) -> None:
        after: str | None = None
        reported = False
        for number, step in enumerate(steps):
            where: DataPath = (*path, number)
            if step.id is not None and step.id in self.targets:
                after, reported = None, False  # a goto lands here
            if after is not None and not reported:
                self.checker.error(where, f"unreachable step: nothing after the {after} "
                                   "above runs", "move it before, or give it an id and goto it")
                reported = True
            self.step(where, step)
            after = after or _ends(step)

    def step(self, path: DataPath, step: Step) -> None:
        check = self.checker
        if isinstance(step, Ask):
            check.slot((*path, "ask"), step.ask)
            check.template((*path, "say"), step.say)
            if step.reprompt is not None:
                check.template((*path, "reprompt"), step.reprompt)
            if step.on_fail not in (*ASK_ENDINGS, *self.ids, *check.flows):
                check.error((*path, "on_fail"), f"on_fail '{step.on_fail}' is not a step id in "
                            f"flow '{self.name}' nor a flow",
                            close(step.on_fail, [*self.ids, *ASK_ENDINGS, *check.flows]) or
                            "use handoff, cancel, a step id in this flow, or a flow name")
            elif step.on_fail in check.flows and step.on_fail not in self.ids:
                check.started.add(step.on_fail)
            check.buttons((*path, "buttons"), step.buttons)
        elif isinstance(step, Say):
            check.template((*path, "say"), step.say)
            check.buttons((*path, "buttons"), step.buttons)
        elif isinstance(step, SetSlots):
            for name, value in step.set.items():
                check.slot((*path, "set", name), name, key=True)
                check.templates_in((*path, "set", name), value)
        elif isinstance(step, If):
            self.condition((*path, "if"), step.if_)
        elif isinstance(step, ActionStep):
            if check.actions is not None and step.action not in check.actions:
                hint = close(step.action, check.actions) or (
                    "registered: " + ", ".join(sorted(check.actions)) if check.actions
                    else "no action is registered: check OMNIGATE_ACTIONS_PACKAGE")
                check.error((*path, "action"), f"action '{step.action}' is not registered",
                            hint)
        elif isinstance(step, Http):
            check.template((*path, "http"), step.http)
            check.templates_in((*path, "json"), step.json_)
            check.templates_in((*path, "headers"), step.headers)
            for name in step.save:
                check.slot((*path, "save", name), name, key=True)
        elif isinstance(step, Handoff):
            check.handoff((*path, "handoff"), step.handoff)
        elif isinstance(step, Resolve):
            if isinstance(step.resolve, str):
                check.template((*path, "resolve"), step.resolve)
        elif isinstance(step, Goto) and step.goto not in self.ids:
            if step.goto in check.flows:
                check.started.add(step.goto)
            else:
                check.error((*path, "goto"), f"goto '{step.goto}': no step with this id in flow "
                            f"'{self.name}' and no flow of this name",
                            close(step.goto, [*self.ids, *check.flows]) or
                            "give the target step an 'id:', or name a flow")
        for branch, inner in _branches(step):
            self.steps((*path, branch), inner)

    def condition(self, path: DataPath, expression: str) -> None:
        try:
            names = condition_names(expression)
        except ExpressionError as exc:
            self.checker.error(path, str(exc), "a Python-like expression: "
                               "order_state == 'shipped' and attempts < 3")
            return
        for name in sorted(names):
            if name not in self.checker.slots:
                self.checker.error(path, f"unknown slot '{name}' in condition {expression!r}",
                                   close(name, self.checker.slots) or
                                   "conditions read slots: declare it under slots:")


def _branches(step: Step) -> list[tuple[Hashable, list[Step]]]:
    if isinstance(step, If):
        return [("then", step.then), ("else", step.else_)]
    if isinstance(step, Http):
        return [("on_error", step.on_error)]
    return []

