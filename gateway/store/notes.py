"""Private notes: items of a conversation's history that only agents ever see.

A note is appended like any other item (same transaction, so it takes the next ``seq`` and
``contact_seq`` and shows in the agent's history and the contact's timeline in order),
with ``private: true``, direction ``internal`` and no delivery: the outbox, which only
looks at items with a pending delivery, never picks it up, so no connector sends it.
The web chat replaces it by a content-free ``skip`` frame (docs/webchat-protocol.md).
"""

from __future__ import annotations

from gateway.model import (
    Activity,
    ActivityType,
    Agent,
    Conversation,
    ConversationRef,
    Direction,
    Party,
    Role,
    utcnow,
)
from gateway.store.mongo import Doc, Store, new_id, outbound_key


async def append_note(
    store: Store, conversation: Conversation, agent: Agent, text: str
) -> Activity:
    note_id = new_id()
    return await append_private(
        store, conversation, ActivityType.MESSAGE,
        Party(role=Role.AGENT, id=agent.id, name=agent.name), text,
        key=f"note:{note_id}", item_id=note_id,
    )


async def append_private(
    store: Store, conversation: Conversation, kind: ActivityType, sender: Party, text: str,
    *, key: str, name: str | None = None, item_id: str | None = None,
) -> Activity:
    """Append an item only agents see (a note, an SLA breach event), once per ``key``
    (a second call with the same key raises DuplicateKeyError)."""
    now = utcnow()
    doc: Doc = {
        "_id": item_id or new_id(),
        "type": kind.value,
        "direction": Direction.INTERNAL.value,
        "channel": conversation.channel,
        "conversation_ref": ConversationRef(
            channel=conversation.channel, thread_key=conversation.thread_key
        ).model_dump(),
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
        "processed": None,
        "delivery": None,  # never delivered: the outbox only sees items with a delivery
        "dedupe_key": None,
        "idem_key": outbound_key(key),
        "private": True,
    }
    return await store._append(conversation.id, doc)  # the one way items get their seq
