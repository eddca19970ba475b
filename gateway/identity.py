"""One customer, every channel: verified linking, merges, and the channel switch.

Linking is verified, never guessed from a name. A customer in the web chat asks for a
"continue on Telegram" link: a single-use token (15 minutes) in a Telegram deep link
(``https://t.me/<bot>?start=link_...``). Whoever opens it sends ``/start <token>`` from
their Telegram account; the pipeline redeems the token *before* it looks for the
conversation, so that very message already belongs to the web chat's contact and
continues its open conversation. Expired, used and unknown tokens are refused politely;
nothing else ever links two accounts.

Or the web chat visitor gives an email address: a 6-digit code is mailed there
(``request_email_code``, through the email connector's SMTP sender; store side in
store/email_link.py) and sent back (``confirm_email_code``): on the right code only, the
address becomes an identity of the visitor's contact (``ContactStore.claim_identity``),
unless another customer with a history holds it — then it is refused ("an agent can
merge"), never merged silently. A new mail from that address to our address alone then
continues the visitor's open conversation (the channel switch below).

Agents can also merge two contacts and undo a merge (``ContactStore``, recorded exactly).

The channel switch: ``Pipeline.open_conversation`` asks ``continue_elsewhere`` whether a
message on a one-to-one thread continues the contact's open conversation on another
channel; ``note_inbound`` remembers where the customer wrote last; the outbox sends each
reply there (``route``), or on the channel an agent chose. Every item keeps its own
channel, so the history shows where each message came from.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from gateway.model import (
    Activity,
    Button,
    Conversation,
    ConversationRef,
    InboundMessage,
    LinkOffer,
    OutboundDraft,
    Party,
    Role,
)
from gateway.outbox import Outbox
from gateway.store import Store
from gateway.store.contacts import OPEN, ContactStore, LinkState, Merge, is_link_payload
from gateway.store.email_link import CODE_TTL, CodeState, EmailCodes, RateLimited
from gateway.timeline import add_source

log = logging.getLogger(__name__)

SYSTEM = Party(role=Role.SYSTEM, name="Omnigate")
AGAIN = "Ask for a new one where you got it (or write /continue on the channel you came from)."
LINK_ANSWERS = {
    LinkState.LINKED: "You're connected: this chat now continues your conversation. "
    "Just write here.",
    LinkState.EXPIRED: "Sorry, this link has expired. " + AGAIN,
    LinkState.USED: "Sorry, this link was already used. " + AGAIN,
    LinkState.UNKNOWN: "Sorry, this link is not valid. " + AGAIN,
    LinkState.TAKEN: "This account is already linked to another customer account. "
    "An agent can merge the two.",
}
# The customer asks to continue elsewhere: answered with a link per other channel.
CONTINUE_COMMANDS = frozenset({"/continue", "continue elsewhere"})
# Offers in our mails stay valid this long (a mail is read later than a chat).
MAIL_OFFER_TTL = timedelta(days=7)
# Channels whose sender is not proven by the platform (a mail's From can be forged): a
# link redeemed there never takes the account from another customer with a history.
UNPROVEN_SENDERS = frozenset({"email"})

EMAIL = "email"


class EmailLink(StrEnum):
    """How a confirmed (or refused) email code ended."""

    LINKED = "linked"
    ALREADY_LINKED = "already_linked"  # the address belongs to another customer
    WRONG = CodeState.WRONG.value
    EXPIRED = CodeState.EXPIRED.value
    TOO_MANY = CodeState.TOO_MANY.value
    NONE = CodeState.NONE.value


EMAIL_ANSWERS = {
    EmailLink.LINKED: "Your email address {address} is verified: mail from it now reaches "
    "us as you, and continues this conversation.",
    EmailLink.ALREADY_LINKED: "This email address is already linked to another customer "
    "account. An agent can merge the two.",
    EmailLink.WRONG: "That code is not right. {left} tries left.",
    EmailLink.EXPIRED: "This code has expired. Ask for a new one.",
    EmailLink.TOO_MANY: "Too many wrong tries. Ask for a new code.",
    EmailLink.NONE: "No code is waiting for confirmation. Ask for a new one.",
}

__all__ = ["CodeMailer", "DeepLinks", "EmailLink", "EmailLinkResult", "Identity",
           "InvalidAddress", "LinkOffer", "LinkUnavailable", "RateLimited",
           "is_continue_request", "is_link_payload"]


@runtime_checkable
class DeepLinks(Protocol):
    """A connector that can make a link opening a chat with us that carries ``payload``."""

    async def deep_link(self, payload: str) -> str: ...


def is_continue_request(text: str | None) -> bool:
    """The customer asks for links that continue this conversation elsewhere."""
    return text is not None and " ".join(text.lower().split()) in CONTINUE_COMMANDS


class LinkUnavailable(Exception):
    """No link can be made for that channel (not enabled, or its account is unknown)."""


@runtime_checkable
class CodeMailer(Protocol):
    """A connector that can mail a verification code (the email connector)."""

    def verifiable(self, address: str) -> str | None: ...

    async def send_code(self, address: str, code: str, minutes: int) -> None: ...


class InvalidAddress(ValueError):
    """Not an email address a code can be sent to."""


class EmailLinkResult(BaseModel):
    state: EmailLink
    address: str | None = None
    attempts_left: int = 0
    message: str


class Identity:
    """Stateless: build one wherever a store and the outbox are at hand."""

    def __init__(self, store: Store, outbox: Outbox) -> None:
        self.store = store
        self.outbox = outbox
        self.contacts = ContactStore(store)

    # ------------------------------------------------------------------ linking

    async def offer_link(
        self, contact_id: str, channel: str, conversation_id: str | None = None,
        *, ttl: timedelta | None = None,
    ) -> LinkOffer:
        """A single-use, expiring link that links its opener on ``channel`` to
        ``contact_id`` (and continues ``conversation_id`` there)."""
        connector = self.outbox.connectors.get(channel)
        if not isinstance(connector, DeepLinks):
            raise LinkUnavailable(f"{channel} is not enabled on this gateway")
        extra = {} if ttl is None else {"ttl": ttl}
        token, expires = await self.contacts.create_token(
            contact_id, channel, conversation_id=conversation_id, **extra)
        try:
            url = await connector.deep_link(token)
        except Exception as exc:
            log.warning("identity: no %s deep link: %s", channel, exc)
            raise LinkUnavailable(f"{channel} cannot make links right now") from exc
        code = token if connector.link_by_code else None
        return LinkOffer(channel=channel, url=url, expires_at=expires, code=code)

    async def offers(
        self, conversation: Conversation, here: str, *, ttl: timedelta | None = None
    ) -> list[LinkOffer]:
        """A link for each other channel this gateway can continue ``conversation`` on
        (the ones that cannot make one right now are left out)."""
        found: list[LinkOffer] = []
        for channel in sorted(self.outbox.connectors):
            connector = self.outbox.connectors[channel]
            if channel == here or not isinstance(connector, DeepLinks) or (
                    not connector.links_enabled):
                continue
            try:
                found.append(await self.offer_link(
                    conversation.contact_id, channel, conversation.id, ttl=ttl))
            except LinkUnavailable as exc:
                log.info("identity: no %s offer for %s: %s", channel, conversation.id, exc)
        return found

    async def mail_offers(self, conversation: Conversation) -> list[LinkOffer]:
        """The links a mail of ours carries (ConnectorContext.offers)."""
        return await self.offers(conversation, EMAIL, ttl=MAIL_OFFER_TTL)

    async def answer_continue(self, conversation: Conversation, item: Activity) -> None:
        """The customer asked to continue elsewhere: one message with a link (a button
        where the channel shows one) for every other channel."""
        personal = item.conversation_ref.thread_key == item.sender.id or (
            item.channel_data.get("one_to_one") is True)
        offers = await self.offers(conversation, item.channel) if personal else []
        if not personal:  # a group chat, a Slack channel thread, a mail with others on it:
            # whoever else reads the thread could take the links
            text = ("To continue on another channel, ask in a private chat with us: "
                    "links are personal.")
        elif not offers:
            text = "Sorry, this conversation cannot be continued on another channel here."
        else:
            text = "You can continue this conversation on another channel:\n" + "\n".join(
                o.line() for o in offers)
        buttons = [Button(title=o.title, value=o.channel, url=o.url) for o in offers]
        draft = OutboundDraft(sender=SYSTEM, text=text, buttons=buttons, reply_to_id=item.id,
                              dedupe_key=f"{item.id}:continue", channel=item.channel)
        await self.outbox.enqueue(conversation, [draft])

    async def redeem(self, message: InboundMessage) -> str | None:
        """An inbound deep-link payload: link its sender if the token is good (once).
        Returns the open conversation it continues (the one it was asked for in), if any."""
        assert message.deep_link is not None
        _, continued = await self.redeem_token(
            message.deep_link, message.channel, message.sender_external_id,
            message.sender.name)
        return continued

    async def redeem_token(self, token: str, channel: str, external_id: str,
                           name: str | None = None) -> tuple[LinkState, str | None]:
        """Redeem ``token`` for (channel, external id): (its state, the open conversation
        it continues, if it linked). The web chat's hello uses it too."""
        identity_id = f"{channel}:{external_id}"
        state, contact_id = await self.contacts.consume_token(token, channel, identity_id)
        if contact_id is None:
            log.info("identity: link token refused for %s: %s", identity_id, state.value)
            return state, None
        if not await self.link(channel, external_id, contact_id, name):
            return LinkState.TAKEN, None
        return state, await self.continued(token, contact_id)

    async def link(self, channel: str, external_id: str, contact_id: str,
                   name: str | None = None) -> bool:
        """A redeemed link joins (channel, external id) to ``contact_id``. On a channel
        whose senders are not proven, never moved from another customer with a history
        (False: TAKEN)."""
        identity_id = f"{channel}:{external_id}"
        if channel in UNPROVEN_SENDERS:
            linked = await self.contacts.claim_identity(channel, external_id, contact_id)
            log.info("identity: %s %s contact %s", identity_id,
                     "linked to" if linked else "not taken from another for", contact_id)
            return linked
        had = await self.store.identities.find_one({"_id": identity_id}, {"contact_id": 1})
        await self.store.link_identity(channel, external_id, contact_id, name)
        if had is not None and had["contact_id"] != contact_id:
            # its conversations moved here; their items keep the old contact's id
            await add_source(self.store, contact_id, str(had["contact_id"]))
        log.info("identity: %s linked to contact %s", identity_id, contact_id)
        return True

    async def continued(self, token: str, contact_id: str) -> str | None:
        """The conversation a redeemed token continues: the one it was asked for in, if
        it is the contact's and still open."""
        conversation_id = await self.contacts.token_conversation(token)
        if conversation_id is None:
            return None
        conversation = await self.store.get_conversation(conversation_id)
        if conversation is None or conversation.owner not in OPEN or (
                await self.contacts.survivor(conversation.contact_id) != contact_id):
            return None
        return conversation.id

    async def answer_link(self, conversation: Conversation, item: Activity) -> None:
        """Tell the sender of a link payload whether it worked (once per message)."""
        assert item.deep_link is not None
        identity_id = f"{item.channel}:{item.sender.id}"
        state = await self.contacts.token_state(item.deep_link, item.channel, identity_id)
        if state is LinkState.LINKED and item.channel in UNPROVEN_SENDERS:
            owner = await self.store.identities.find_one({"_id": identity_id},
                                                         {"contact_id": 1})
            wanted = await self.contacts.token_contact(item.deep_link)
            if owner is None or wanted is None or owner["contact_id"] != wanted:
                state = LinkState.TAKEN  # redeemed, but the account stayed where it was
        draft = OutboundDraft(sender=SYSTEM, text=LINK_ANSWERS[state], reply_to_id=item.id,
                              dedupe_key=f"{item.id}:link", channel=item.channel)
        await self.outbox.enqueue(conversation, [draft])

    # ------------------------------------------------------------- email codes

    def _mailer(self) -> CodeMailer:
        mailer = self.outbox.connectors.get(EMAIL)
        if not isinstance(mailer, CodeMailer):
            raise LinkUnavailable("email is not configured on this gateway")
        return mailer

    async def request_email_code(
        self, requester: str, contact_id: str, address: str,
        conversation_id: str | None = None,
    ) -> tuple[str, datetime]:
        """Mail a one-time code to ``address`` for ``requester`` (a web chat visitor):
        (the normalised address, when the code expires). Raises InvalidAddress,
        RateLimited (nothing sent) or LinkUnavailable (email off, or the mail failed)."""
        mailer = self._mailer()
        found = mailer.verifiable(address)
        if found is None:
            raise InvalidAddress("that is not an email address we can send a code to")
        code, expires = await EmailCodes(self.store).issue(
            requester, contact_id, found, conversation_id)
        try:
            await mailer.send_code(found, code, int(CODE_TTL.total_seconds() // 60))
        except Exception as exc:  # DeliveryError: the SMTP server refused or is down
            log.warning("identity: verification mail to %s failed: %s", found, exc)
            raise LinkUnavailable("the code could not be mailed; try again later") from exc
        log.info("identity: verification code mailed to %s for %s", found, requester)
        return found, expires

    async def confirm_email_code(self, requester: str, code: str) -> EmailLinkResult:
        """The code sent back: link the address to the requester's contact if it is the
        right one (once). Nothing is linked on anything else."""
        state, doc, left = await EmailCodes(self.store).check(requester, code)
        address = str(doc["address"]) if doc is not None else None
        if state is not CodeState.RIGHT or doc is None or address is None:
            result = EmailLink(state.value)
        else:
            contact_id = await self.contacts.survivor(str(doc["contact_id"]))
            linked = await self.contacts.claim_identity(EMAIL, address, contact_id)
            result = EmailLink.LINKED if linked else EmailLink.ALREADY_LINKED
            log.info("identity: %s for %s: %s", address, contact_id, result.value)
        fields: dict[str, Any] = {"address": address, "left": left}
        return EmailLinkResult(state=result, address=address, attempts_left=left,
                               message=EMAIL_ANSWERS[result].format(**fields))

    # ----------------------------------------------------------- channel switch

    async def continue_elsewhere(
        self, channel: str, thread_key: str, contact_id: str, sender_external_id: str,
        *, one_to_one: bool = False,
    ) -> Conversation | None:
        return await self.contacts.conversation_to_continue(
            channel, thread_key, contact_id, sender_external_id, one_to_one=one_to_one)

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
