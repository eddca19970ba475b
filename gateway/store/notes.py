"""Private notes: items of a conversation's history that only agents ever see.

A note is appended like any other item (same transaction, so it takes the next ``seq`` and
``contact_seq`` and shows in the agent's history and the contact's timeline in order),
with ``private: true``, direction ``internal`` and no delivery: the outbox, which only
looks at items with a pending delivery, never picks it up, so no connector sends it.
The web chat replaces it by a content-free ``skip`` frame (docs/webchat-protocol.md).
"""

from __future__ import annotations

from gateway.model import Activity, ActivityType, Agent, Conversation, Party, Role, utcnow
from gateway.store.items import private_doc
from gateway.store.mongo import Store, new_id


async def append_note(
    store: Store, conversation: Conversation, agent: Agent, text: str
) -> Activity:
    return await append_private(
        store, conversation, ActivityType.MESSAGE,
        Party(role=Role.AGENT, id=agent.id, name=agent.name), text, key=f"note:{new_id()}",
    )


async def append_private(
    store: Store, conversation: Conversation, kind: ActivityType, sender: Party, text: str,
    *, key: str, name: str | None = None,
) -> Activity:
    """Append an item only agents see (a note, an SLA breach event), once per ``key``
    (a second call with the same key raises DuplicateKeyError)."""
    doc = private_doc(conversation, kind, sender, text, utcnow(), key=key, name=name)
    return await store._append(conversation.id, doc)  # the one way items get their seq
