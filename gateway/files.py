"""Files in conversations: what an item's attachments are, and keeping their bytes.

Every channel's files end in one attachment store (gateway/store/files.py: GridFS in the
same MongoDB). An inbound message's files (``InboundMessage.files``) are kept before the
message is stored: bytes the connector has (an email part, a web chat upload) are stored
at once; a file the channel hands out by reference (Telegram, Slack) is listed as
``pending`` and fetched in the background (gateway/fetcher.py), with a job written in the
same unit as the message, so an acknowledged message never loses a file it announced. A
file over ``OMNIGATE_MAX_ATTACHMENT_BYTES`` is not kept (``too_large``): the customer is
told on their channel and the agent sees it in the item.

An outbound file (an agent's upload) is stored first and sent from the store by the
connector (``ConnectorContext.files``). The stored content type is detected from the
bytes (puremagic), never taken from the name or from what the sender declared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote

import puremagic
from aiohttp import BodyPartReader, web

from gateway.model import (
    Attachment,
    AttachmentState,
    Conversation,
    Direction,
    InboundMessage,
    IncomingFile,
    Party,
    utcnow,
)
from gateway.store.files import FileRecord, FileStore
from gateway.store.mongo import Op, Store
from gateway.store.writer import item_id

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # Telegram's download limit for bots
OCTET_STREAM = "application/octet-stream"
OGG_AUDIO = (b"OpusHead", b"\x01vorbis", b"fLaC")  # an Ogg stream's first packet: audio
# Shown inline (console, widget); anything else is a download. Not SVG: it can script.
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
FETCHES = "file_fetches"  # the background fetcher's jobs (gateway/fetcher.py)
# How a stored file is served: never as a page or script of this origin.
FILE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"
MAX_NAME = 200


class FileTooLarge(Exception):
    """A file over the limit (``size`` None: the channel only said it is too big)."""

    def __init__(self, size: int | None, limit: int) -> None:
        super().__init__(f"{'over' if size is None else f'{size} bytes, over'} the "
                         f"{limit}-byte limit")
        self.size, self.limit = size, limit


def detect(data: bytes) -> str:
    """The content type of ``data`` by its content: a known signature, else text if it
    is UTF-8 without control characters, else application/octet-stream."""
    if not data:
        return OCTET_STREAM
    try:
        found = str(puremagic.from_string(data, mime=True))
    except (puremagic.PureError, ValueError):
        found = ""
    if found == "application/ogg" and any(codec in data[:512] for codec in OGG_AUDIO):
        return "audio/ogg"  # a voice note or an audio file: consoles can play it
    if found:
        return found
    try:
        text = data[:65536].decode("utf-8")
    except UnicodeDecodeError:
        # (a cut in the middle of a character at the end is fine)
        try:
            text = data[:65533].decode("utf-8")
        except UnicodeDecodeError:
            return OCTET_STREAM
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return OCTET_STREAM
    return "text/plain"


async def read_part(part: BodyPartReader, limit: int) -> bytes:
    """A multipart part's bytes, read until ``limit``: one byte more is ``FileTooLarge``
    (nothing beyond is read)."""
    data = bytearray()
    while chunk := await part.read_chunk(65536):
        data += chunk
        if len(data) > limit:
            raise FileTooLarge(None, limit)
    return bytes(data)


def size_text(size: int) -> str:
    """A size as people read it: 20 MB, 512 KB, 900 bytes."""
    for unit, scale in (("MB", 1024 * 1024), ("KB", 1024)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def clean_name(name: str | None, fallback: str) -> str:
    """A file name safe to show and to put in a header: no path, no control characters,
    at most MAX_NAME characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable() and c not in '"\r\n').strip(" .")
    return base[:MAX_NAME] or fallback


def file_headers(name: str, content_type: str, size: int, *, inline: bool,
                 cross_origin: bool = False) -> dict[str, str]:
    """The headers a stored file is served with (to agents and visitors alike;
    ``cross_origin``: a page of another site may show it, as a widget's host page)."""
    ascii_name = clean_name(name.encode("ascii", "replace").decode().replace("?", "_"), "file")
    disposition = (f'{"inline" if inline else "attachment"}; filename="{ascii_name}"; '
                   f"filename*=UTF-8''{quote(name, safe='')}")
    return {"Content-Type": content_type, "Content-Length": str(size),
            "Content-Disposition": disposition, "Content-Security-Policy": FILE_CSP,
            "X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=300",
            "Cross-Origin-Resource-Policy": "cross-origin" if cross_origin else "same-origin"}


def attachment_key(channel: str, external_id: str, file_key: str) -> str:
    """The id of an inbound message's file: the same file of the same message is one
    attachment however often it is delivered."""
    return item_id(f"file:in:{channel}:{external_id}:{file_key}")


