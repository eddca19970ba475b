"""Any channel to any channel: one customer walks one open conversation across the web
chat, Telegram, Slack and email, through every ordered pair of the four (12 hops), each
time by the link or code the channel they are on offers:

- web chat: the ``link`` frame (a Telegram deep link, a Slack code, a mailto);
- Telegram and Slack: ``/continue`` / ``continue elsewhere``, answered with link buttons;
- email: the links in the footer of our mails.

Each hop is redeemed on the new channel (a web chat ``hello`` with the link, ``/start``,
a code sent in a Slack DM, a new mail whose subject carries the token), the customer
writes there, and the agent's reply goes there. One gateway on a real port with all four
channels: the fake Bot API (aiogram), the fake Slack Web API (slack_sdk, signed events),
mail out through a real SMTP server (aiosmtpd) and in by the connector's own road.
"""

from __future__ import annotations

import html
import itertools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from gateway.identity import LINK_ANSWERS
from gateway.model import Conversation, OwnerState
from gateway.settings import Settings
from gateway.store.contacts import ContactStore, LinkState
from gateway.store.mongo import from_doc
from tests import test_email_link, test_identity
from tests.conftest import Gateway, Visitor, free_port
from tests.fakes.slack_api import BOT_TOKEN, SIGNING_SECRET, FakeSlack, SlackSender, dm
from tests.fakes.telegram_api import FakeTelegram, People
from tests.mailservers import OURS, POLLING, MailRig, SmtpSink, mail, rig_for
from tests.mailservers import text_part as mail_text
from tests.test_identity import SECRET, TOKEN, TelegramUser, call

CONNECTED = LINK_ANSWERS[LinkState.LINKED]
PAGE = "https://shop.example/help"
ADA_MAIL = "ada@customer.test"
ADA_SLACK = "U0000ADA"
ADA_DM = "D0000ADA"
TITLES = {"webchat": "Continue in the web chat", "telegram": "Continue on Telegram",
          "email": "Continue by email", "slack": "Continue in Slack"}
TOKEN_RE = re.compile(r"link_[A-Za-z0-9_-]{20,59}")
# the fake Bot API of tests/test_identity.py, the SMTP sink of tests/test_email_link.py
telegram, sink = test_identity.telegram, test_email_link.sink
# every ordered pair of the four channels once (an Eulerian circuit of the complete
# directed graph on them): W>T>W>S>W>E>T>S>T>E>S>E>W
JOURNEY = ["webchat", "telegram", "webchat", "slack", "webchat", "email", "telegram",
           "slack", "telegram", "email", "slack", "email", "webchat"]


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    fake.add_user(ADA_SLACK, "Ada Lovelace", display_name="ada")
    yield fake
    await fake.close()


@pytest.fixture
async def rig(settings: Settings, telegram: FakeTelegram, slack: FakeSlack,
              sink: SmtpSink) -> AsyncIterator[MailRig]:
    every = settings.model_copy(update={
        "telegram_token": TOKEN, "telegram_mode": "webhook",
        "telegram_webhook_secret": SECRET,
        "telegram_webhook_url": "https://gw.example/webhooks/telegram",
        "telegram_api_url": telegram.url,
        "slack_bot_token": BOT_TOKEN, "slack_signing_secret": SIGNING_SECRET,
        "slack_api_url": slack.api_url, "webchat_page_url": PAGE})
    async with rig_for(every, None, sink, POLLING, listen=free_port()) as r:
        await r.start()
        yield r


