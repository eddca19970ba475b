"""Load a flows directory into one Domain, or say precisely what is wrong, where.

``load_flows(directory)`` reads every ``*.yaml``/``*.yml`` file of the directory (sorted
by name; not its subdirectories, so ``stories/`` beside the flows is not a flow file),
checks each against the flow language (flows/dsl.py), merges them, then checks the
meaning (flows/checks.py: references, reachability, templates, conditions, actions).
Every problem is a ``Problem`` with the 1-based line and column of the offending key or
value and, mostly, a hint; ``str(problem)`` is ``file:line:column: message (hint: ...)``.

The flow registry (hot reload) and ``omnigate flows validate`` both use this function.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Discriminator, ValidationError
from pydantic_core import ErrorDetails

from flows.dsl import (
    NAME,
    STEP_KINDS,
    Action,
    Ask,
    Domain,
    Goto,
    Handoff,
    Http,
    If,
    Resolve,
    Say,
    SetSlots,
)
from flows.yamlpos import DataPath, Pos, PosIndex, YamlSyntaxError, load_yaml

STEP_CLASSES: dict[str, type[BaseModel]] = {
    "say": Say, "ask": Ask, "set": SetSlots, "if": If, "action": Action, "http": Http,
    "handoff": Handoff, "resolve": Resolve, "goto": Goto,
}
NAMED_SECTIONS = ("intents", "entities", "slots", "flows")
SINGLE_SECTIONS = ("bot_name", "greeting", "menu", "fallback")
FLOW_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int
    column: int
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.column}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text

    def sort_key(self) -> tuple[str, int, int, str]:
        return (str(self.file), self.line, self.column, self.message)


@dataclass(frozen=True)
class LoadResult:
    domain: Domain | None  # None when there is any error
    errors: list[Problem]
    files: list[Path]
    # Worth a look, but the flows load and run (printed by `omnigate flows validate`).
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.domain is not None


def flow_files(directory: Path) -> list[Path]:
    """The flow files of a directory, sorted; editor temp files (``.x.yaml``) are not."""
    return sorted(
        p for p in directory.iterdir()
        if p.suffix in FLOW_SUFFIXES and p.is_file() and not p.name.startswith((".", "~"))
    )


def load_flows(directory: Path, actions: set[str] | None = None) -> LoadResult:
    """Read, validate and merge every flow file in ``directory``.

    ``actions``: the names of the registered custom actions; when given, an ``action``
    step naming any other is an error.
    """
    from flows.checks import Checker, Sources  # noqa: PLC0415 - checks imports this module

    if not directory.is_dir():
        problem = Problem(directory, 1, 1, f"{directory} is not a directory",
                          "point OMNIGATE_FLOWS_DIR (or the DIR argument) at your flows")
        return LoadResult(None, [problem], [])
    files = flow_files(directory)
    if not files:
        problem = Problem(directory, 1, 1, f"no flow files (*.yaml) in {directory}",
                          "copy one of examples/flows/*.yaml to start")
        return LoadResult(None, [problem], [])
    errors: list[Problem] = []
    parsed: list[tuple[Path, dict[str, Any], PosIndex, bool]] = []
    for path in files:
        try:
            data, index = load_yaml(path.read_text(encoding="utf-8"))
        except YamlSyntaxError as exc:
            errors.append(Problem(path, exc.pos.line, exc.pos.column, exc.message, exc.hint))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(Problem(path, 1, 1, f"cannot read the file: {exc}"))
            continue
        if data is None:
            data = {}
        if not isinstance(data, dict):
            errors.append(Problem(path, 1, 1, "a flow file is a mapping of sections",
                                  "start with one of: " + ", ".join(_fields(Domain))))
            continue
        found = structure_problems(path, data, index)
        errors.extend(found)
        parsed.append((path, data, index, not found))

    sources = Sources()
    merged: dict[str, Any] = {}
    for path, data, index, valid in parsed:
        errors.extend(sources.add(path, data, index, merged if valid else None))
    domain = Domain.model_validate(merged)  # every part was validated above
    checker = Checker(domain, sources, actions)
    checker.run()
    errors.extend(checker.errors)
    errors.sort(key=Problem.sort_key)
    warnings = sorted(checker.warnings, key=Problem.sort_key)
    return LoadResult(None if errors else domain, errors, files, warnings)


# ----------------------------------------------------------- structural errors


def structure_problems(path: Path, data: dict[str, Any], index: PosIndex) -> list[Problem]:
    """Check one file's data against the flow language; pydantic errors -> Problems."""
    problems = _name_problems(path, data, index)
    try:
        Domain.model_validate(data)
    except ValidationError as exc:
        details = exc.errors(include_url=False)
    else:
        return problems
    grouped: dict[tuple[DataPath, bool], list[tuple[ErrorDetails, type[Any] | None]]] = {}
    for error in details:
        data_path, owner, in_union = _align(tuple(error["loc"]))
        grouped.setdefault((data_path, in_union), []).append((error, owner))
    for (data_path, _), errors in grouped.items():
        problems.append(_problem(path, data, index, data_path, errors))
    return problems


