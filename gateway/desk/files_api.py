"""Files in the agent API (part of ``/api``, see api.py).

- ``GET /api/v1/attachments/{id}``: a stored attachment's bytes, to an agent token or a
  console session that may read its conversation (``may_read``). Images of a few safe
  types are served inline (the console shows them), everything else as a download; every
  answer carries ``nosniff`` and a sandboxing Content-Security-Policy, so a file is never
  run as a page or script of this origin.
- ``POST /api/v1/conversations/{id}/messages`` takes ``multipart/form-data`` besides
  JSON: an optional ``text`` part, an optional ``channel`` part and one or more ``file``
  parts (``read_reply``). The files are kept in the attachment store and go out with the
  reply on the customer's channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from gateway.desk.auth import STAFF, AccessError, BadInput, Forbidden
from gateway.desk.http import AGENT
from gateway.desk.openapi import Endpoint, Query
from gateway.files import Files, FileTooLarge, clean_name, read_part
from gateway.keys import FILES, STORE
from gateway.model import Agent, AgentRole, Conversation
from gateway.store import NotFound

MAX_FILES = 10  # files in one reply
MAX_TEXT = 4000


class TooLarge(AccessError):
    status, code = 413, "too_large"


def may_read(agent: Agent, conversation: Conversation) -> bool:
    """Whether ``agent`` may read the files of ``conversation``: admins always; an agent
    if it is assigned to them, has no team, or is of one of their teams (an agent of no
    team works the whole desk)."""
    if agent.role is AgentRole.ADMIN or conversation.assignee_id == agent.id:
        return True
    team = conversation.handoff.team if conversation.handoff is not None else None
    return team is None or not agent.teams or team in agent.teams


def _files(request: web.Request) -> Files:
    return request.config_dict[FILES]


async def get_attachment(request: web.Request) -> web.StreamResponse:
    files = _files(request)
    record = await files.get(request.match_info["id"])
    if record is None:
        raise NotFound("no such attachment")
    conversation = await request.config_dict[STORE].get_conversation(record.conversation_id)
    if conversation is None:
        raise NotFound("no such attachment")
    if not may_read(request[AGENT], conversation):
        raise Forbidden("this attachment belongs to another team's conversation")
    download = request.query.get("download", "false")
    if download not in ("true", "false", "1", "0"):
        raise BadInput("download must be true or false (or 1 or 0)")
    return await files.serve(request, record, download=download in ("true", "1"))


@dataclass
class ReplyParts:
    """A reply as the agent sent it: JSON, or multipart with files."""

    text: str | None = None
    channel: str | None = None
    files: list[tuple[str, bytes]] = field(default_factory=list)  # (name, bytes)


async def read_multipart(request: web.Request, max_bytes: int) -> ReplyParts:
    """``text``, ``channel`` and ``file`` parts; a file over ``max_bytes`` is a 413."""
    reply = ReplyParts()
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise BadInput("the body must be multipart/form-data with a boundary") from None
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise BadInput("nested multipart bodies are not read")
        if part.name == "file":
            if len(reply.files) >= MAX_FILES:
                raise BadInput(f"at most {MAX_FILES} files in one reply")
            data = await _read_limited(part, max_bytes)
            reply.files.append((clean_name(part.filename, f"file-{len(reply.files) + 1}"),
                                data))
        elif part.name in ("text", "channel"):
            value = (await _read_limited(part, 4 * MAX_TEXT)).decode("utf-8", "replace")
            setattr(reply, part.name, value.strip() or None)
        else:
            raise BadInput(f"unknown part {part.name!r} (text, channel, file)")
    if reply.text is not None and len(reply.text) > MAX_TEXT:
        raise BadInput(f"text: at most {MAX_TEXT} characters")
    if reply.channel is not None and len(reply.channel) > 32:
        raise BadInput("channel: at most 32 characters")
    if reply.text is None and not reply.files:
        raise BadInput("a reply needs text or at least one file")
    return reply


async def _read_limited(part: BodyPartReader, limit: int) -> bytes:
    try:
        return await read_part(part, limit)
    except FileTooLarge:
        raise TooLarge(f"part {part.name!r} is larger than {limit} bytes") from None


MULTIPART_REPLY: dict[str, Any] = {
    "schema": {
        "type": "object",
        "properties": {
            "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT,
                     "pattern": r"\S", "description": "the reply's text (optional with files)"},
            "channel": {"type": "string", "minLength": 1, "maxLength": 32, "pattern": r"\S",
                        "description": "send on this channel of the contact"},
            "file": {"type": "array", "minItems": 1, "maxItems": MAX_FILES,
                     "items": {"type": "string", "format": "binary"},
                     "description": "one or more files (each at most "
                                    "OMNIGATE_MAX_ATTACHMENT_BYTES)"},
        },
        "anyOf": [{"required": ["text"]}, {"required": ["file"]}],
        "additionalProperties": False,
    },
    "encoding": {"file": {"contentType": "application/octet-stream"}},
}


def files_endpoints() -> list[Endpoint]:
    return [
        Endpoint(
            "GET",
            "/v1/attachments/{id}",
            get_attachment,
            "A file of a conversation (inline if it is a PNG, JPEG, GIF or WebP image "
            "and download is not asked for; else as a download)",
            None,
            query=(Query("download", "true (or 1): always as a download",
                         enum=("true", "false", "1", "0")),),
            errors=(401, 403, 404, 503),
            tag="attachments",
            roles=STAFF,
            content={"*/*": {"schema": {"type": "string", "format": "binary"}}},
        ),
    ]
