"""Web chat files: visitors upload over HTTP and read their conversation's files by
short-lived signed links (docs/webchat-protocol.md, "Files").

- ``POST /webchat/upload``: ``Authorization: Bearer <visitor token>``, a
  ``multipart/form-data`` body with a ``client_id`` part, an optional ``text`` part and one
  or more ``file`` parts. The message is stored like a socket message (the same
  ``client_id`` dedupe, the same rate limit) with its files, and answered with the same
  ``ack`` frame as JSON; the visitor's open sockets get the item as usual.
- ``GET /webchat/files/{id}?v=<visitor>&exp=<unix>&sig=<mac>``: a file of the visitor's own
  conversation. The link is made by the gateway for that visitor (in the item frames it
  sends them, or on asking with a ``file`` frame) and expires after ``LINK_TTL``; the MAC
  binds the attachment, the visitor and the expiry, so it cannot be moved to another file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from aiohttp import BodyPartReader, web
from pymongo.errors import PyMongoError

from connectors.webchat.tokens import CHANNEL, VISITOR_ID
from gateway.files import FileTooLarge, clean_name, read_part, size_text
from gateway.model import InboundMessage, IncomingFile, Party, Role

if TYPE_CHECKING:
    from connectors.webchat.connector import WebchatConnector

LINK_TTL = 3600  # seconds a file link works
CONTEXT = b"omnigate webchat file link"  # key derivation: this key signs nothing else
MAX_FILES = 10
CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FileLinks:
    """Makes and checks a visitor's links to the files of their conversation."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self._key = hmac.new(secret, CONTEXT, hashlib.sha256).digest()
        self.clock = clock

    def _mac(self, attachment_id: str, visitor_id: str, expires: int) -> str:
        message = f"{attachment_id}.{visitor_id}.{expires}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def url(self, attachment_id: str, visitor_id: str) -> str:
        """A link for ``visitor_id`` to attachment ``attachment_id``, relative to the
        gateway (the widget resolves it against the address it connects to)."""
        expires = math.ceil(self.clock()) + LINK_TTL
        query = urlencode({"v": visitor_id, "exp": expires,
                           "sig": self._mac(attachment_id, visitor_id, expires)})
        return f"/webchat/files/{attachment_id}?{query}"

    def check(self, attachment_id: str, visitor_id: str, expires: str, mac: str) -> bool:
        if not expires.isdigit() or int(expires) < self.clock():
            return False
        expected = self._mac(attachment_id, visitor_id, int(expires))
        return hmac.compare_digest(expected.encode(), mac.encode())


async def handle_download(chat: WebchatConnector, request: web.Request) -> web.StreamResponse:
    files = chat.context.files
    attachment_id = request.match_info["id"]
    visitor = request.query.get("v", "")
    links = await chat.file_links()
    if (files is None or not VISITOR_ID.match(visitor)
            or not links.check(attachment_id, visitor, request.query.get("exp", ""),
                               request.query.get("sig", ""))):
        return _refused(403, "forbidden", "this link is not valid (or has expired)")
    record = await files.get(attachment_id)
    conversation = (None if record is None
                    else await chat.context.store.get_conversation(record.conversation_id))
    if record is None or conversation is None or visitor not in (
            conversation.thread_key if conversation.channel == CHANNEL else None,
            conversation.routes.get(CHANNEL)):
        return _refused(404, "not_found", "no such file in this chat")
    return await files.serve(request, record, download=request.query.get("download") == "1",
                             cross_origin=True)


@dataclass
class Upload:
    client_id: str | None = None
    text: str | None = None
    files: list[IncomingFile] = field(default_factory=list)


async def handle_upload(chat: WebchatConnector, request: web.Request) -> web.StreamResponse:
    """A message with files from the widget (see the module doc)."""
    if not chat.origin_allowed(request):
        return _refused(403, "origin_not_allowed", "this page's origin may not use the chat")
    auth = request.headers.get("Authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else ""
    visitor = await chat.visitor_of(token) if token else None
    if visitor is None:
        return _refused(401, "invalid_token", "a visitor token is needed "
                        "(Authorization: Bearer <token> from the welcome frame)")
    files = chat.context.files
    if files is None:
        return _refused(503, "unavailable", "files are not kept by this gateway")
    wait = chat.messages.take(visitor)
    if wait > 0:
        response = _refused(429, "rate_limited", "too many messages; this one was not "
                            "stored: send it again later",
                            retry_after=math.ceil(wait * 10) / 10)
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response
    try:
        upload = await _read(request, files.max_bytes, chat.config.max_text)
    except _Refused as exc:
        return _refused(exc.status, exc.code, str(exc))
    try:
        result = await chat.context.ingest(InboundMessage(
            channel=CHANNEL, external_id=f"{visitor}:{upload.client_id}", thread_key=visitor,
            sender=Party(role=Role.CUSTOMER, id=visitor), sender_external_id=visitor,
            text=upload.text, files=upload.files))
    except PyMongoError:
        return _refused(503, "unavailable", "not stored: the store is unavailable; send it "
                        "again with the same client_id")
    chat.hub.bind_visitor(visitor, result.conversation.id)
    await chat.hub.push(visitor, result.item)
    return web.json_response({"type": "ack", "client_id": upload.client_id,
                              "id": result.item.id, "seq": result.item.seq,
                              "duplicate": result.duplicate})


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


async def _read(request: web.Request, max_bytes: int, max_text: int) -> Upload:
    upload = Upload()
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise _Refused(400, "bad_frame", "the body must be multipart/form-data") from None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise _Refused(400, "bad_frame", "nested multipart bodies are not read")
        if part.name == "file":
            if len(upload.files) >= MAX_FILES:
                raise _Refused(400, "bad_frame", f"at most {MAX_FILES} files in one message")
            data = await _limited(part, max_bytes, "file_too_large",
                                  f"{part.filename or 'a file'} is larger than "
                                  f"{size_text(max_bytes)}, the largest file the chat takes")
            name = clean_name(part.filename, f"file-{len(upload.files) + 1}")
            upload.files.append(IncomingFile(key=str(len(upload.files)), name=name, data=data))
        elif part.name in ("text", "client_id"):
            raw = await _limited(part, 4 * max_text, "text_too_long", "text too long")
            value = raw.decode("utf-8", "replace").strip() or None
            setattr(upload, part.name, value)
        else:
            raise _Refused(400, "bad_frame", f"unknown part {part.name!r}")
    if upload.client_id is None or not CLIENT_ID.match(upload.client_id):
        raise _Refused(400, "bad_frame", "client_id: 1-64 letters, digits, - or _")
    if upload.text is not None and len(upload.text) > max_text:
        raise _Refused(400, "text_too_long", f"text over {max_text} characters")
    if not upload.files:
        raise _Refused(400, "bad_frame", "no file in the upload (send text over the socket)")
    return upload


async def _limited(part: BodyPartReader, limit: int, code: str, message: str) -> bytes:
    try:
        return await read_part(part, limit)
    except FileTooLarge:
        raise _Refused(413, code, message) from None


def _refused(status: int, code: str, message: str, **more: Any) -> web.Response:
    return web.json_response({"type": "error", "code": code, "message": message, **more},
                             status=status)
