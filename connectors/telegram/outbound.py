"""Rendering stored outbound items for Telegram: texts in parts, styles, inline keyboards,
files with captions.

Everything here is deterministic: the same item always gives the same steps (text parts
and files), so a retry after a failure in the middle (of a long text, or between two
files) resumes at ``Delivery.parts_sent``: nothing is sent or uploaded twice.
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
MAX_CAPTION = 1024  # a file's caption, counted the same way
# Sent with sendPhoto (Telegram shows them as photos, recompressed), up to its 10 MB;
# a GIF goes as a document (Telegram shows it animated).
PHOTO_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
MAX_PHOTO_BYTES = 10 * 1024 * 1024
OGG_TYPES = frozenset({"application/ogg", "audio/ogg", "audio/opus"})
MAX_CALLBACK_BYTES = 64
# callback_data of a button whose value does not fit in 64 bytes: this prefix and a hash;
# the value is kept in the connector's state. Values that start with it are mapped too.
LONG_VALUE_PREFIX = "og~"


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    italic: bool = False  # system notes (events)
    bold_prefix: int = 0  # UTF-16 units of "Alice:" at the start, shown bold


def render(item: Activity, *, with_files: bool = False) -> Rendered | None:
    """The text to send for an item, or None if Telegram has nothing to show for it.

    Events (handoff, assigned, resolved...) become an italic note. Agents speak through
    the bot's account, so their name prefixes the text: "Alice: Hello"; an agent's files
    without text are captioned with the name alone (``with_files``).
    """
    text = (item.text or "").strip()
    links = [f"{a.name or 'file'}: {a.url}" for a in item.attachments if a.url]
    text = "\n".join([text, *links]).strip() if links else text
    if item.type is ActivityType.EVENT:
        return Rendered(text, italic=True) if text else None
    agent = item.sender.role is Role.AGENT
    name = (item.sender.name or "Agent").strip() or "Agent"
    if not text:
        return Rendered(name, bold_prefix=utf16_len(name)) if agent and with_files else None
    if agent:
        return Rendered(f"{name}: {text}", bold_prefix=utf16_len(name) + 1)
    return Rendered(text)


@dataclass(frozen=True, slots=True)
class Step:
    """One message of an item: a text part (``file`` None), or the item's ``file``-th
    file with ``text`` as its caption (None: no caption). ``part``: the text part's
    index (its styles)."""

    text: str | None
    file: int | None = None
    part: int = 0


def plan(rendered: Rendered | None, files: int) -> list[Step]:
    """The messages that send an item with ``files`` files: the text as the first file's
    caption when it fits in one, else the text (in parts) first, then the files.
    Without files: the text's parts, exactly as they always were."""
    text = rendered.text if rendered is not None else ""
    uploads = [Step(None, n) for n in range(files)]
    if files and text and utf16_len(text) <= MAX_CAPTION:
        return [Step(text, 0), *uploads[1:]]
    parts = [Step(p, None, n) for n, p in enumerate(split_text(text))] if text else []
    return parts + uploads


def upload_method(content_type: str, data: bytes) -> str:
    """How a file of this (detected) type goes out: photo, voice or document."""
    if content_type in PHOTO_TYPES and 0 < len(data) <= MAX_PHOTO_BYTES:
        return "photo"
    if content_type in OGG_TYPES and is_opus(data):
        return "voice"
    return "document"


def is_opus(data: bytes) -> bool:
    """An Ogg file whose first stream is Opus (its first page carries "OpusHead")."""
    if len(data) < 27 or data[:4] != b"OggS":
        return False
    start = 27 + data[26]  # the page header, then its segment table
    return data[start : start + 8] == b"OpusHead"


def refused_as(method: str, description: str) -> bool:
    """Whether Telegram's 400 says the file cannot go this way (and may as a document):
    PHOTO_INVALID_DIMENSIONS, IMAGE_PROCESS_FAILED, VOICE_MESSAGES_FORBIDDEN..."""
    text = description.upper()
    if method == "photo":
        return "PHOTO" in text or "IMAGE" in text
    return method == "voice" and "VOICE" in text


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


def keyboard(rows: list[tuple[str, str]], links: list[tuple[str, str]] | None = None
             ) -> InlineKeyboardMarkup:
    """One button per row: (title, callback_data), then the link buttons (title, url)."""
    return InlineKeyboardMarkup(
        inline_keyboard=[[InlineKeyboardButton(text=title, callback_data=data)]
                         for title, data in rows]
        + [[InlineKeyboardButton(text=title, url=url)] for title, url in links or []]
    )


def opens_here(url: str) -> bool:
    """A link a Telegram button can open (http(s) and tg: only; a mailto: stays in the
    text)."""
    return url.startswith(("https://", "http://", "tg://"))
