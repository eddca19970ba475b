"""The normalised model every channel is translated into.

Modelled on the Bot Framework Activity schema (used here as a data model only): an
``Activity`` has a type, ids, timestamps, the channel, sender and recipient, a reference to
the conversation with the channel's own thread key, text, attachments, suggested actions,
``reply_to_id`` and the raw channel payload (``channel_data``) kept alongside.

A ``Contact`` is one person; it has many ``Identity`` records (channel + external id), so a
customer who writes from web chat and Telegram can be one contact. A ``Conversation`` has
one explicit owner state (``OwnerState``), changed only atomically in the store.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def utcnow() -> datetime:
    """Now, in UTC, at the millisecond precision MongoDB stores."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class ActivityType(StrEnum):
    MESSAGE = "message"
    EVENT = "event"


class Direction(StrEnum):
    INBOUND = "in"
    OUTBOUND = "out"
    INTERNAL = "internal"  # a private note: stays with the agents, never sent


class Role(StrEnum):
    CUSTOMER = "customer"
    BOT = "bot"
    AGENT = "agent"
    SYSTEM = "system"


class OwnerState(StrEnum):
    """Who answers a conversation. Exactly one at any time."""

    BOT = "bot"
    QUEUED = "queued"  # waiting for a human
    AGENT = "agent"  # assigned to one agent
    RESOLVED = "resolved"


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # stored, not yet handed to the connector
    SENDING = "sending"  # a worker holds it
    DELIVERED = "delivered"  # the channel accepted it
    # store-backed channels (web chat): always; sockets read it from the store (what a
    # live socket received is TurnState.delivered_seq, gateway/outbox.py)
    STORED = "stored"
    SKIPPED = "skipped"  # the channel has no rendering for it (e.g. an event)
    FAILED = "failed"  # permanent failure, or retries exhausted


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False)


class Party(_Model):
    """Sender or recipient of an activity."""

    role: Role
    id: str | None = None  # identity external id, agent id, or None for the bot
    name: str | None = None


class ConversationRef(_Model):
    """Where on the channel the conversation lives (chat id, DM channel, thread, ...)."""

    channel: str
    thread_key: str


class AttachmentState(StrEnum):
    """Where an item's file is (gateway/files.py)."""

    STORED = "stored"  # in the attachment store: ``Attachment.id``
    PENDING = "pending"  # being fetched from the channel (a Telegram or Slack file)
    FAILED = "failed"  # could not be fetched (``error`` says why); the message is kept
    TOO_LARGE = "too_large"  # over OMNIGATE_MAX_ATTACHMENT_BYTES: not stored


class Attachment(_Model):
    """A file of an item. ``content_type`` is detected from its bytes once it is stored
    (what the channel or the name said, until then); ``id`` names it in the attachment
    store (GET /api/v1/attachments/{id}). Items stored before 2026-12-08 have only
    ``url`` (a channel reference) and no ``state``."""

    content_type: str
    name: str | None = None
    url: str | None = None
    size: int | None = None
    id: str | None = None
    state: AttachmentState | None = None
    error: str | None = None  # why it is not stored (FAILED, TOO_LARGE)


class IncomingFile(_Model):
    """A file of an inbound message as the connector has it: its bytes (an email part, a
    web chat upload), or what the connector's ``fetch`` needs to download it later
    (``ref``: a Telegram file id, a Slack file). ``key`` tells the message's files apart
    (stable across redeliveries); ``name``, ``content_type`` and ``size`` are what the
    channel says (the stored type is detected from the bytes)."""

    key: str = Field(min_length=1, max_length=256)
    name: str | None = Field(None, max_length=512)
    content_type: str | None = Field(None, max_length=255)
    size: int | None = Field(None, ge=0)
    data: bytes | None = None
    ref: dict[str, Any] | None = None


class Button(_Model):
    """A suggested action. ``value`` comes back as the customer's choice."""

    title: str = Field(min_length=1, max_length=200)
    value: str = Field(min_length=1, max_length=200)
    # A link button: opens ``url`` instead of sending ``value`` back (a "continue in the
    # web chat" offer); channels that cannot show one put the link in the text.
    url: str | None = Field(None, max_length=2048, pattern=r"^(https?|mailto|tg):")


class Delivery(_Model):
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    next_attempt_at: datetime | None = None
    lease_until: datetime | None = None
    last_error: str | None = None
    external_id: str | None = None  # the channel's id of the sent message
    parts_sent: int = 0  # a message sent in parts (long texts): how many went out already
    updated_at: datetime | None = None
    owner: str | None = None  # the gateway process whose claim (status sending) this is


class Edit(_Model):
    """An earlier version of a message the customer edited on their channel."""

    text: str | None
    edited_at: datetime  # when the newer version arrived