@dataclass(frozen=True, slots=True)
class StoredFile:
    """An attachment's record and its bytes (what a connector sends)."""

    record: FileRecord
    data: bytes

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def content_type(self) -> str:
        return self.record.content_type


@dataclass(frozen=True, slots=True)
class Accepted:
    """An inbound message's files as its item lists them, the updates to write with it
    (fetch jobs), and the names that were over the limit (the customer is told)."""

    attachments: list[Attachment]
    ops: list[Op]
    too_large: list[str]


class Files:
    """The attachment store for the core: limits, type detection, inbound and outbound."""

    def __init__(self, store: Store, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.store = FileStore(store)
        self.max_bytes = max_bytes

    async def get(self, attachment_id: str) -> FileRecord | None:
        return await self.store.get(attachment_id)

    async def read(self, record: FileRecord) -> bytes:
        return await self.store.read(record)

    async def serve(self, request: web.Request, record: FileRecord, *, download: bool,
                    cross_origin: bool = False) -> web.StreamResponse:
        """Answer ``request`` with the file (streamed from the store): inline only for the
        image types of INLINE_TYPES and unless ``download``; see ``file_headers``."""
        inline = record.content_type in INLINE_TYPES and not download
        response = web.StreamResponse(headers=file_headers(
            record.name, record.content_type, record.size, inline=inline,
            cross_origin=cross_origin))
        await response.prepare(request)
        async for chunk in self.store.chunks(record):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def load(self, attachment_id: str) -> StoredFile | None:
        """A stored file with its bytes (None: no such attachment)."""
        record = await self.store.get(attachment_id)
        if record is None:
            return None
        return StoredFile(record, await self.store.read(record))

    async def keep(self, attachment_id: str, data: bytes, *, name: str | None,
                   conversation_id: str, contact_id: str, sender: Party, channel: str,
                   direction: Direction, item: str | None = None) -> Attachment:
        """Store ``data`` (raises ``FileTooLarge``); the attachment as items list it."""
        if len(data) > self.max_bytes:
            raise FileTooLarge(len(data), self.max_bytes)
        record = await self.store.put(
            attachment_id, data, name=clean_name(name, "file"), content_type=detect(data),
            conversation_id=conversation_id, contact_id=contact_id, sender=sender,
            channel=channel, direction=direction, item_id=item)
        return stored(record)

    async def accept(self, message: InboundMessage, conversation: Conversation,
                     item: str) -> Accepted:
        """Keep an inbound message's files before the message itself is stored (its
        item id is ``item``)."""
        attachments: list[Attachment] = []
        ops: list[Op] = []
        too_large: list[str] = []
        now = utcnow()
        for n, file in enumerate(message.files):
            attachment_id = attachment_key(message.channel, message.external_id, file.key)
            name = clean_name(file.name, f"file-{n + 1}")
            declared = file.size if file.data is None else len(file.data)
            if declared is not None and declared > self.max_bytes:
                too_large.append(name)
                attachments.append(Attachment(
                    id=None, name=name, size=declared, state=AttachmentState.TOO_LARGE,
                    content_type=file.content_type or OCTET_STREAM,
                    error=f"over the {self.max_bytes}-byte limit"))
                continue
            if file.data is not None:
                attachments.append(await self.keep(
                    attachment_id, file.data, name=name, conversation_id=conversation.id,
                    contact_id=conversation.contact_id, sender=message.sender,
                    channel=message.channel, direction=Direction.INBOUND, item=item))
                continue
            attachments.append(Attachment(
                id=attachment_id, name=name, size=file.size, state=AttachmentState.PENDING,
                content_type=file.content_type or OCTET_STREAM))
            ops.append(fetch_job(attachment_id, message, file, conversation,
                                 item=item, index=n, now=now))
        return Accepted(attachments, ops, too_large)


def stored(record: FileRecord) -> Attachment:
    return Attachment(id=record.id, name=record.name, content_type=record.content_type,
                      size=record.size, state=AttachmentState.STORED)


def fetch_job(attachment_id: str, message: InboundMessage, file: IncomingFile,
              conversation: Conversation, *, item: str, index: int, now: datetime) -> Op:
    """The background fetcher's job for a file the channel hands out by reference,
    written with the message (an upsert: a redelivered message adds none)."""
    return Op(FETCHES, {"_id": attachment_id}, {"$setOnInsert": {
        "item_id": item, "index": index, "channel": message.channel,
        "ref": file.ref or {}, "name": clean_name(file.name, f"file-{index + 1}"),
        "size": file.size, "content_type": file.content_type,
        "conversation_id": conversation.id, "contact_id": conversation.contact_id,
        "sender": message.sender.model_dump(mode="python"),
        "attempts": 0, "due_at": now, "lease_until": now, "created_at": now}},
        upsert=True)
