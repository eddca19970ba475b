"""A visitor who comes to the web chat by a link from another channel.

Telegram, Slack and our mails offer "continue in the web chat": the page URL with a link
token in its fragment (``#omnigate-link=link_...``: a fragment never reaches a server's
logs). The widget sends it in its ``hello``; here it is redeemed once (gateway/identity.py)
for a visitor, whose web chat identity then joins the token's contact and whose chat *is*
the conversation the link was asked for in (``Identity.conversation_id``: the pipeline and
the sockets read the visitor's conversation from it, connectors/webchat/sockets.py).

The visitor is a new one, unless the hello's own visitor already has that conversation
(the same browser coming back): a browser that had another chat leaves it for this one.
"""

from __future__ import annotations

import logging
from typing import Any

from connectors.webchat.frames import ErrorCode, error
from connectors.webchat.sockets import CHANNEL, VisitorSocket, conversation_of
from connectors.webchat.tokens import new_visitor_id
from gateway.identity import LINK_ANSWERS, Identity, LinkUnavailable
from gateway.outbox import Outbox
from gateway.store import Store
from gateway.store.contacts import LinkState, is_link_payload

log = logging.getLogger(__name__)


async def keeps_visitor(store: Store, identity: Identity, visitor_id: str | None,
                        token: str) -> bool:
    """The hello's visitor already has the conversation the token continues."""
    if visitor_id is None:
        return False
    wanted = await identity.contacts.token_conversation(token)
    return wanted is not None and wanted == await conversation_of(store, visitor_id)


async def redeem(store: Store, outbox: Outbox, visitor_id: str, token: str) -> LinkState:
    """Redeem ``token`` for the visitor: link them, and bind their chat to its
    conversation (while it is open)."""
    if not is_link_payload(token):
        return LinkState.UNKNOWN
    state, continued = await Identity(store, outbox).redeem_token(token, CHANNEL, visitor_id)
    if continued is not None and continued != await conversation_of(store, visitor_id):
        await store.identities.update_one({"_id": f"{CHANNEL}:{visitor_id}"},
                                          {"$set": {"conversation_id": continued}})
    if state is LinkState.LINKED:
        log.info("webchat: visitor %s continues %s", visitor_id, continued)
    return state


def answer(state: LinkState) -> dict[str, str]:
    """What the welcome says about the link (the widget shows ``message``)."""
    return {"state": state.value, "message": LINK_ANSWERS[state]}


async def arrive(store: Store, outbox: Outbox, known: str | None, link: str
                 ) -> tuple[str, dict[str, str]]:
    """A hello with a link token: the visitor that goes on (the hello's own if it has
    that conversation already, else a new one) and what the welcome tells them."""
    keep = await keeps_visitor(store, Identity(store, outbox), known, link)
    visitor_id = known if keep and known is not None else new_visitor_id()
    return visitor_id, answer(await redeem(store, outbox, visitor_id, link))


async def offer(store: Store, outbox: Outbox, socket: VisitorSocket, channel: str
                ) -> dict[str, Any]:
    """The ``link`` frame: a link (and for Slack a code) that continues the visitor's
    chat on ``channel``, or a ``link_unavailable`` error."""
    identity = await store.resolve_identity(CHANNEL, socket.visitor_id)
    try:
        found = await Identity(store, outbox).offer_link(
            identity.contact_id, channel, await socket.find_conversation())
    except LinkUnavailable as exc:
        return error(ErrorCode.LINK_UNAVAILABLE, str(exc))
    return {"type": "link", "channel": found.channel, "url": found.url,
            "expires_at": found.expires_at.isoformat(),
            **({} if found.code is None else {"code": found.code})}
