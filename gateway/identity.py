"""One customer, every channel: verified linking, merges, and the channel switch.

Linking is verified, never guessed from a name. A customer in the web chat asks for a
"continue on Telegram" link: a single-use token (15 minutes) in a Telegram deep link
(``https://t.me/<bot>?start=link_...``). Whoever opens it sends ``/start <token>`` from
their Telegram account; the pipeline redeems the token *before* it looks for the
conversation, so that very message already belongs to the web chat's contact and
continues its open conversation. Expired, used and unknown tokens are refused politely;
nothing else ever links two accounts.

Agents can also merge two contacts and undo a merge (``ContactStore``, recorded exactly).

The channel switch: ``Pipeline.open_conversation`` asks ``continue_elsewhere`` whether a
message on a one-to-one thread continues the contact's open conversation on another
channel; ``note_inbound`` remembers where the customer wrote last; the outbox sends each
reply there (``route``), or on the channel an agent chose. Every item keeps its own
channel, so the history shows where each message came from.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Protocol, runtime_checkable

from pydantic import BaseModel

from gateway.model import (
    Activity,
    Conversation,
    ConversationRef,
    InboundMessage,
    OutboundDraft,
    Party,
    Role,
)
from gateway.outbox import Outbox
from gateway.store import Store
from gateway.store.contacts import ContactStore, LinkState, Merge, is_link_payload

log = logging.getLogger(__name__)

SYSTEM = Party(role=Role.SYSTEM, name="Omnigate")
LINK_ANSWERS = {
    LinkState.LINKED: "You're connected: this chat now continues your conversation. "
    "Just write here.",
    LinkState.EXPIRED: "Sorry, this link has expired. Ask for a new one in the web chat.",
    LinkState.USED: "Sorry, this link was already used. Ask for a new one in the web chat.",
    LinkState.UNKNOWN: "Sorry, this link is not valid. Ask for a new one in the web chat.",
}

__all__ = ["DeepLinks", "Identity", "LinkOffer", "LinkUnavailable", "is_link_payload"]


@runtime_checkable
class DeepLinks(Protocol):
    """A connector that can make a link opening a chat with us that carries ``payload``."""

    async def deep_link(self, payload: str) -> str: ...


class LinkUnavailable(Exception):
    """No link can be made for that channel (not enabled, or its account is unknown)."""


class LinkOffer(BaseModel):
    channel: str
    url: str
    expires_at: datetime


class Identity:
    """Stateless: build one wherever a store and the outbox are at hand."""

    def __init__(self, store: Store, outbox: Outbox) -> None:
        self.store = store
        self.outbox = outbox
        self.contacts = ContactStore(store)

    # ------------------------------------------------------------------ linking

    async def offer_link(
        self, contact_id: str, channel: str, conversation_id: str | None = None
    ) -> LinkOffer:
        """A single-use, expiring deep link that links its opener on ``channel`` to
        ``contact_id``."""
        connector = self.outbox.connectors.get(channel)
        if not isinstance(connector, DeepLinks):
            raise LinkUnavailable(f"{channel} is not enabled on this gateway")
        token, expires = await self.contacts.create_token(
            contact_id, channel, conversation_id=conversation_id)
        try:
            url = await connector.deep_link(token)
        except Exception as exc:
            log.warning("identity: no %s deep link: %s", channel, exc)
            raise LinkUnavailable(f"{channel} cannot make links right now") from exc
        return LinkOffer(channel=channel, url=url, expires_at=expires)

    async def redeem(self, message: InboundMessage) -> LinkState:
        """An inbound deep-link payload: link its sender if the token is good (once)."""
        assert message.deep_link is not None
        identity_id = f"{message.channel}:{message.sender_external_id}"
        state, contact_id = await self.contacts.consume_token(
            message.deep_link, message.channel, identity_id)
        if contact_id is not None:
            await self.store.link_identity(
                message.channel, message.sender_external_id, contact_id, message.sender.name)
            log.info("identity: %s linked to contact %s", identity_id, contact_id)
        else:
            log.info("identity: link token refused for %s: %s", identity_id, state.value)
        return state

    async def answer_link(self, conversation: Conversation, item: Activity) -> None:
        """Tell the sender of a link payload whether it worked (once per message)."""
        assert item.deep_link is not None
        state = await self.contacts.token_state(
            item.deep_link, item.channel, f"{item.channel}:{item.sender.id}")
        draft = OutboundDraft(sender=SYSTEM, text=LINK_ANSWERS[state], reply_to_id=item.id,
                              dedupe_key=f"{item.id}:link", channel=item.channel)
        await self.outbox.enqueue(conversation, [draft])

    # ----------------------------------------------------------- channel switch

    async def continue_elsewhere(
        self, channel: str, thread_key: str, contact_id: str, sender_external_id: str
    ) -> Conversation | None:
        return await self.contacts.conversation_to_continue(
            channel, thread_key, contact_id, sender_external_id)

    async def note_inbound(
        self, conversation: Conversation, channel: str, thread_key: str
    ) -> Conversation:
        return await self.contacts.note_inbound(conversation, channel, thread_key)

    async def route(self, conversation: Conversation, channel: str | None) -> ConversationRef:
        return await self.contacts.route(conversation, channel)

    # ------------------------------------------------------------------- merges

    async def merge(self, survivor: str, merged: str, by: str | None = None) -> Merge:
        return await self.contacts.merge(survivor, merged, by)

    async def undo_merge(self, merge_id: str, by: str | None = None) -> Merge:
        return await self.contacts.undo(merge_id, by)
