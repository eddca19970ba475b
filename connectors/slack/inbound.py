"""What Slack sends us, checked and normalised: Events API envelopes and block_actions.

Bolt parses the body and runs its middleware (signature, url_verification, self events)
before any listener; its matchers and middleware index into the payload without checking
types, so ``envelope_problem`` turns the shapes they would trip over into a 400 first.
The listeners then validate exactly the fields they read with the models below.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.model import IncomingFile

CHANNEL = "slack"

# The payload types the connector answers. Anything else is a 400 (we never configure
# slash commands, shortcuts or modals, so Slack does not send them).
SUPPORTED_TYPES = frozenset(
    {"url_verification", "event_callback", "block_actions", "app_rate_limited"}
)
# Message subtypes that are a person saying something. Others (joins, topic changes, ...)
# are acknowledged and ignored; message_changed is an edit.
SPOKEN_SUBTYPES = frozenset({"file_share", "thread_broadcast"})

SlackId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# Seconds (at most 11 digits: a year a datetime can hold) and Slack's fraction.
SlackTs = Annotated[str, StringConstraints(pattern=r"^\d{1,11}(\.\d{1,9})?$")]
Short = Annotated[str, StringConstraints(max_length=2000)]
MAX_FILE_NAME = 512  # IncomingFile.name
TIMESTAMP_HEADER = re.compile(r"\d{1,12}")
SIGNATURE_HEADER = re.compile(r"v0=[0-9a-f]{64}")


def _unencodable(value: Any) -> bool:
    """Does any string in ``value`` hold a lone surrogate (JSON allows it; BSON does not)?"""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def envelope_problem(body: Any) -> str | None:
    """Why bolt could not safely route this parsed body, or None if it can."""
    if not isinstance(body, dict):
        return "the body must be a JSON object (or a form with a JSON payload)"
    if _unencodable(body):
        return "the payload holds text that is not valid Unicode"
    if body.get("ssl_check") == "1" and "event" not in body:
        return None  # Slack's certificate check (a form without a type); bolt answers it
    kind = body.get("type")
    if not isinstance(kind, str):
        return "the payload has no type"
    if kind not in SUPPORTED_TYPES:
        return f"unsupported payload type {kind[:50]!r}"
    if "event" in body:
        event = body["event"]
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return "event must be an object with a string type"
    elif kind == "event_callback":
        return "event_callback without an event"
    if kind == "block_actions":
        actions = body.get("actions")
        if not isinstance(actions, list) or not actions:
            return "block_actions without actions"
        for action in actions:
            if not isinstance(action, dict) or not isinstance(action.get("action_id"), str):
                return "every action needs a string action_id"
            if "block_id" in action and not isinstance(action["block_id"], str):
                return "block_id must be a string"
    return None


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SlackFile(_Model):
    """A file of a message event, or files.info's ``file`` (the fields we read)."""

    id: SlackId
    name: Short | None = None
    title: Short | None = None
    mimetype: Short | None = None
    size: int | None = Field(None, ge=0, le=2**53)
    url_private: Short | None = None
    url_private_download: Short | None = None
    permalink: Short | None = None
    file_access: Short | None = None  # "check_file_info": only files.info has the details
    mode: Short | None = None  # hosted, external, snippet, tombstone (deleted), ...
    is_external: bool | None = None  # a Google Drive (...) link, not stored in Slack
    external_type: Short | None = None

    @property
    def complete(self) -> bool:
        return self.file_access != "check_file_info" and self.url_private is not None

    @property
    def download_url(self) -> str | None:
        return self.url_private_download or self.url_private


def incoming_file(file: SlackFile) -> IncomingFile:
    """A file of a message, for the attachment store: fetched later by the connector
    (``SlackConnector.fetch``) from ``ref``, never while Slack waits for our answer. A
    file Slack hands out as a stub (``check_file_info``, Slack Connect) has no URL in
    ``ref``: the fetch asks files.info first."""
    mimetype = file.mimetype if file.mimetype and len(file.mimetype) <= 255 else None
    ref: dict[str, Any] = {"file": file.id, "content_type": mimetype, "size": file.size}
    if file.complete and file.download_url:
        ref["url"] = file.download_url
    if file.is_external:
        ref["external"] = file.external_type or "external"
        ref["link"] = file.url_private or file.permalink
    name = file.name or file.title
    return IncomingFile(key=file.id, name=name[:MAX_FILE_NAME] if name else None,
                        content_type=mimetype, size=file.size, ref=ref)