@dataclass
class Customer:
    """Ada, on whichever channel she is now; ``offers`` reads the links that channel
    offers her, ``arrive`` redeems one on another channel."""

    rig: MailRig
    telegram: FakeTelegram
    slack: FakeSlack
    people: People
    alice: dict[str, str] = field(default_factory=dict)
    visitor: Visitor | None = None
    visitors: list[Visitor] = field(default_factory=list)
    mails_seen: int = 0
    last_mail_id: str | None = None

    @property
    def gw(self) -> Gateway:
        return self.rig.gw

    def ann(self) -> TelegramUser:
        return TelegramUser(self.gw, self.telegram, self.people, 7001, "Ada")

    @property
    def slack_in(self) -> SlackSender:
        return SlackSender(self.gw.http, self.gw.url)

    # -------------------------------------------------------------- offers

    async def offers(self, here: str, target: str) -> str:
        """The link token ``here`` offers for ``target`` (checked to be the right kind)."""
        if here == "webchat":
            assert self.visitor is not None and self.visitor.ws is not None
            await self.visitor.ws.send_json({"type": "link", "channel": target})
            frame = await self.visitor.next_frame("link")
            assert frame["channel"] == target
            return token_of(target, frame["url"], frame.get("code"))
        if here == "telegram":
            ann = self.ann()
            asked = len(ann.texts())
            await ann.say("/continue")
            await ann.until("You can continue this conversation", count=1 + sum(
                t.startswith("You can continue") for t in ann.texts()[:asked]))
            [*_, sent] = [c for c in self.telegram.of("sendMessage")
                          if c.params["chat_id"] == ann.id]
            urls = {b["text"]: b["url"] for row in sent.params["reply_markup"][
                "inline_keyboard"] for b in row}
            # link buttons for what Telegram can open; the mailto only in the text
            assert set(urls) == {TITLES["webchat"], TITLES["slack"]}
            return token_of(target, line_of(sent.params["text"], target), None)
        if here == "slack":
            before = len(self.slack.posts(ADA_DM))
            await self.slack_dm("continue elsewhere")
            posts = await self.slack.until(
                lambda: len(p := self.slack.posts(ADA_DM)) > before and p[before:])
            [offer] = [p for p in posts if "You can continue" in html.unescape(p.text or "")]
            links = {b["text"]["text"]: b.get("url") for b in offer.buttons}
            assert set(links) == {TITLES["webchat"], TITLES["telegram"]}  # no mailto button
            assert all(u and u.startswith("https://") for u in links.values())
            assert "value" not in offer.buttons[0]  # a link: its press is no choice
            return token_of(target, line_of(html.unescape(offer.text or ""), target), None)
        assert here == "email"
        [*_, last] = await self.rig.sent(self.mails_seen)
        return token_of(target, line_of(mail_text(last), target), None)

    # ------------------------------------------------------------ arriving

    async def arrive(self, target: str, token: str, hop: int) -> None:
        """Redeem ``token`` on ``target``: Ada is told she is connected there."""
        if target == "webchat":
            visitor = Visitor(self.gw)
            self.visitors.append(visitor)
            assert visitor.ws is None
            visitor.ws = await self.gw.socket()
            await visitor.ws.send_json({"type": "hello", "token": None, "link": token})
            welcome = await visitor.next_frame("welcome")
            assert welcome["linked"] == {"state": "linked", "message": CONNECTED}
            assert welcome["new"] is True and welcome["conversation_id"] is not None
            visitor.token = welcome["token"]
            await visitor.next_frame("synced")
            # the whole conversation is here: what she said on the other channels too
            said = [i.get("text") for i in visitor.items]
            assert f"hop {hop - 1}" in said or hop == 1, said
            self.visitor = visitor
        elif target == "telegram":
            ann = self.ann()
            count = ann.texts().count(CONNECTED) + 1
            await ann.say(f"/start {token}")
            await ann.until(CONNECTED, count=count)
        elif target == "slack":
            before = self.connected_on_slack()
            await self.slack_dm(token)
            await self.slack.until(lambda: self.connected_on_slack() > before)
        else:
            subject = f"Continue my conversation [{token}]"
            sent = mail(ADA_MAIL, "Hi, it's me.", subject=subject, name="Ada")
            self.last_mail_id = str(sent["Message-ID"])
            await self.rig.connector.take_in(bytes(sent))
            self.mails_seen += 1
            [*_, answer] = await self.rig.sent(self.mails_seen)
            assert mail_text(answer).startswith(CONNECTED)
            assert answer["In-Reply-To"] == self.last_mail_id
            self.last_mail_id = str(answer["Message-ID"])

    def connected_on_slack(self) -> int:
        return sum(CONNECTED in html.unescape(p.text or "") for p in self.slack.posts(ADA_DM))

    async def slack_dm(self, text: str) -> None:
        status, _ = await self.slack_in.event(dm(ADA_SLACK, text, channel=ADA_DM))
        assert status == 200

    # ------------------------------------------------------ saying, hearing

    async def say(self, channel: str, text: str) -> None:
        if channel == "webchat":
            assert self.visitor is not None
            await self.visitor.say(text)
        elif channel == "telegram":
            await self.ann().say(text)
        elif channel == "slack":
            await self.slack_dm(text)
        else:  # a reply in the mail thread of the switch
            await self.rig.connector.take_in(bytes(mail(
                ADA_MAIL, text, subject="Re: Continue my conversation", name="Ada",
                in_reply_to=self.last_mail_id)))
        await self.gw.settle()

    async def hears(self, channel: str, text: str) -> None:
        """Alice's reply reached Ada on ``channel``."""
        if channel == "webchat":
            assert self.visitor is not None
            await self.visitor.until(lambda i: i.get("text") == text)
        elif channel == "telegram":
            await self.ann().until(f"Alice: {text}")
        elif channel == "slack":
            await self.slack.until(lambda: any(text in html.unescape(p.text or "")
                                               for p in self.slack.posts(ADA_DM)))
        else:
            self.mails_seen += 1
            [*_, reply] = await self.rig.sent(self.mails_seen)
            assert reply["To"].addresses[0].addr_spec == ADA_MAIL
            assert mail_text(reply).startswith(text)
            assert "Continue this conversation elsewhere:" in mail_text(reply)
            self.last_mail_id = str(reply["Message-ID"])