class Activity(_Model):
    """One stored item of a conversation: a message or an event."""

    id: str
    type: ActivityType = ActivityType.MESSAGE
    conversation_id: str
    contact_id: str
    seq: int  # per-conversation, starts at 1, +1 per item, no gaps
    contact_seq: int  # per-contact, orders the contact's timeline across conversations
    direction: Direction
    channel: str
    conversation_ref: ConversationRef
    sender: Party
    recipient: Party | None = None
    external_id: str | None = None  # the channel's message id (inbound), for dedupe
    timestamp: datetime  # when the channel says it happened
    created_at: datetime  # when it was stored
    text: str | None = None
    value: str | None = None  # a pressed button's value
    deep_link: str | None = None  # a start payload (Telegram /start <payload>, ...)
    name: str | None = None  # event name (handoff, assigned, resolved, ...)
    attachments: list[Attachment] = Field(default_factory=list)
    buttons: list[Button] = Field(default_factory=list)
    reply_to_id: str | None = None
    channel_data: dict[str, Any] = Field(default_factory=dict)
    edits: list[Edit] = Field(default_factory=list)  # earlier versions, oldest first
    # Before 2026-12 an inbound item carried its own processed flag; now the conversation's
    # ``processed_seq`` says how far its inbound items are processed.
    processed: bool | None = None
    delivery: Delivery | None = None  # outbound only
    dedupe_key: str | None = None  # outbound: makes re-processing idempotent
    idem_key: str | None = None  # stored items: "in:<channel>:<external id>" or "out:<key>"
    # A private note (gateway/desk/notes_api.py): agents see it in the history in order;
    # no channel ever sends it to the customer (web chat sends a content-free "skip").
    private: bool = False
    # The first reply of a bot turn: the turn's record (the inbound seq it answered, the
    # bot's memory after it, its event-log entries: gateway/store/turn_records.py). Read
    # by the pipeline and custom actions' trackers, never shown: not in any dump (API,
    # console, web chat).
    turn: dict[str, Any] | None = Field(default=None, exclude=True)
    # When the fetcher last changed the item's attachments (the change feed's signal to
    # show the item again: gateway/fetcher.py); not shown.
    files_at: datetime | None = Field(default=None, exclude=True)


class LinkOffer(_Model):
    """A way for the customer to continue on ``channel``: open ``url`` (with the link
    token in it); where the link cannot carry it (Slack), send ``code`` there."""

    channel: str
    url: str
    expires_at: datetime
    code: str | None = None

    @property
    def title(self) -> str:
        return CONTINUE_TITLES.get(self.channel, f"Continue on {self.channel}")

    def line(self) -> str:
        """The offer as a line of text (for channels and mails without link buttons)."""
        if self.code is not None:
            return f"{self.title}: send {self.code} to us in a direct message there ({self.url})"
        return f"{self.title}: {self.url}"


CONTINUE_TITLES = {"webchat": "Continue in the web chat", "telegram": "Continue on Telegram",
                   "email": "Continue by email", "slack": "Continue in Slack"}


class InboundMessage(_Model):
    """What a connector hands to the pipeline: one normalised inbound message."""

    channel: str
    external_id: str = Field(min_length=1, max_length=512)
    thread_key: str = Field(min_length=1, max_length=512)
    sender: Party
    sender_external_id: str = Field(min_length=1, max_length=512)
    timestamp: datetime | None = None
    text: str | None = None
    value: str | None = None
    deep_link: str | None = None
    attachments: list[Attachment] = Field(default_factory=list)
    # Files to keep in the attachment store (the pipeline stores them, or has them
    # fetched, and lists them in the stored item's ``attachments``).
    files: list[IncomingFile] = Field(default_factory=list, max_length=100)
    reply_to_external_id: str | None = None
    channel_data: dict[str, Any] = Field(default_factory=dict)


class OutboundDraft(_Model):
    """A message or event someone (bot, agent, system) wants to say in a conversation."""

    type: ActivityType = ActivityType.MESSAGE
    sender: Party
    text: str | None = None
    name: str | None = None
    buttons: list[Button] = Field(default_factory=list)
    attachments: list[Attachment] = Field(default_factory=list)
    reply_to_id: str | None = None
    dedupe_key: str | None = None
    # Send on this channel of the contact (an agent's choice); None: where the customer
    # wrote last (Conversation.reply_channel).
    channel: str | None = None


class Identity(_Model):
    """One channel account of a contact."""

    id: str  # f"{channel}:{external_id}"
    channel: str
    external_id: str
    contact_id: str
    display_name: str | None = None
    reachable: bool = True
    unreachable_reason: str | None = None
    created_at: datetime
    # A web chat visitor who came by a link from another channel: the conversation their
    # chat continues (gateway/identity.py); None: their own thread's conversation.
    conversation_id: str | None = None


class Contact(_Model):
    id: str
    name: str | None = None
    profile: dict[str, Any] = Field(default_factory=dict)
    identities: list[Identity] = Field(default_factory=list)
    seq: int = 0  # a lower bound of the last contact_seq (the writer keeps it close)
    created_at: datetime
    profile_at: datetime | None = None  # when the profile last changed (the change feed)
    merged_into: str | None = None  # merged by an agent: this contact lives on there
    merged_from: list[str] = Field(default_factory=list)  # contacts merged into this one