def incoming_files(files: list[SlackFile]) -> list[IncomingFile]:
    """A message's files, each once (Slack names a file by its id)."""
    seen: set[str] = set()
    out: list[IncomingFile] = []
    for file in files:
        if file.id not in seen:
            seen.add(file.id)
            out.append(incoming_file(file))
    return out


class EditedMessage(_Model):
    ts: SlackTs
    text: str | None = Field(None, max_length=50_000)
    user: SlackId | None = None
    bot_id: Short | None = None


class MessageEvent(_Model):
    """A ``message`` or ``app_mention`` event (the fields we read)."""

    type: Literal["message", "app_mention"]
    subtype: Short | None = None
    channel: SlackId
    channel_type: Short | None = None  # im, mpim, channel, group (message events only)
    user: SlackId | None = None
    bot_id: Short | None = None
    text: str | None = Field(None, max_length=50_000)
    ts: SlackTs
    thread_ts: SlackTs | None = None
    client_msg_id: Short | None = None
    team: Short | None = None
    files: list[SlackFile] = Field(default_factory=list, max_length=100)
    message: EditedMessage | None = None  # message_changed: the new version

    @property
    def from_bot(self) -> bool:
        return self.bot_id is not None or self.subtype == "bot_message"


class MessageEnvelope(_Model):
    type: Literal["event_callback"]
    event_id: Short | None = None
    team_id: Short | None = None
    event: MessageEvent


class ActionText(_Model):
    text: Annotated[str, StringConstraints(max_length=200)]


class Action(_Model):
    action_id: Short
    block_id: Short | None = None
    type: Short | None = None
    value: Short | None = None
    text: ActionText | None = None
    action_ts: SlackTs


class ActionUser(_Model):
    id: SlackId
    name: Short | None = None
    username: Short | None = None


class ActionChannel(_Model):
    id: SlackId


class ActionContainer(_Model):
    channel_id: SlackId | None = None
    message_ts: SlackTs | None = None
    thread_ts: SlackTs | None = None


class ActionMessage(_Model):
    ts: SlackTs | None = None
    thread_ts: SlackTs | None = None


class BlockActions(_Model):
    type: Literal["block_actions"]
    user: ActionUser
    actions: list[Action] = Field(min_length=1, max_length=25)
    channel: ActionChannel | None = None
    container: ActionContainer | None = None
    message: ActionMessage | None = None
    trigger_id: Short | None = None

    @property
    def channel_id(self) -> str | None:
        if self.channel is not None:
            return self.channel.id
        return self.container.channel_id if self.container is not None else None

    @property
    def thread_ts(self) -> str | None:
        if self.container is not None and self.container.thread_ts:
            return self.container.thread_ts
        return self.message.thread_ts if self.message is not None else None

    @property
    def message_ts(self) -> str | None:
        if self.container is not None and self.container.message_ts:
            return self.container.message_ts
        return self.message.ts if self.message is not None else None


def thread_key_for(channel: str, thread_ts: str | None, ts: str) -> str:
    """A channel conversation is one thread: ``<channel>:<thread root ts>``."""
    return f"{channel}:{thread_ts or ts}"


def split_thread_key(thread_key: str) -> tuple[str, str | None]:
    """(channel, thread_ts): a DM's key is its channel id; a thread's is channel:ts."""
    channel, sep, thread_ts = thread_key.partition(":")
    return channel, (thread_ts if sep else None)


def slack_time(ts: str) -> datetime:
    return datetime.fromtimestamp(float(ts), UTC)


def strip_mention(text: str | None, bot_user_id: str | None) -> str | None:
    """The text without the bot's own ``<@U…>`` mention (what the bot should read)."""
    if text is None or bot_user_id is None:
        return text
    return re.sub(rf"<@{re.escape(bot_user_id)}(\|[^>]*)?>", "", text).strip()
