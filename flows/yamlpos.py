"""YAML with positions: plain data plus the line and column of every key and value.

Flow files are read as YAML 1.2 by ruamel.yaml (so ``yes``, ``no``, ``on`` and ``off``
stay text, as a designer writing ``value: yes`` on a button means). Its round-trip loader
keeps where every mapping key, mapping value and sequence item starts; this module turns
that into plain Python data (what pydantic validates) and an index from a data *path*
(``("flows", "order", "steps", 2, "say")``) to 1-based positions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

DataPath = tuple[Hashable, ...]


@dataclass(frozen=True, slots=True, order=True)
class Pos:
    """A 1-based line and column."""

    line: int
    column: int


START = Pos(1, 1)


class YamlSyntaxError(Exception):
    """The file is not valid YAML; ``pos`` is where the parser gave up."""

    def __init__(self, message: str, pos: Pos, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.hint = hint


@dataclass(slots=True)
class PosIndex:
    """Where each key and value of one file starts."""

    keys: dict[DataPath, Pos] = field(default_factory=dict)
    values: dict[DataPath, Pos] = field(default_factory=dict)

    def key(self, path: DataPath) -> Pos:
        """The position of the key at ``path`` (for an item of a list: the item)."""
        return self._find(path, self.keys)

    def value(self, path: DataPath) -> Pos:
        """The position of the value at ``path``."""
        return self._find(path, self.values)

    def has(self, path: DataPath) -> bool:
        return path in self.values

    def _find(self, path: DataPath, table: dict[DataPath, Pos]) -> Pos:
        # A path that is not in the file (a default, a missing field) falls back to the
        # closest enclosing thing that is: the mapping the field is missing from.
        for end in range(len(path), 0, -1):
            found = table.get(path[:end]) or self.values.get(path[:end])
            if found is not None:
                return found
        return START


def _pos(line_col: Any) -> Pos:
    line, column = line_col
    return Pos(int(line) + 1, int(column) + 1)


def _plain(node: Any, path: DataPath, index: PosIndex) -> Any:
    """ruamel's round-trip objects -> plain dict/list/str/int/float/bool, indexing positions."""
    if isinstance(node, CommentedMap):
        out: dict[Any, Any] = {}
        for raw_key, value in node.items():
            key = _plain_scalar(raw_key)
            child = (*path, key)
            try:
                index.keys[child] = _pos(node.lc.key(raw_key))
                index.values[child] = _pos(node.lc.value(raw_key))
            except (KeyError, TypeError):  # a key merged in from an anchor (<<: *base)
                pass
            out[key] = _plain(value, child, index)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for number, value in enumerate(node):
            child = (*path, number)
            with contextlib.suppress(KeyError, TypeError):
                index.keys[child] = index.values[child] = _pos(node.lc.item(number))
            items.append(_plain(value, child, index))
        return items
    return _plain_scalar(node)


def _plain_scalar(value: Any) -> Any:
    # ruamel returns subclasses that remember their formatting; pydantic wants the base types.
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        # ScalarBoolean is an int subclass (an anchored true/false)
        return bool(value) if type(value).__name__ == "ScalarBoolean" else int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dt.datetime):
        return dt.datetime.fromisoformat(value.isoformat())
    if isinstance(value, dt.date):
        return dt.date.fromisoformat(value.isoformat())
    if isinstance(value, dict):
        return {_plain_scalar(k): _plain_scalar(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_scalar(v) for v in value]
    return value


def load_yaml(text: str) -> tuple[Any, PosIndex]:
    """Parse one YAML document: (plain data, positions). Raises YamlSyntaxError."""
    yaml = YAML(typ="rt")
    try:
        node = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if "end of stream" in str(exc.problem) and exc.context_mark is not None:
            mark = exc.context_mark  # an unclosed quote or bracket: where it was opened
        pos = Pos(mark.line + 1, mark.column + 1) if mark is not None else START
        problem = exc.problem or exc.context or "invalid YAML"
        message = f"YAML: {problem}"
        if "another document" in problem:  # ruamel: "but found another document"
            message = "YAML: a second document starts here"
        elif exc.context and exc.problem and exc.context_mark is not None:
            message += f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise YamlSyntaxError(message, pos, _yaml_hint(problem)) from None
    except YAMLError as exc:
        raise YamlSyntaxError(f"YAML: {exc}", START) from None
    index = PosIndex()
    index.keys[()] = index.values[()] = START
    return _plain(node, (), index), index


def load_yaml_file(path: Path) -> tuple[Any, PosIndex]:
    return load_yaml(path.read_text(encoding="utf-8"))


def _yaml_hint(problem: str) -> str | None:
    if "duplicate key" in problem:
        return "a key may appear once per mapping: merge the two, or rename one"
    if "'\\t'" in problem:
        return "indent with spaces, not tabs"
    if "another document" in problem:
        return "one document per file: remove the '---' line or split the file"
    if "mapping values are not allowed" in problem:
        return "a text containing ': ' needs quotes"
    return None
