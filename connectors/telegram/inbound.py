"""Reading Telegram updates: who wrote, where, was the bot addressed, what was attached.

Pure functions over aiogram's types; no I/O (files are only named here, by reference;
the gateway's fetcher downloads them later: connectors/telegram/files.py). Offsets of
Telegram's message entities count UTF-16 code units, so every slice of a text by an
entity goes through ``utf16_slice``.
"""

from __future__ import annotations

import json
import mimetypes
from dataclasses import dataclass
from typing import Any

from aiogram import Bot
from aiogram.types import Chat, Message, MessageEntity, Update, User
from pydantic import ValidationError

from gateway.model import Attachment, IncomingFile

CHANNEL = "telegram"
GROUP_TYPES = frozenset({"group", "supergroup"})
CALLBACK_PREFIX = "cb:"
MAX_DEEP_LINK = 512
# Stickers come without a MIME type: by their format (Telegram's own for animated ones).
STICKER_EXT = {"static": "webp", "animated": "tgs", "video": "webm"}
STICKER_TYPE = {"static": "image/webp", "animated": "application/x-tgsticker",
                "video": "video/webm"}
KNOWN_EXT = {"audio/ogg": ".ogg", "audio/opus": ".ogg", "audio/mp4": ".m4a",
             "audio/x-m4a": ".m4a", "image/webp": ".webp", "image/jpeg": ".jpg"}
DEFAULT_EXT = {"photo": ".jpg", "voice": ".ogg", "video": ".mp4", "video_note": ".mp4",
               "animation": ".mp4"}
_MIME = mimetypes.MimeTypes()  # Python's own table only: the same names on every machine


@dataclass(frozen=True, slots=True)
class BotUser:
    """The bot's own account (getMe): groups address it by @username or by replying."""

    id: int
    username: str | None


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def utf16_slice(text: str, offset: int, length: int) -> str:
    data = text.encode("utf-16-le")
    return data[offset * 2 : (offset + length) * 2].decode("utf-16-le", errors="replace")


def is_group(chat: Chat) -> bool:
    return chat.type in GROUP_TYPES


def thread_key(chat: Chat, user: User) -> str:
    """One conversation per private chat, and one per person in a group chat."""
    return f"{chat.id}:{user.id}" if is_group(chat) else str(chat.id)


def chat_of(thread_key: str) -> int:
    """The chat to send to for a conversation's thread key."""
    return int(thread_key.split(":", 1)[0])


def message_key(chat_id: int, message_id: int) -> str:
    """The stable external id of a Telegram message: redeliveries are duplicates."""
    return f"{chat_id}:{message_id}"


def display_name(user: User) -> str:
    return " ".join(p for p in (user.first_name, user.last_name) if p) or str(user.id)


def text_and_entities(message: Message) -> tuple[str | None, list[MessageEntity]]:
    if message.text is not None:
        return message.text, list(message.entities or [])
    return message.caption, list(message.caption_entities or [])


def _names_bot(text: str, entity: MessageEntity, me: BotUser) -> bool:
    if entity.type == "text_mention":
        return entity.user is not None and entity.user.id == me.id
    if me.username is None:
        return False
    piece = utf16_slice(text, entity.offset, entity.length).lower()
    name = me.username.lower()
    if entity.type == "mention":
        return piece == "@" + name
    if entity.type == "bot_command":
        return piece.endswith("@" + name)
    return False


def addressed_to_bot(message: Message, me: BotUser) -> bool:
    """In a group: does this message mention the bot, command it, or reply to it?"""
    reply = message.reply_to_message
    if reply is not None and reply.from_user is not None and reply.from_user.id == me.id:
        return True
    text, entities = text_and_entities(message)
    return text is not None and any(_names_bot(text, e, me) for e in entities)


def without_bot_mentions(text: str, entities: list[MessageEntity], me: BotUser | None) -> str:
    """The text with "@bot" mentions (and "@bot" after commands) removed, stripped."""
    if me is None or me.username is None:
        return text.strip()
    data = text.encode("utf-16-le")
    suffix = ("@" + me.username).lower()
    cuts: list[tuple[int, int]] = []
    for entity in entities:
        if entity.type not in ("mention", "bot_command") or not _names_bot(text, entity, me):
            continue
        end = entity.offset + entity.length
        start = entity.offset if entity.type == "mention" else end - utf16_len(suffix)
        if entity.type == "mention" and data[end * 2 : end * 2 + 2] == " ".encode("utf-16-le"):
            end += 1  # "@bot what time" → "what time"
        cuts.append((start, end))
    for start, end in sorted(cuts, reverse=True):
        data = data[: start * 2] + data[end * 2 :]
    return data.decode("utf-16-le", errors="replace").strip()


