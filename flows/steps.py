"""The flow engine's helpers that need no conversation: slot values (validation by type,
choices and rules), profile entries with expiry, templates over nested JSON, the HTTP
step, and Rasa-style button payloads."""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp

from flows.dsl import Http, Slot, parse_duration
from flows.expr import render
from flows.ports import EntityMatch, Understanding

log = logging.getLogger(__name__)

EMAIL = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)?")
YES = {"yes", "y", "yeah", "yep", "sure", "ok", "okay", "true", "correct", "right", "please",
       "ja", "si", "oui"}
NO = {"no", "n", "nope", "nah", "false", "wrong", "cancel", "not"}
UNSURE = {"unsure", "maybe", "perhaps", "know", "dunno", "idk"}  # "not sure", "don't know"
_WORD = re.compile(r"[\w']+")
_PAYLOAD = re.compile(r"/([A-Za-z_][\w-]*)(\{.*\})?", re.DOTALL)


# ------------------------------------------------------------------- slot values


def coerce(slot: Slot, raw: Any) -> tuple[bool, Any]:
    """(valid, value): the answer ``raw`` read as ``slot``'s type and checked by its rules.

    text: the text (a ``validate.pattern`` that matches only part of it keeps that part);
    number: the first number in it; bool: yes/no words; email: the first address in it;
    choice: one of ``choices`` (any case, or the closest spelling).
    """
    if raw is None:
        return False, None
    if isinstance(raw, bool):
        value: Any = raw if slot.type == "bool" else str(raw).lower()
    elif isinstance(raw, int | float) and slot.type == "number":
        value = raw
    else:
        text = str(raw).strip()
        if not text:
            return False, None
        found = _read(slot, text)
        if found is None:
            return False, None
        value = found
    return (True, value) if _rules_pass(slot, value) else (False, None)


def typed(slot: Slot, value: Any) -> Any:
    """A value from a ``set`` step, an http answer or an action, in its slot's type where
    the text plainly is one: "42" for a number slot is 42, "yes"/"true" for a bool slot is
    True (a condition like ``age > 18`` then works). Anything else is kept as it is."""
    if not isinstance(value, str) or slot.type not in ("number", "bool"):
        return value
    if slot.type == "bool":
        found = _read(slot, value)
        return value if found is None else found
    try:
        number = float(value.strip())
    except ValueError:
        return value
    if not math.isfinite(number):
        return value
    return int(number) if number.is_integer() else number


def _read(slot: Slot, text: str) -> Any:
    if slot.type == "number":
        match = NUMBER.search(text)
        if match is None:
            return None
        number = float(match.group(0).replace(",", "."))
        if not math.isfinite(number):
            return None
        return int(number) if number.is_integer() else number
    if slot.type == "bool":
        words = set(_WORD.findall(text.lower()))
        if words & UNSURE:  # "not sure", "I don't know": neither
            return None
        yes, no = bool(words & YES), bool(words & NO)
        return None if yes == no else yes
    if slot.type == "email":
        match = EMAIL.search(text)
        return match.group(0) if match else None
    if slot.type == "choice":
        choices = slot.choices or []
        by_lower = {c.lower(): c for c in choices}
        if text.lower() in by_lower:
            return by_lower[text.lower()]
        close = difflib.get_close_matches(text.lower(), list(by_lower), n=1, cutoff=0.75)
        return by_lower[close[0]] if close else None
    rules = slot.validate_
    if rules is not None and rules.pattern is not None:
        pattern = re.compile(rules.pattern)
        if pattern.fullmatch(text):
            return text
        match = pattern.search(text)
        return match.group(0) if match else None
    return text


def _rules_pass(slot: Slot, value: Any) -> bool:
    rules = slot.validate_
    if rules is None:
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        if rules.min is not None and value < rules.min:
            return False
        if rules.max is not None and value > rules.max:
            return False
    if isinstance(value, str):
        if rules.min_length is not None and len(value) < rules.min_length:
            return False
        if rules.max_length is not None and len(value) > rules.max_length:
            return False
        if rules.pattern is not None and slot.type != "text" and not re.search(
            rules.pattern, value
        ):
            return False
    return True