class Handoff(_Model):
    reason: str
    skill: str | None = None
    team: str | None = None  # route to this team (issue 5); None: any team
    priority: str = "normal"  # low, normal, high, urgent
    requested_at: datetime
    topic: str | None = None  # the bot flow that handed off (analytics; None: no flow ran)


class Lease(_Model):
    """Which gateway process is processing a conversation's turns, until when."""

    owner: str | None  # None: free
    until: datetime


class TurnState(_Model):
    """What a conversation's turns change, in its own small document (collection
    ``turn_state``, same id as the conversation), as of its last checkpoint; a bot turn
    with replies records what it changed on its first reply instead (the two together:
    ``turn_records.current``; gateway/store/turns.py)."""

    id: str  # the conversation's id
    # A copy of ``Conversation.owner``, written in the same transaction as every owner
    # change, so a bot turn's commit (which requires "bot") conflicts with a claim.
    owner: OwnerState = OwnerState.BOT
    bot_state: dict[str, Any] = Field(default_factory=dict)
    # The bot's event log (gateway/store/turn_records.py) counts from the turn of this
    # seq: the first turn after the bot's memory was last cleared.
    bot_since: int = 0
    # +1 each time the bot's memory is cleared (hand back, resolve, reopen): a turn
    # record of an earlier epoch holds a memory from before that.
    epoch: int = 0
    # Every inbound item with a seq up to this one is processed (its turn is done).
    processed_seq: int = 0
    # Web chat: the highest seq a visitor's open socket received (delivery, recorded).
    delivered_seq: int = 0
    lease: Lease | None = None


class Sla(_Model):
    """Targets for one handoff (from its priority) and how they were met."""

    started_at: datetime | None = None  # the handoff's time: keys this set of timers
    team: str | None = None  # whose business hours the clock runs in (None: default)
    first_response_due: datetime | None = None
    resolution_due: datetime | None = None
    first_response_at: datetime | None = None  # the first agent reply after the handoff
    resolved_at: datetime | None = None
    first_response_breached: bool = False
    resolution_breached: bool = False


class Csat(_Model):
    asked_at: datetime
    score: int | None = Field(None, ge=1, le=5)
    comment: str | None = None
    answered_at: datetime | None = None


class Conversation(_Model):
    id: str
    channel: str
    thread_key: str
    contact_id: str
    owner: OwnerState = OwnerState.BOT
    assignee_id: str | None = None
    handoff: Handoff | None = None
    seq: int = 0  # a lower bound of the last item's seq (Store.top_seq: the exact one)
    created_at: datetime
    updated_at: datetime
    # The last turn or reply; while the bot answers, written at most once a minute
    # (ACTIVITY_EVERY in gateway/pipeline.py): what its turns change is in ``TurnState``.
    last_activity_at: datetime | None = None
    # One customer, every channel (gateway/identity.py): the contact wrote in this
    # conversation from other channels too (channel -> thread key there), and replies go
    # to the channel they used last (None: this conversation's own channel).
    routes: dict[str, str] = Field(default_factory=dict)
    reply_channel: str | None = None
    # Only the customer and we are in its thread (a Slack DM, a mail to our address
    # alone, ...): another channel's message of theirs may continue it.
    one_to_one: bool = False
    # Label ids (gateway/store/labels.py), set by agents.
    labels: list[str] = Field(default_factory=list)
    # The intents the bot's NLU recognised in the customer's messages since the
    # conversation (re)opened, each once (gateway/bot_turn.py; analytics' intent).
    intents: list[str] = Field(default_factory=list)
    # Service levels (gateway/sla.py) and the customer's rating after resolve (CSAT).
    sla: Sla | None = None
    csat: Csat | None = None


class AgentRole(StrEnum):
    """What an agent may do: admins everything; agents conversations; designers flows."""

    ADMIN = "admin"
    AGENT = "agent"
    DESIGNER = "designer"


class Presence(StrEnum):
    ONLINE = "online"
    AWAY = "away"
    OFFLINE = "offline"


class Agent(_Model):
    id: str
    name: str
    email: str | None = None
    active: bool = True
    created_at: datetime
    role: AgentRole = AgentRole.AGENT
    teams: list[str] = Field(default_factory=list)
    skills: list[str] = Field(default_factory=list)
    capacity: int = Field(3, ge=0, le=100)  # conversations at once
    presence: Presence = Presence.OFFLINE
    presence_at: datetime | None = None
    # Routing bookkeeping (gateway/assign.py), kept by conditional updates in the store:
    load: int = Field(0, ge=0)  # conversations assigned to this agent now
    last_assigned_at: datetime | None = None  # ties between equally busy agents: idlest first
    requeue_at: datetime | None = None  # went offline: re-queue their conversations then
