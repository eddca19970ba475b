"""Frames of the web chat socket protocol (docs/webchat-protocol.md), both ways."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.files import INLINE_TYPES
from gateway.model import Activity, ActivityType, Attachment, AttachmentState, Direction

PROTOCOL_VERSION = 1
CLIENT_ID = r"^[A-Za-z0-9_-]{1,64}$"
MAX_SEQ = 2**53  # larger numbers are no seq (and do not fit the store's 64-bit integers)


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields: forward compatible


class Hello(_Frame):
    type: Literal["hello"]
    token: str | None = None  # a malformed token is answered with invalid_token
    watermark: int | None = Field(None, ge=0)
    # a link token from another channel (the page's #omnigate-link=...): continue there
    link: str | None = Field(None, max_length=64)


class SendMessage(_Frame):
    type: Literal["message"]
    client_id: str = Field(pattern=CLIENT_ID)
    text: str = Field(max_length=1_000_000)


class SendAction(_Frame):
    type: Literal["action"]
    client_id: str = Field(pattern=CLIENT_ID)
    value: str = Field(min_length=1, max_length=200)
    title: str = Field(min_length=1, max_length=200)


class HistoryRequest(_Frame):
    type: Literal["history"]
    before: int = Field(ge=1, le=MAX_SEQ)
    limit: int = Field(50, ge=1, le=100)


class FileRequest(_Frame):
    """Ask for a fresh link to a file of this chat (the ones in item frames expire)."""

    type: Literal["file"]
    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class LinkRequest(_Frame):
    """Ask for a link that continues this chat on another channel (Telegram, Slack)."""

    type: Literal["link"]
    channel: str = Field("telegram", pattern=r"^[a-z]{1,32}$")


class EmailLinkRequest(_Frame):
    """Prove an email address: a one-time code is mailed there (docs/webchat-protocol.md)."""

    type: Literal["email_link"]
    address: str = Field(min_length=3, max_length=254)


class EmailVerify(_Frame):
    """The code from that mail (spaces and dashes are ignored)."""

    type: Literal["email_verify"]
    code: str = Field(pattern=r"^[0-9][0-9 -]{4,14}[0-9]$")

    @property
    def digits(self) -> str:
        return "".join(c for c in self.code if c.isdigit())


class Typing(_Frame):
    """The visitor is typing (``on``: send again every few seconds while typing) or
    stopped; agents see it."""

    type: Literal["typing"]
    on: bool = True


class ErrorCode:
    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    NOT_READY = "not_ready"
    ALREADY_READY = "already_ready"
    TOO_LARGE = "too_large"
    TEXT_TOO_LONG = "text_too_long"
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - an error code
    UNAVAILABLE = "unavailable"
    LINK_UNAVAILABLE = "link_unavailable"  # that channel is off, or cannot make links now
    INVALID_ADDRESS = "invalid_address"  # email_link: not an address a code can go to
    RATE_LIMITED = "rate_limited"  # too many hellos, messages or email codes: retry_after
    # email_verify: the code was not accepted (nothing linked), or the address belongs
    # to another customer (an agent can merge)
    WRONG_CODE = "wrong_code"
    CODE_EXPIRED = "code_expired"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    NO_CODE = "no_code"
    ALREADY_LINKED = "already_linked"
    NOT_FOUND = "not_found"  # file: no such file in this chat
    FILE_TOO_LARGE = "file_too_large"  # upload: a file over OMNIGATE_MAX_ATTACHMENT_BYTES
    INTERNAL = "internal"


def error(code: str, message: str, client_id: str | None = None) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "client_id": client_id}


def attachment_frames(attachments: list[Attachment], link: Callable[[str], str] | None
                      ) -> list[dict[str, Any]]:
    """An item's files as the widget sees them: a link for the stored ones (``inline``:
    an image it may show), the reason for the others."""
    shown: list[dict[str, Any]] = []
    for a in attachments:
        frame: dict[str, Any] = {"name": a.name, "content_type": a.content_type,
                                 "size": a.size, "state": (a.state or AttachmentState.STORED)}
        if a.id is not None and a.state is AttachmentState.STORED:
            frame["url"] = link(a.id) if link is not None else None
            frame["id"] = a.id
            frame["inline"] = a.content_type in INLINE_TYPES
        else:
            frame["url"] = a.url  # a link the channel gave (items of older versions)
            frame["inline"] = False
        if a.error:
            frame["error"] = a.error
        shown.append(frame)
    return shown


def item_frame(item: Activity, link: Callable[[str], str] | None = None) -> dict[str, Any]:
    """A stored item as the client sees it (never the raw channel payload). A private
    note is only its seq (a ``skip``: the client advances its watermark, shows nothing).
    ``link``: an attachment id -> a link for this visitor (files.FileLinks)."""
    if item.private:
        return {"type": "skip", "seq": item.seq}
    timestamp = item.created_at.isoformat()
    if item.type is ActivityType.EVENT:
        return {
            "type": "event",
            "id": item.id,
            "seq": item.seq,
            "name": item.name,
            "text": item.text,
            "timestamp": timestamp,
        }
    client_id = None
    if item.direction is Direction.INBOUND and item.external_id and ":" in item.external_id:
        client_id = item.external_id.split(":", 1)[1]
    return {
        "type": "message",
        "id": item.id,
        "seq": item.seq,
        "role": item.sender.role.value,
        "sender": {"name": item.sender.name},
        "text": item.text,
        "buttons": [b.model_dump() for b in item.buttons],
        "attachments": attachment_frames(item.attachments, link),
        "timestamp": timestamp,
        "client_id": client_id,
    }