def start_payload(text: str) -> tuple[bool, str | None]:
    """(is it /start, its deep-link payload): "/start abc" → (True, "abc")."""
    head, _, rest = text.strip().partition(" ")
    command = head.split("@", 1)[0]
    if command != "/start":
        return False, None
    payload = rest.strip()
    return True, (payload[:MAX_DEEP_LINK] or None)


def incoming_files(message: Message) -> list[IncomingFile]:
    """The files of a message, by reference (``ref``: what ``TelegramConnector.fetch``
    needs), in a fixed order; nothing is looked up here. Of a photo's sizes: the largest.
    A file the message names twice (an animation is also its document) is listed once."""
    found: list[tuple[str, Any, str | None, str | None]] = []  # kind, file, name, type
    if message.photo:
        best = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
        found.append(("photo", best, None, "image/jpeg"))
    if (doc := message.document) is not None:
        found.append(("document", doc, doc.file_name, doc.mime_type))
    if (anim := message.animation) is not None:
        found.append(("animation", anim, anim.file_name, anim.mime_type))
    if (voice := message.voice) is not None:
        found.append(("voice", voice, None, voice.mime_type or "audio/ogg"))
    if (audio := message.audio) is not None:
        found.append(("audio", audio, audio.file_name, audio.mime_type))
    if (video := message.video) is not None:
        found.append(("video", video, video.file_name, video.mime_type))
    if (note := message.video_note) is not None:
        found.append(("video_note", note, None, "video/mp4"))
    if (sticker := message.sticker) is not None:
        fmt = "video" if sticker.is_video else "animated" if sticker.is_animated else "static"
        found.append(("sticker", sticker, f"sticker.{STICKER_EXT[fmt]}", STICKER_TYPE[fmt]))
    files: list[IncomingFile] = []
    for kind, file, name, content_type in found:
        key = str(file.file_unique_id or file.file_id or kind)[:256]
        if any(f.key == key for f in files):
            continue
        size = file.file_size if isinstance(file.file_size, int) and file.file_size >= 0 else None
        mime = content_type if content_type and len(content_type) <= 255 else None
        ref: dict[str, Any] = {"file_id": file.file_id, "kind": kind}
        if size is not None:
            ref["size"] = size  # (shown on the attachment should fetching fail)
        if mime is not None:
            ref["content_type"] = mime
        files.append(IncomingFile(key=key, name=file_name(kind, name, mime)[:512],
                                  content_type=mime, size=size, ref=ref))
    return files


def file_name(kind: str, given: str | None, mime: str | None) -> str:
    """The file's own name, else one by its kind and type: photo.jpg, voice.ogg,
    document.pdf, video_note.mp4..."""
    if given and given.strip():
        return given
    ext = KNOWN_EXT.get(mime or "") or (_MIME.guess_extension(mime) if mime else None)
    return kind + (ext or DEFAULT_EXT.get(kind, ""))


def location_attachment(message: Message) -> Attachment | None:
    """A shared location (or venue) as a ``geo:`` URI (RFC 5870)."""
    location = message.location or (message.venue.location if message.venue else None)
    if location is None:
        return None
    name = message.venue.title if message.venue else "Location"
    return Attachment(content_type="application/geo+uri", name=name,
                      url=f"geo:{location.latitude},{location.longitude}")


def button_title(message: Message | None, data: str) -> str | None:
    """The title of the inline button whose callback data is ``data``, if it is shown."""
    markup = message.reply_markup if message is not None else None
    if markup is None:
        return None
    for row in markup.inline_keyboard:
        for button in row:
            if button.callback_data == data:
                return button.text
    return None


def parse_update(body: bytes, bot: Bot) -> Update | str:
    """The update in a webhook body, or why it is not one (for a 400)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return "body is not JSON"
    if not isinstance(data, dict):
        return "body is not a JSON object"
    if (problem := _unstorable(data)) is not None:
        return problem
    try:
        return Update.model_validate(data, context={"bot": bot})
    except (ValidationError, ValueError, TypeError, RecursionError) as exc:
        return f"not a Telegram update: {str(exc).splitlines()[0]}"


INT64 = 2**63


def _unstorable(data: dict[str, Any]) -> str | None:
    """What in a decoded body the store could not hold: a text with an unpaired surrogate
    (JSON allows "\\ud800", UTF-8 does not) or an integer beyond 64 bits."""
    stack: list[Any] = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "a text has an unpaired UTF-16 surrogate"
        elif isinstance(value, int) and not -INT64 <= value < INT64:
            return "a number is beyond 64 bits"
    return None
