"""Reading Telegram updates: who wrote, where, was the bot addressed, what was attached.

Pure functions over aiogram's types; no I/O (the connector fetches file references and
stores). Offsets of Telegram's message entities count UTF-16 code units, so every slice
of a text by an entity goes through ``utf16_slice``.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiogram.types import Chat, Message, MessageEntity, User

from gateway.model import Attachment

CHANNEL = "telegram"
GROUP_TYPES = frozenset({"group", "supergroup"})
CALLBACK_PREFIX = "cb:"
# Bots may download files of at most 20 MB through the Bot API (getFile).
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_DEEP_LINK = 512


@dataclass(frozen=True, slots=True)
class BotUser:
    """The bot's own account (getMe): groups address it by @username or by replying."""

    id: int
    username: str | None


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file of a message, before getFile: what Telegram told us about it."""

    kind: str  # photo, document, voice, audio, video, video_note
    file_id: str
    file_unique_id: str
    content_type: str
    name: str | None
    size: int | None


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


def file_refs(message: Message) -> list[FileRef]:
    """The files of a message, in a fixed order. Of a photo's sizes: the largest one."""
    refs: list[FileRef] = []
    if message.photo:
        best = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
        refs.append(FileRef("photo", best.file_id, best.file_unique_id, "image/jpeg",
                            None, best.file_size))
    if (doc := message.document) is not None:
        refs.append(FileRef("document", doc.file_id, doc.file_unique_id,
                            doc.mime_type or "application/octet-stream", doc.file_name,
                            doc.file_size))
    if (voice := message.voice) is not None:
        refs.append(FileRef("voice", voice.file_id, voice.file_unique_id,
                            voice.mime_type or "audio/ogg", None, voice.file_size))
    if (audio := message.audio) is not None:
        refs.append(FileRef("audio", audio.file_id, audio.file_unique_id,
                            audio.mime_type or "audio/mpeg", audio.file_name, audio.file_size))
    if (video := message.video) is not None:
        refs.append(FileRef("video", video.file_id, video.file_unique_id,
                            video.mime_type or "video/mp4", video.file_name, video.file_size))
    if (note := message.video_note) is not None:
        refs.append(FileRef("video_note", note.file_id, note.file_unique_id, "video/mp4",
                            None, note.file_size))
    return refs


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
