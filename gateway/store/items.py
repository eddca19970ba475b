"""The stored shape of an item (message, event, note), built in one place.

An item's ``_id`` comes from its idempotency key (``idem_key``: the channel's message id
for inbound, the dedupe key for outbound), so the same message stored twice collides on
``_id`` (gateway/store/writer.py). ``conversation_id``, ``contact_id``, ``seq`` and
``contact_seq`` are filled in by the writer when it numbers the item.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.model import (
    ActivityType,
    Conversation,
    ConversationRef,
    DeliveryStatus,
    Direction,
    InboundMessage,
    OutboundDraft,
    Party,
)
from gateway.store.writer import item_id, new_id

Doc = dict[str, Any]


def inbound_key(channel: str, external_id: str) -> str:
    """The idempotency key of an inbound message: its channel's message id."""
    return f"in:{channel}:{external_id}"


def outbound_key(dedupe_key: str) -> str:
    """The idempotency key of an outbound item: its dedupe key (or its own id)."""
    return f"out:{dedupe_key}"


def inbound_id(channel: str, external_id: str) -> str:
    return item_id(inbound_key(channel, external_id))


def inbound_doc(message: InboundMessage, now: datetime, reply_to: str | None = None) -> Doc:
    key = inbound_key(message.channel, message.external_id)
    return {
        "_id": item_id(key),
        "type": ActivityType.MESSAGE.value,
        "direction": Direction.INBOUND.value,
        "channel": message.channel,
        "conversation_ref": {"channel": message.channel, "thread_key": message.thread_key},
        "sender": message.sender.model_dump(mode="python"),
        "recipient": {"role": "bot", "id": None, "name": None},
        "external_id": message.external_id,
        "timestamp": message.timestamp or now,
        "created_at": now,
        "text": message.text,
        "value": message.value,
        "deep_link": message.deep_link,
        "name": None,
        "attachments": [a.model_dump(mode="python") for a in message.attachments],
        "buttons": [],
        "reply_to_id": reply_to,
        "channel_data": message.channel_data,
        "delivery": None,
        "dedupe_key": None,
        "idem_key": key,
    }


def delivery(status: DeliveryStatus, now: datetime, **more: Any) -> Doc:
    """A delivery record as stored (see gateway.model.Delivery)."""
    return {"status": status.value, "attempts": 0, "next_attempt_at": now,
            "lease_until": None, "owner": None, "last_error": None, "external_id": None,
            "parts_sent": 0, "updated_at": now, **more}


def outbound_doc(
    addressed: Conversation, draft: OutboundDraft, now: datetime, delivery_doc: Doc | None
) -> Doc:
    """An outbound item of ``addressed`` (the conversation as its channel and thread
    address it: another of the contact's channels after a channel switch)."""
    doc_id = new_id()
    key = outbound_key(draft.dedupe_key or doc_id)
    return {
        "_id": item_id(key) if draft.dedupe_key else doc_id,
        "type": draft.type.value,
        "direction": Direction.OUTBOUND.value,
        "channel": addressed.channel,
        "conversation_ref": ConversationRef(
            channel=addressed.channel, thread_key=addressed.thread_key).model_dump(),
        "sender": draft.sender.model_dump(mode="python"),
        "recipient": {"role": "customer", "id": None, "name": None},
        "external_id": None,
        "timestamp": now,
        "created_at": now,
        "text": draft.text,
        "value": None,
        "name": draft.name,
        "attachments": [a.model_dump(mode="python") for a in draft.attachments],
        "buttons": [b.model_dump(mode="python") for b in draft.buttons],
        "reply_to_id": draft.reply_to_id,
        "channel_data": {},
        "delivery": delivery_doc,
        "dedupe_key": draft.dedupe_key,
        "idem_key": key,
    }


def private_doc(
    conversation: Conversation, kind: ActivityType, sender: Party, text: str, now: datetime,
    *, key: str, name: str | None = None,
) -> Doc:
    """An item only agents see (a note, an SLA breach event); once per ``key``."""
    idem = outbound_key(key)
    return {
        "_id": item_id(idem),
        "type": kind.value,
        "direction": Direction.INTERNAL.value,
        "channel": conversation.channel,
        "conversation_ref": ConversationRef(
            channel=conversation.channel, thread_key=conversation.thread_key).model_dump(),
        "sender": sender.model_dump(mode="python"),
        "recipient": None,
        "external_id": None,
        "timestamp": now,
        "created_at": now,
        "text": text,
        "value": None,
        "name": name,
        "attachments": [],
        "buttons": [],
        "reply_to_id": None,
        "channel_data": {},
        "delivery": None,  # never delivered: the outbox only sees items with a delivery
        "dedupe_key": None,
        "idem_key": idem,
        "private": True,
    }