def storable(value: Any, depth: int = 0) -> bool:
    """Can this be kept in MongoDB as it is (JSON types, no ``$``/dotted keys, not huge)?"""
    if depth > 8:
        return False
    if value is None or isinstance(value, bool | int | str):
        return not isinstance(value, str) or len(value) <= 10_000
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return len(value) <= 200 and all(storable(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 200 and all(
            isinstance(k, str) and k and not k.startswith("$") and "." not in k
            and storable(v, depth + 1) for k, v in value.items()
        )
    return False


# ---------------------------------------------------------------- profile slots


@dataclass(frozen=True, slots=True)
class ProfileValue:
    value: Any
    expires_at: datetime | None


def profile_entry(slot: Slot, value: Any, now: datetime) -> dict[str, Any]:
    """What is saved on the contact for a profile slot."""
    expires = now + timedelta(seconds=parse_duration(slot.ttl)) if slot.ttl else None
    return {
        "value": value,
        "set_at": now.isoformat(),
        "expires_at": expires.isoformat() if expires else None,
    }


def read_profile(entry: Any, now: datetime) -> ProfileValue | None:
    """A stored profile entry, or None if it is missing or expired."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or "value" not in entry:
        return ProfileValue(entry, None)  # written by someone else: a plain value
    expires: datetime | None = None
    raw = entry.get("expires_at")
    if isinstance(raw, str):
        try:
            expires = datetime.fromisoformat(raw)
        except ValueError:
            return None
        if expires.tzinfo is None and now.tzinfo is not None:
            expires = expires.replace(tzinfo=now.tzinfo)
        if expires <= now:
            return None
    if entry["value"] is None:
        return None
    return ProfileValue(entry["value"], expires)


# -------------------------------------------------------------------- templates


def render_json(value: Any, values: Mapping[str, Any]) -> Any:
    """Fill templates inside nested JSON; a string that is exactly one ``{field}`` keeps the
    field's own type (a number stays a number)."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\{([A-Za-z_][\w.]*)\}", value)
        if whole is not None:
            return values.get(whole.group(1))
        return render(value, values)
    if isinstance(value, list):
        return [render_json(v, values) for v in value]
    if isinstance(value, dict):
        return {k: render_json(v, values) for k, v in value.items()}
    return value


def render_url(url: str, values: Mapping[str, Any]) -> str:
    """A URL template: each field's value is percent-encoded (it cannot change the path)."""
    quoted = {k: quote("" if v is None else str(v), safe="") for k, v in values.items()}
    return render(url, quoted)


def dig(data: Any, path: str) -> Any:
    """``"order.items.0.name"`` into parsed JSON; None where the path leads nowhere."""
    for part in path.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.lstrip("-").isdigit():
            index = int(part)
            data = data[index] if -len(data) <= index < len(data) else None
        else:
            return None
    return data


# ------------------------------------------------------------------------- http


@dataclass(frozen=True, slots=True)
class HttpResult:
    ok: bool
    saved: dict[str, Any]
    error: str | None = None


async def call_http(step: Http, values: Mapping[str, Any], limit: float) -> HttpResult:
    """Run an ``http`` step: templated URL, headers and JSON body; ``save`` JSON paths.

    Fails (``ok`` False, with the reason) on a timeout, a connection error, an HTTP status
    of 400 or more, or an answer that is not JSON when something is to be saved.
    """
    url = render_url(step.http, values)
    headers = {k: render(v, values) for k, v in step.headers.items()}
    body = render_json(step.json_, values) if step.json_ is not None else None
    timeout = aiohttp.ClientTimeout(total=max(0.01, min(step.timeout, limit)))
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
            step.method, url, json=body, headers=headers
        ) as response:
            if response.status >= 400:
                return HttpResult(False, {}, f"HTTP {response.status}")
            if not step.save:
                return HttpResult(True, {})
            data = await response.json(content_type=None)
    except TimeoutError:
        return HttpResult(False, {}, f"timed out after {timeout.total:g} s")
    except (aiohttp.ClientError, ValueError) as exc:
        return HttpResult(False, {}, f"{type(exc).__name__}: {exc}")
    return HttpResult(True, {slot: dig(data, path) for slot, path in step.save.items()})


# ---------------------------------------------------------------- button payloads


def intent_payload(value: str | None) -> Understanding | None:
    """A button value written the Rasa way, ``/intent`` or ``/intent{"entity": "value"}``
    (what existing rasa-sdk actions put in their buttons' payloads): that intent, for sure,
    with those entities. None for any other value."""
    match = _PAYLOAD.fullmatch((value or "").strip())
    if match is None:
        return None
    entities: list[EntityMatch] = []
    if match.group(2):
        try:
            data = json.loads(match.group(2))
        except ValueError:
            return None  # "/x{not json}": an ordinary value
        if not isinstance(data, dict):
            return None
        entities = [EntityMatch(entity=str(k), value=str(v), start=0, end=0, text=str(v))
                    for k, v in data.items() if isinstance(v, str | int | float)]
    return Understanding(text=match.group(0), intent=match.group(1), confidence=1.0,
                         entities=entities)
