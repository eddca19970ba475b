"""Rendering stored outbound items for Telegram: texts in parts, styles, inline keyboards.

Everything here is deterministic: the same item always gives the same parts, so a retry
after a failure in the middle of a long text resumes at ``Delivery.parts_sent``.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup, MessageEntity

from connectors.telegram.inbound import utf16_len
from gateway.model import Activity, ActivityType, Role

# A message text is at most 4096 characters; counted here in UTF-16 code units (what
# Telegram's entity offsets count), which is never more characters than that.
MAX_TEXT = 4096
MAX_CALLBACK_BYTES = 64
# callback_data of a button whose value does not fit in 64 bytes: this prefix and a hash;
# the value is kept in the connector's state. Values that start with it are mapped too.
LONG_VALUE_PREFIX = "og~"


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    italic: bool = False  # system notes (events)
    bold_prefix: int = 0  # UTF-16 units of "Alice:" at the start, shown bold


def render(item: Activity) -> Rendered | None:
    """The text to send for an item, or None if Telegram has nothing to show for it.

    Events (handoff, assigned, resolved...) become an italic note. Agents speak through
    the bot's account, so their name prefixes the text: "Alice: Hello".
    """
    text = (item.text or "").strip()
    links = [f"{a.name or 'file'}: {a.url}" for a in item.attachments if a.url]
    text = "\n".join([text, *links]).strip() if links else text
    if item.type is ActivityType.EVENT:
        return Rendered(text, italic=True) if text else None
    if not text:
        return None
    if item.sender.role is Role.AGENT:
        name = (item.sender.name or "Agent").strip() or "Agent"
        return Rendered(f"{name}: {text}", bold_prefix=utf16_len(name) + 1)
    return Rendered(text)


def _fits(text: str, limit: int) -> int:
    """How many characters of ``text`` fit in ``limit`` UTF-16 code units."""
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return index
    return len(text)


def split_text(text: str, limit: int = MAX_TEXT) -> list[str]:
    """Parts of at most ``limit`` UTF-16 units that concatenate to ``text``, in order.

    A part ends after the last newline in its second half, else after the last space
    there, else exactly at the limit (never inside a character).
    """
    parts: list[str] = []
    rest = text
    while utf16_len(rest) > limit:
        cut = _fits(rest, limit)
        window = rest[:cut]
        for separator in ("\n", " "):
            at = window.rfind(separator)
            if at >= cut // 2:
                cut = at + 1
                break
        parts.append(rest[:cut])
        rest = rest[cut:]
    if rest or not parts:
        parts.append(rest)
    return parts


def entities(rendered: Rendered, part: str, index: int) -> list[MessageEntity] | None:
    length = utf16_len(part)
    if rendered.italic and length:
        return [MessageEntity(type="italic", offset=0, length=length)]
    if rendered.bold_prefix and index == 0:
        return [MessageEntity(type="bold", offset=0, length=min(rendered.bold_prefix, length))]
    return None


def needs_mapping(value: str) -> bool:
    """A button value that cannot be callback_data as it is."""
    return (
        len(value.encode("utf-8")) > MAX_CALLBACK_BYTES or value.startswith(LONG_VALUE_PREFIX)
    )


def short_key(value: str) -> str:
    """The callback_data standing for a long value: the same value, the same key."""
    digest = hashlib.sha256(value.encode("utf-8")).digest()
    return LONG_VALUE_PREFIX + base64.urlsafe_b64encode(digest).decode()[:32]


def keyboard(rows: list[tuple[str, str]]) -> InlineKeyboardMarkup:
    """One button per row: (title, callback_data)."""
    return InlineKeyboardMarkup(
        inline_keyboard=[[InlineKeyboardButton(text=title, callback_data=data)]
                         for title, data in rows]
    )
