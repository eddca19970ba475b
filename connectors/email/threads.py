"""Which conversation a mail belongs to, and which button a reply chose.

A conversation's ``thread_key`` is a short token made from its first mail's id; our replies
carry it in the subject (``[#token]``). An inbound mail joins a conversation found by its
In-Reply-To, then by any id in References (newest first), then by the token in its
subject or in a plus address (``support+token@...``) — and only if its sender is one of
that conversation's contact's email identities. Otherwise it opens a new conversation.
Ids are looked up among the Message-IDs we sent (``sent:`` state, written before each
send) and the customers' own stored mails (inbound external ids).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connectors.email.parse import ParsedMail
from gateway.model import Button
from gateway.store import Store

log = logging.getLogger(__name__)

CHANNEL = "email"
TOKEN_RE = re.compile(r"\[#([a-z2-7]{12})\]")
_CHOICE_NUMBER = re.compile(r"^\(?(\d{1,2})[.):]?$")


def token_for(external_id: str) -> str:
    """The thread key (and subject token) of a conversation opened by this mail."""
    digest = hashlib.sha256(external_id.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest).decode("ascii")[:12].lower()


def id_key(message_id: str) -> str:
    return "sent:" + hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def thread_state_key(thread_key: str) -> str:
    return f"thread:{thread_key}"


@dataclass(frozen=True, slots=True)
class Thread:
    thread_key: str
    joined: bool  # an existing conversation (False: this mail opens a new one)
    via: str  # how it was found: in-reply-to, references, token, new
    buttons: list[Button]  # the buttons of the mail this one answers, if any


def _buttons(state: Mapping[str, Any] | None) -> list[Button]:
    if not state:
        return []
    found = []
    for raw in state.get("buttons") or []:
        try:
            found.append(Button.model_validate(raw))
        except ValueError:
            continue
    return found


def tokens_in(parsed: ParsedMail, plus_domain: tuple[str, str]) -> list[str]:
    """Thread tokens in the subject, then in plus addresses of our mailbox."""
    found = TOKEN_RE.findall(parsed.subject.lower())
    local, domain = plus_domain
    for address in parsed.recipients:
        name, _, host = address.partition("@")
        base, plus, tag = name.partition("+")
        if plus and host == domain and base == local and re.fullmatch(r"[a-z2-7]{12}", tag):
            found.append(tag)
    return list(dict.fromkeys(found))


class Threads:
    def __init__(self, store: Store, own_address: str) -> None:
        self.store = store
        local, _, domain = own_address.lower().partition("@")
        self.own = (local, domain)

    async def _thread_of_id(self, message_id: str
                            ) -> tuple[str | None, list[Button], str | None]:
        """(thread key, its buttons, its conversation) of a mail we know by its id."""
        sent = await self.store.get_state(CHANNEL, id_key(message_id))
        if sent is not None and sent.get("thread_key"):
            conversation_id = sent.get("conversation_id")
            return str(sent["thread_key"]), _buttons(sent), (
                str(conversation_id) if conversation_id else None)
        item = await self.store.find_by_external_id(CHANNEL, message_id)
        if item is not None:
            return item.conversation_ref.thread_key, [], item.conversation_id
        return None, [], None

    async def _sender_belongs(self, thread_key: str, sender: str,
                              conversation_id: str | None = None) -> bool:
        conversation = await self.store.find_conversation(CHANNEL, thread_key)
        if conversation is None and conversation_id is not None:
            # a thread of a conversation that began on another channel (channel switch)
            conversation = await self.store.get_conversation(conversation_id)
            if conversation is not None and conversation.routes.get(CHANNEL) != thread_key:
                conversation = None
        if conversation is None:
            return False
        contact = await self.store.get_contact(conversation.contact_id)
        if contact is None:
            return False
        return any(i.channel == CHANNEL and i.external_id == sender for i in contact.identities)

    async def resolve(self, parsed: ParsedMail) -> Thread:
        candidates: list[tuple[str, str]] = [(i, "in-reply-to") for i in parsed.in_reply_to]
        candidates += [(i, "references") for i in reversed(parsed.references)]
        refused: set[str] = set()
        for message_id, via in candidates:
            thread_key, buttons, conversation_id = await self._thread_of_id(message_id)
            if thread_key is None or thread_key in refused:
                continue
            if await self._sender_belongs(thread_key, parsed.sender, conversation_id):
                buttons = buttons or await self.latest_buttons(thread_key)
                return Thread(thread_key, True, via, buttons)
            refused.add(thread_key)
            log.info("email: %s names a mail of conversation %s, but its sender %s is not "
                     "that conversation's contact: not joined", parsed.external_id,
                     thread_key, parsed.sender)
        for token in tokens_in(parsed, self.own):
            if token in refused:
                continue
            if await self._sender_belongs(token, parsed.sender):
                return Thread(token, True, "token", await self.latest_buttons(token))
            refused.add(token)
        return Thread(token_for(parsed.external_id), False, "new", [])

    async def latest_buttons(self, thread_key: str) -> list[Button]:
        return _buttons(await self.store.get_state(CHANNEL, thread_state_key(thread_key)))


def choice(text: str | None, buttons: list[Button]) -> str | None:
    """The value of the button a reply chose: its number or its label, on the first line."""
    if not text or not buttons:
        return None
    first = next((line.strip() for line in text.split("\n") if line.strip()), "")
    first = first.rstrip(".!").strip()
    if (match := _CHOICE_NUMBER.match(first)) is not None:
        number = int(match.group(1))
        return buttons[number - 1].value if 1 <= number <= len(buttons) else None
    folded = first.casefold()
    for button in buttons:
        if button.title.strip().casefold() == folded:
            return button.value
    return None