def line_of(text: str, target: str) -> str:
    [line] = [ln for ln in text.splitlines() if ln.startswith(TITLES[target] + ":")]
    return line


def token_of(target: str, url: str, code: str | None) -> str:
    """The link token in an offer, checked to be in the right place for ``target``."""
    if target == "telegram":
        found = re.search(r"https://t\.me/\S+", url)
        assert found is not None, url
        parsed = urlparse(found.group(0))
        [start] = parse_qs(parsed.query)["start"]
        return start
    if target == "webchat":
        found = re.search(r"https://\S+", url)
        assert found is not None, url
        parsed = urlparse(found.group(0))
        assert f"{parsed.scheme}://{parsed.netloc}{parsed.path}" == PAGE
        assert parsed.fragment.startswith("omnigate-link=link_")
        return parsed.fragment.removeprefix("omnigate-link=")
    if target == "email":
        found = re.search(r"mailto:\S+", url)
        assert found is not None, url
        parsed = urlparse(found.group(0))
        assert parsed.path == OURS
        [subject] = parse_qs(parsed.query)["subject"]
        token = TOKEN_RE.search(unquote(subject))
        assert token is not None, subject
        return token.group(0)
    assert target == "slack"
    assert "https://slack.com/app_redirect?" in url
    token = TOKEN_RE.search(code or url)
    assert token is not None, url
    return token.group(0)


def journey_from(start: str) -> list[str]:
    """The circuit, begun (and ended) on ``start``."""
    circuit = JOURNEY[:-1]
    at = circuit.index(start)
    return [*circuit[at:], *circuit[:at], start]


async def begin(ada: Customer, channel: str) -> Conversation:
    """Ada asks for a human on ``channel``; Alice claims the conversation."""
    gw = ada.gw
    if channel == "webchat":
        first = Visitor(gw)
        ada.visitors.append(first)
        ada.visitor = first
        await first.connect()
        await first.say("I want a human")
    elif channel == "email":
        sent = mail(ADA_MAIL, "I want a human", subject="Help please", name="Ada")
        await ada.rig.connector.take_in(bytes(sent))
        ada.mails_seen += 1
        [handoff] = await ada.rig.sent(1)  # the bot's answer: bringing in a human
        ada.last_mail_id = str(handoff["Message-ID"])
    else:
        await ada.say(channel, "I want a human")
    await gw.settle()
    [conversation] = [from_doc(Conversation, d) async for d in gw.store.conversations.find()]
    assert conversation.channel == channel
    _, ada.alice = await gw.agent("Alice")
    status, _ = await call(gw, "POST", f"/conversations/{conversation.id}/claim", ada.alice)
    assert status == 200
    return conversation