def _name_problems(path: Path, data: dict[str, Any], index: PosIndex) -> list[Problem]:
    """Intents, entities, slots and flows are named like identifiers (templates and
    conditions refer to them)."""
    problems = []
    for section in NAMED_SECTIONS:
        entries = data.get(section)
        for name in entries if isinstance(entries, dict) else ():
            if not (isinstance(name, str) and re.fullmatch(NAME, name)):
                pos = index.key((section, name))
                problems.append(Problem(
                    path, pos.line, pos.column, f"{name!r} is not a valid {section[:-1]} name",
                    "names use lowercase letters, digits and _, starting with a letter"))
    return problems


def _fields(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _is_step_union(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Annotated and any(
        isinstance(m, Discriminator) for m in getattr(tp, "__metadata__", ())
    )


def _unwrap(tp: Any) -> Any:
    """Strip Optional and plain Annotated (not the step union, which the loc names)."""
    while True:
        if typing.get_origin(tp) is typing.Annotated and not _is_step_union(tp):
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _align(loc: tuple[int | str, ...]) -> tuple[DataPath, type[Any] | None, bool]:
    """A pydantic error location -> (the path in the data, the model owning its last
    element, whether the error is one of a union's alternatives). pydantic inserts the
    step kind after a step's index and a label for each alternative of a plain union;
    neither is in the data."""
    tp: Any = Domain
    owner: type[Any] | None = None
    out: list[Hashable] = []
    for part in loc:
        tp = _unwrap(tp)
        if _is_step_union(tp):
            tp = STEP_CLASSES.get(str(part))
            continue
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner = tp
            out.append(part)
            tp = next((f.annotation for name, f in tp.model_fields.items()
                       if part in (name, f.alias)), None)
        elif typing.get_origin(tp) is dict:
            owner = None
            out.append(part)
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            owner = None
            out.append(part)
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (typing.Union, types.UnionType, typing.Literal):
            return tuple(out), owner, True  # the rest names a union alternative
        else:
            out.append(part)
            tp = None
    return tuple(out), owner, False


def _lookup(data: Any, path: DataPath) -> Any:
    for part in path:
        found = (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data))
        if not found:
            return None
        data = data[part]
    return data


def close(word: str, choices: Iterable[str]) -> str | None:
    """``did you mean X?`` for a near miss, else None."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {found[0]}?" if found else None


def _what(path: DataPath, owner: type[Any] | None) -> str:
    """Where in the language an element is, for messages: 'in a say step', 'in slot x'."""
    if owner in STEP_CLASSES.values():
        kind = next(k for k, c in STEP_CLASSES.items() if c is owner)
        return f" in {'an' if kind[0] in 'aeiou' else 'a'} {kind} step"
    if owner is Domain or len(path) <= 1:
        return " at the top level"
    if len(path) >= 2 and path[0] in NAMED_SECTIONS and len(path) == 3:
        return f" in {str(path[0])[:-1]} '{path[1]}'"
    if owner is not None:
        return f" in {_OWNER_NAMES.get(owner.__name__, owner.__name__.lower())}"
    return ""


_OWNER_NAMES = {
    "HandoffSpec": "a handoff", "ButtonSpec": "a button", "Trigger": "'when'",
    "MenuOption": "a menu option", "GlobalIntent": "a global", "Validation": "'validate'",
}


def _value_text(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _problem(
    path: Path,
    data: dict[str, Any],
    index: PosIndex,
    data_path: DataPath,
    errors: list[tuple[ErrorDetails, type[Any] | None]],
) -> Problem:
    error, owner = errors[0]
    kind = error["type"]
    name = str(data_path[-1]) if data_path else "file"
    value = _lookup(data, data_path)

    def at(pos: Pos, message: str, hint: str | None = None) -> Problem:
        return Problem(path, pos.line, pos.column, message, hint)

    if kind == "extra_forbidden":
        allowed = _fields(owner) if owner is not None else []
        pos = index.key(data_path)
        if owner in STEP_CLASSES.values() and name in STEP_KINDS:
            return at(pos, f"'{name}' is a step of its own{_what(data_path, owner)}",
                      f"one step does one thing: start a new step with '- {name}: ...'")
        hint = close(name, allowed) or ("allowed here: " + ", ".join(allowed) if allowed
                                        else None)
        if owner is Domain and name == "stories":
            hint = "this is a test story file: put it in the stories/ subdirectory"
        return at(pos, f"unknown field '{name}'{_what(data_path, owner)}", hint)
    if kind == "union_tag_not_found":
        return _unknown_step(path, index, data_path, value)
    if kind == "missing":
        parent = data_path[:-1]
        where = _what(data_path, owner)
        return at(index.value(parent), f"'{name}' is required{where}", _missing_hint(name))
    if len(errors) > 1 or kind == "literal_error":  # one of a union's alternatives
        return at(index.value(data_path), _union_message(name, owner, errors, value))
    message, hint = _describe(error, name, value)
    return at(index.value(data_path), message, hint)


def _unknown_step(path: Path, index: PosIndex, data_path: DataPath, value: Any) -> Problem:
    kinds = ", ".join(STEP_KINDS)
    pos = index.value(data_path)
    if isinstance(value, str):
        return Problem(path, pos.line, pos.column, f"a step must be a mapping, not {value!r}",
                       f"did you mean '- say: {value}'?")
    if not isinstance(value, dict):
        return Problem(path, pos.line, pos.column, "a step must be a mapping",
                       f"start it with one of: {kinds}")
    known = {f for cls in STEP_CLASSES.values() for f in _fields(cls)}
    for key in value:
        if key not in known:
            key_pos = index.key((*data_path, key))
            return Problem(path, key_pos.line, key_pos.column, f"unknown step kind '{key}'",
                           close(str(key), STEP_KINDS) or f"a step is one of: {kinds}")
    return Problem(path, pos.line, pos.column, "this step has no kind",
                   f"start it with one of: {kinds}")


def _missing_hint(name: str) -> str | None:
    return {
        "reason": "agents see the reason in their queue, e.g. 'asked for a refund'",
        "steps": "a flow needs at least one step, e.g. '- say: Hello'",
        "examples": "list a few phrases customers write for this intent",
        "say": "the text the customer sees",
        "handoff": "the handoff: {reason: ..., skill: ...}",
    }.get(name)


_UNION_TEXT = {
    "resolve": "true or a goodbye text",
    "on_fail": "handoff, cancel, or a step id",
    "do": "handoff, restart, cancel, menu, or a flow name",
}


def _union_message(
    name: str, owner: type[Any] | None, errors: list[tuple[ErrorDetails, Any]], value: Any
) -> str:
    if name in _UNION_TEXT:
        return f"'{name}' must be {_UNION_TEXT[name]}, not {_value_text(value)}"
    expected = [str(e.get("ctx", {}).get("expected", "")) for e, _ in errors]
    expected = [e for e in expected if e]
    if expected:
        return f"'{name}' must be {' or '.join(expected)}, not {_value_text(value)}"
    return f"'{name}': " + "; or ".join(e["msg"] for e, _ in errors)


def _describe(error: ErrorDetails, name: str, value: Any) -> tuple[str, str | None]:
    kind = error["type"]
    ctx = error.get("ctx", {})
    got = _value_text(value)
    if kind == "string_type":
        return f"'{name}' must be text, not {got}", "put it in quotes"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"'{name}' must be a whole number, not {got}", None
    if kind in ("float_type", "float_parsing"):
        return f"'{name}' must be a number, not {got}", None
    if kind in ("bool_type", "bool_parsing"):
        return f"'{name}' must be true or false, not {got}", None
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"'{name}' must be a mapping (key: value), not {got}", None
    if kind == "list_type":
        return f"'{name}' must be a list, not {got}", "write each item on a line starting '- '"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == NAME:
            return (f"'{value}' is not a valid name",
                    "names use lowercase letters, digits and _, starting with a letter")
        if str(ctx.get("pattern", "")).startswith("^https?"):
            return f"'{name}' must be an http:// or https:// URL, not {got}", None
        return f"'{name}' does not match {ctx.get('pattern')}: {got}", None
    if kind in ("too_short", "string_too_short"):
        if isinstance(value, str):
            return f"'{name}' must not be empty", None
        return f"'{name}' needs at least {ctx.get('min_length', 1)} item(s)", None
    if kind in ("too_long", "string_too_long"):
        return f"'{name}' is too long (at most {ctx.get('max_length')})", None
    limits = {"greater_than": "more than", "greater_than_equal": "at least",
              "less_than": "less than", "less_than_equal": "at most"}
    if kind in limits:
        limit = next(iter(ctx.values()), "")
        return f"'{name}' must be {limits[kind]} {limit}, not {got}", None
    if kind == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        hint = "units: s, m, h, d, w (30m, 12h, 30d, 2w)" if name == "ttl" else None
        if name == "pattern":
            hint = "a Python regular expression"
        return f"'{name}': {message}", hint
    return f"'{name}': {error['msg']}", None


# ------------------------------------------------------------------ JSON Schema

SCHEMA_ID = "https://raw.githubusercontent.com/omnigate/omnigate/main/docs/flows.schema.json"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a flow file, generated from flows/dsl.py (docs/flows.schema.json).

    Draft-07 (what editors' YAML support, e.g. VS Code's YAML extension, implements fully);
    names of intents, entities, slots and flows must be identifiers there too.
    """
    schema = Domain.model_json_schema(by_alias=True, ref_template="#/definitions/{model}")
    definitions = schema.pop("$defs", {})
    for section in NAMED_SECTIONS:
        schema["properties"][section]["propertyNames"] = {"pattern": NAME}
    for choice in definitions["Slot"]["properties"]["ttl"].get("anyOf", []):
        if choice.get("type") == "string":  # what parse_duration accepts: 30m, 12h, 30d, 2w
            choice["pattern"] = r"^\s*\d+\s*[smhdw]\s*$"
    schema.pop("title", None)
    schema["description"] = (
        "One flow file. Every *.yaml file of a flows directory has this shape; together "
        "they make one bot (see docs/designers-guide.md).")
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": SCHEMA_ID,
        "title": "Omnigate flow file",
        **schema,
        "definitions": definitions,
    }
