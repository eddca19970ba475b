"""Templates (``"Order {order_number} shipped"``) and conditions (``order_state == 'shipped'``).

Templates use ``{name}`` fields: a slot, or ``profile.<key>`` / ``contact.name``.
Conditions are single Python-like expressions over slot names, evaluated safely by
simpleeval (no attribute access, no calls but a few helpers, no imports). Both expose the
names they use, so flows/validate.py can report an unknown name at its file position.
"""

from __future__ import annotations

import ast
import string
from collections.abc import Mapping
from typing import Any

from simpleeval import EvalWithCompoundTypes, InvalidExpression

_FORMATTER = string.Formatter()
FUNCTIONS = {"len": len, "lower": lambda s: str(s).lower(), "int": int, "float": float,
             "str": str}


class ExpressionError(ValueError):
    """A template or condition that cannot be parsed or evaluated."""


def template_fields(text: str) -> set[str]:
    """The field names a template uses (``{order_number}`` -> ``order_number``)."""
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise ExpressionError(f"bad template {text!r}: {exc}") from None
    fields = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field or spec or conversion:
            raise ExpressionError(
                f"bad template field {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}: use plain {{slot}} fields"
            )
        fields.add(field)
    return fields


def render(text: str, values: Mapping[str, Any]) -> str:
    """Fill a template; a field without a value renders as an empty string."""
    out = []
    for literal, field, _, _ in _FORMATTER.parse(text):
        out.append(literal)
        if field is not None:
            value = values.get(field)
            out.append("" if value is None else str(value))
    return "".join(out)


def condition_names(expression: str) -> set[str]:
    """The variable names a condition reads (function names excluded)."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"bad condition {expression!r}: {exc.msg}") from None
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Name)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - called
    return names - {"True", "False", "None"}


def evaluate(expression: str, values: Mapping[str, Any]) -> bool:
    """Evaluate a condition; a name without a value is None."""
    names = {name: values.get(name) for name in condition_names(expression)}
    evaluator = EvalWithCompoundTypes(names=names, functions=FUNCTIONS)
    try:
        return bool(evaluator.eval(expression))
    except (InvalidExpression, TypeError, ValueError, ZeroDivisionError, SyntaxError) as exc:
        raise ExpressionError(f"condition {expression!r} failed: {exc}") from None