@pytest.mark.parametrize("start", ["webchat", "telegram", "slack", "email"])
async def test_one_conversation_through_every_ordered_pair_of_channels(
    rig: MailRig, telegram: FakeTelegram, slack: FakeSlack, start: str
) -> None:
    gw = rig.gw
    ada = Customer(rig, telegram, slack, People(telegram))
    journey = journey_from(start)
    try:
        conversation = await begin(ada, start)
        hops: list[tuple[str, str]] = []
        for hop, (here, there) in enumerate(itertools.pairwise(journey), 1):
            token = await ada.offers(here, there)
            await ada.arrive(there, token, hop)
            await ada.say(there, f"hop {hop}")
            status, reply = await call(
                gw, "POST", f"/conversations/{conversation.id}/messages", ada.alice,
                json={"text": f"answer {hop}"})
            assert status == 201 and reply["channel"] == there, (hop, here, there, reply)
            await ada.hears(there, f"answer {hop}")
            hops.append((here, there))
            await gw.settle()

        # every ordered pair once
        assert len(set(hops)) == 12 and all(a != b for a, b in hops)
        # still ONE conversation, the agent's, with every hop where it was said
        docs = [from_doc(Conversation, d) async for d in gw.store.conversations.find()]
        assert [c.id for c in docs] == [conversation.id]
        assert docs[0].owner is OwnerState.AGENT
        items, _ = await gw.store.history(conversation.id, limit=500)
        said = [(i.channel, i.text) for i in reversed(items)
                if i.text and i.text.startswith("hop ")]
        assert said == [(there, f"hop {n}") for n, there in enumerate(journey[1:], 1)]
        # one contact, known on every channel (a web chat visitor per arrival there)
        kinds = [d["channel"] async for d in gw.store.identities.find(
            {"contact_id": conversation.contact_id})]
        assert sorted(set(kinds)) == ["email", "slack", "telegram", "webchat"]
        assert kinds.count("webchat") == journey.count("webchat")
    finally:
        for visitor in ada.visitors:
            await visitor.close()


async def web_hello(gw: Gateway, link: str, token: str | None = None
                    ) -> tuple[Visitor, dict[str, Any]]:
    """A browser opening the chat page with ``#omnigate-link=<link>``."""
    visitor = Visitor(gw)
    visitor.ws = await gw.socket()
    await visitor.ws.send_json({"type": "hello", "token": token, "link": link})
    welcome = await visitor.next_frame("welcome")
    visitor.token = welcome["token"]
    await visitor.next_frame("synced")
    return visitor, welcome


async def test_web_chat_links_used_expired_unknown_and_coming_back(
    rig: MailRig, telegram: FakeTelegram, slack: FakeSlack
) -> None:
    gw = rig.gw
    ada = Customer(rig, telegram, slack, People(telegram))
    opened: list[Visitor] = []
    try:
        conversation = await begin(ada, "telegram")
        token = await ada.offers("telegram", "webchat")
        first, welcome = await web_hello(gw, token)
        opened.append(first)
        assert welcome["linked"]["state"] == "linked"
        assert welcome["conversation_id"] == conversation.id
        assert "I want a human" in [i.get("text") for i in first.items]  # the history

        # the same link in another browser: used, nothing bound; its chat is its own
        other, refused = await web_hello(gw, token)
        opened.append(other)
        assert refused["linked"] == {"state": "used",
                                     "message": LINK_ANSWERS[LinkState.USED]}
        assert refused["conversation_id"] is None and other.items == []
        await other.say("who am I?")
        await gw.settle()
        mine = await gw.store.find_conversation("webchat", refused["visitor_id"])
        assert mine is not None and mine.id != conversation.id
        assert mine.contact_id != conversation.contact_id

        # unknown and expired links: refused, said why
        _, unknown = await web_hello(gw, "link_" + "x" * 32)
        assert unknown["linked"]["state"] == "unknown"
        expired, _ = await ContactStore(gw.store).create_token(
            conversation.contact_id, "webchat", conversation_id=conversation.id,
            ttl=timedelta(seconds=-1))
        _, late = await web_hello(gw, expired)
        assert late["linked"] == {"state": "expired",
                                  "message": LINK_ANSWERS[LinkState.EXPIRED]}
        assert late["conversation_id"] is None

        # the first browser comes back (a reload): the same visitor, the same chat
        await first.close()
        again = Visitor(gw)
        opened.append(again)
        again.token = first.token
        back = await again.connect()
        assert back["welcome"]["visitor_id"] == welcome["visitor_id"]
        assert back["welcome"]["conversation_id"] == conversation.id
        await again.say("back again")
        await gw.settle()
        status, reply = await call(gw, "POST", f"/conversations/{conversation.id}/messages",
                                   ada.alice, json={"text": "Welcome back"})
        assert status == 201 and reply["channel"] == "webchat"
        assert reply["conversation_ref"] == {"channel": "webchat",
                                             "thread_key": welcome["visitor_id"]}
        await again.until(lambda i: i.get("text") == "Welcome back")

        # ... and with a new link to the chat it has already: still that visitor
        fresh = await ada.offers("telegram", "webchat")
        same, kept = await web_hello(gw, fresh, token=again.token)
        opened.append(same)
        assert kept["new"] is False and kept["visitor_id"] == welcome["visitor_id"]
        assert kept["linked"]["state"] == "linked"
    finally:
        for visitor in (*opened, *ada.visitors):
            await visitor.close()


async def test_a_mailed_link_never_takes_an_address_from_another_customer(
    rig: MailRig, telegram: FakeTelegram, slack: FakeSlack
) -> None:
    gw = rig.gw
    bob = "bob@customer.test"
    await rig.connector.take_in(bytes(mail(bob, "Bob's own question", name="Bob")))
    await gw.settle()
    bobs = await gw.store.identities.find_one({"_id": f"email:{bob}"})
    assert bobs is not None
    ada = Customer(rig, telegram, slack, People(telegram))
    ada.mails_seen = len(await rig.sent(1))  # the bot's answer to Bob
    conversation = await begin_on_telegram_quietly(ada)
    token = await ada.offers("telegram", "email")
    # a mail with the token, but from Bob's address (forged, or Ada typed his)
    await rig.connector.take_in(bytes(mail(
        bob, "hi", subject=f"Continue my conversation [{token}]", name="Ada?")))
    await gw.settle()
    still = await gw.store.identities.find_one({"_id": f"email:{bob}"})
    assert still is not None and still["contact_id"] == bobs["contact_id"]
    now = await gw.store.get_conversation(conversation.id)
    assert now is not None and "email" not in now.routes
    answers = [mail_text(m) for m in await rig.sent(ada.mails_seen + 1)]
    assert any(a.startswith(LINK_ANSWERS[LinkState.TAKEN]) for a in answers)


async def begin_on_telegram_quietly(ada: Customer) -> Conversation:
    """Ada writes on Telegram (the bot answers; no agent)."""
    await ada.say("telegram", "hello")
    docs = [from_doc(Conversation, d) async for d in ada.gw.store.conversations.find(
        {"channel": "telegram"})]
    [conversation] = docs
    return conversation


async def test_continue_with_no_other_channel_says_so(gateway: Gateway,
                                                      visitor: Visitor) -> None:
    await visitor.connect()
    await visitor.say("/continue")
    answer = await visitor.until(lambda i: i.get("role") == "system")
    assert answer["text"] == ("Sorry, this conversation cannot be continued on another "
                              "channel here.")
    assert answer["buttons"] == []


async def test_no_links_are_offered_in_a_group(
    rig: MailRig, telegram: FakeTelegram, slack: FakeSlack
) -> None:
    """Anyone in a group could take them: /continue there says to ask privately."""
    gw = rig.gw
    people = People(telegram)
    ann = TelegramUser(gw, telegram, people, 7011, "Ann")
    group = people.group(-100777)
    await ann.post(people.message(ann.user, group, text="/continue@omnigate_test_bot"))
    await gw.settle()
    [answer] = [c.params["text"] for c in telegram.of("sendMessage")
                if c.params["chat_id"] == -100777]
    assert answer.startswith("To continue on another channel, ask in a private chat")
    assert "link_" not in answer
    assert await gw.store.db["link_tokens"].count_documents({}) == 0
    # in a private chat the same person gets them
    await ann.say("/continue")
    await ann.until("You can continue this conversation")
    assert await gw.store.db["link_tokens"].count_documents({}) == 3
