"""One customer, every channel: verified linking (a Telegram deep link asked for in the web
chat), and agents merging two contacts and undoing the merge.

The whole gateway runs on a real port: web chat through ``Visitor`` (the socket protocol),
Telegram by webhook with the real aiogram client sending to a local fake Bot API
(tests/fakes/telegram_api.py), the agent API over real HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from gateway.identity import LINK_ANSWERS
from gateway.model import utcnow
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.contacts import ContactStore, LinkState, token_hash
from tests.conftest import Gateway, Visitor
from tests.fakes.telegram_api import FakeTelegram, People

TOKEN = "123456:TEST-token_abc"
SECRET = "s3cret_Secret-42"
HOOK = "/webhooks/telegram"
CONNECTED = LINK_ANSWERS[LinkState.LINKED]
GREETING = "Hi! I'm the Omnigate demo bot."


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(token=TOKEN)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def settings(settings: Settings, telegram: FakeTelegram) -> Settings:
    return settings.model_copy(update={
        "telegram_token": TOKEN, "telegram_mode": "webhook",
        "telegram_webhook_secret": SECRET,
        "telegram_webhook_url": "https://gw.example/webhooks/telegram",
        "telegram_api_url": telegram.url, "actions_package": "examples.actions"})


@pytest.fixture
def people(telegram: FakeTelegram) -> People:
    return People(telegram)


class TelegramUser:
    """Someone on Telegram: updates posted to the gateway's webhook, answers read from the
    fake Bot API."""

    def __init__(self, gateway: Gateway, telegram: FakeTelegram, people: People,
                 user_id: int, name: str = "Ann") -> None:
        self.gateway, self.telegram, self.people = gateway, telegram, people
        self.id = user_id
        self.user = people.user(user_id, name)

    def texts(self) -> list[str]:
        return self.telegram.texts(self.id)

    async def post(self, update: dict[str, Any]) -> None:
        status, body = await self.telegram.deliver(
            self.gateway.http, self.gateway.url + HOOK, update, SECRET)
        assert (status, body["outcome"]) == (200, "stored")

    async def say(self, text: str) -> None:
        await self.post(self.people.message(self.user, text=text))

    async def press(self, prefix: str, value: str) -> None:
        """Press the button ``value`` under the last message starting with ``prefix``."""
        [*_, sent] = [c for c in self.telegram.of("sendMessage")
                      if c.params["chat_id"] == self.id and c.params["text"].startswith(prefix)]
        await self.post(self.people.press(self.user, sent.result, value))

    async def until(self, prefix: str, count: int = 1) -> list[str]:
        """Wait until ``count`` messages starting with ``prefix`` reached the chat."""
        found: list[str] = await self.telegram.wait_for(
            lambda: len(m := [t for t in self.texts() if t.startswith(prefix)]) >= count and m)
        return found


async def ask_link(visitor: Visitor, channel: str = "telegram") -> dict[str, Any]:
    """The visitor asks the web chat for a link that continues on ``channel``."""
    assert visitor.ws is not None
    await visitor.ws.send_json({"type": "link", "channel": channel})
    while True:
        frame = await visitor.recv()
        if frame["type"] in ("link", "error"):
            return frame


def payload_of(link: dict[str, Any]) -> str:
    url = urlparse(link["url"])
    assert (url.scheme, url.netloc, url.path) == ("https", "t.me", "/omnigate_test_bot")
    [start] = parse_qs(url.query)["start"]
    return start


async def web_contact(gateway: Gateway, visitor: Visitor) -> str:
    await gateway.settle()
    identity = await gateway.store.identities.find_one({"channel": "webchat"})
    assert identity is not None
    return str(identity["contact_id"])


async def linked_on_telegram(gateway: Gateway, visitor: Visitor, ann: TelegramUser) -> str:
    """The visitor (connected, has written) links Ann's Telegram; returns the contact id."""
    link = await ask_link(visitor)
    assert link["type"] == "link", link
    await ann.say(f"/start {payload_of(link)}")
    await ann.until(CONNECTED)
    await gateway.settle()
    contact_id = await web_contact(gateway, visitor)
    identity = await gateway.store.identities.find_one({"_id": f"telegram:{ann.id}"})
    assert identity is not None and identity["contact_id"] == contact_id
    return contact_id


async def test_a_deep_link_from_the_web_chat_joins_telegram_to_the_same_contact(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    visitor_id = (await visitor.connect())["welcome"]["visitor_id"]
    await visitor.say("hello")
    await visitor.until(lambda i: (i.get("text") or "").startswith(GREETING))
    link = await ask_link(visitor)
    assert link["type"] == "link" and link["channel"] == "telegram"
    payload = payload_of(link)
    assert payload.startswith("link_") and len(payload) <= 64
    expires = datetime.fromisoformat(link["expires_at"])
    assert timedelta(minutes=14) < expires - utcnow() <= timedelta(minutes=15)
    # only the token's hash is stored
    stored = await gateway.store.db["link_tokens"].find_one({"_id": token_hash(payload)})
    assert stored is not None and stored["used_at"] is None
    assert await gateway.store.db["link_tokens"].count_documents({"_id": payload}) == 0

    ann = TelegramUser(gateway, telegram, people, 6001)
    await ann.say(f"/start {payload}")
    await ann.until(CONNECTED)
    await gateway.settle()
    contact_id = await web_contact(gateway, visitor)
    contact = await gateway.store.get_contact(contact_id)
    assert contact is not None
    assert sorted(i.id for i in contact.identities) == sorted(
        [f"telegram:{ann.id}", f"webchat:{visitor_id}"])
    # the /start went on in the web chat's conversation, keeping its own channel; the bot
    # did not answer it (only the confirmation went out)
    assert ann.texts() == [CONNECTED]
    assert await gateway.store.find_conversation("telegram", str(ann.id)) is None
    start = await gateway.store.messages.find_one({"channel": "telegram", "direction": "in"})
    assert start is not None and start["text"] == "/start" and start["deep_link"] == payload
    conversation = await gateway.store.find_conversation("webchat", visitor_id)
    assert conversation is not None and start["conversation_id"] == conversation.id

    # the same person opening the link again: still linked, nothing else changes
    await ann.say(f"/start {payload}")
    await ann.until(CONNECTED, count=2)
    # someone else with the same link: refused, and not linked
    bo = TelegramUser(gateway, telegram, people, 6002, "Bo")
    await bo.say(f"/start {payload}")
    await bo.until(LINK_ANSWERS[LinkState.USED])
    await gateway.settle()
    assert bo.texts() == [LINK_ANSWERS[LinkState.USED]]  # no greeting on top
    bo_identity = await gateway.store.identities.find_one({"_id": f"telegram:{bo.id}"})
    assert bo_identity is not None and bo_identity["contact_id"] != contact_id
    contact = await gateway.store.get_contact(contact_id)
    assert contact is not None and len(contact.identities) == 2
    # Bo's next message is an ordinary chat with the bot
    await bo.say("hello")
    await bo.until(GREETING)


async def test_expired_unknown_and_other_payloads_never_link(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    await visitor.connect()
    await visitor.say("hello")
    contact_id = await web_contact(gateway, visitor)
    link = await ask_link(visitor)
    payload = payload_of(link)
    # fifteen minutes later
    await gateway.store.db["link_tokens"].update_one(
        {"_id": token_hash(payload)}, {"$set": {"expires_at": utcnow() - timedelta(seconds=1)}})
    ann = TelegramUser(gateway, telegram, people, 6011)
    await ann.say(f"/start {payload}")
    await ann.until(LINK_ANSWERS[LinkState.EXPIRED])

    cy = TelegramUser(gateway, telegram, people, 6012, "Cy")
    await cy.say("/start link_" + "x" * 32)  # never issued
    await cy.until(LINK_ANSWERS[LinkState.UNKNOWN])
    # a deep link that is not a link token goes to the bot, and links nobody
    dee = TelegramUser(gateway, telegram, people, 6013, "Dee")
    await dee.say("/start spring-promo")
    await dee.until(GREETING)
    await gateway.settle()
    for user in (ann, cy, dee):
        identity = await gateway.store.identities.find_one({"_id": f"telegram:{user.id}"})
        assert identity is not None and identity["contact_id"] != contact_id
    assert ann.texts() == [LINK_ANSWERS[LinkState.EXPIRED]]
    contact = await gateway.store.get_contact(contact_id)
    assert contact is not None and [i.channel for i in contact.identities] == ["webchat"]
    # the expired token stays unused (it cannot be revived by trying)
    stored = await gateway.store.db["link_tokens"].find_one({"_id": token_hash(payload)})
    assert stored is not None and stored["used_at"] is None


async def test_a_link_for_a_channel_that_is_off_is_refused(
    gateway: Gateway, visitor: Visitor
) -> None:
    await visitor.connect()
    answer = await ask_link(visitor, "slack")
    assert (answer["type"], answer["code"]) == ("error", "link_unavailable")
    assert "slack is not enabled" in answer["message"]
    bad = await ask_link(visitor, "Tele gram!")
    assert (bad["type"], bad["code"]) == ("error", "bad_frame")
    assert await gateway.store.db["link_tokens"].count_documents({}) == 0


async def test_concurrent_redeems_of_one_token_have_one_winner(store: Store) -> None:
    contacts = ContactStore(store)
    web = await store.resolve_identity("webchat", "v_1")
    for _ in range(5):
        token, _ = await contacts.create_token(web.contact_id, "telegram")
        results = await asyncio.gather(
            *(contacts.consume_token(token, "telegram", f"telegram:{n}") for n in range(6)))
        states = [state for state, _ in results]
        assert states.count(LinkState.LINKED) == 1
        assert states.count(LinkState.USED) == 5
        [(_, contact)] = [r for r in results if r[0] is LinkState.LINKED]
        assert contact == web.contact_id
        # a token is for one channel only
        other, _ = await contacts.create_token(web.contact_id, "telegram")
        assert await contacts.consume_token(other, "slack", "slack:U1") == (
            LinkState.UNKNOWN, None)


# ------------------------------------------------------------------ merge and undo


async def call(gateway: Gateway, method: str, path: str, headers: dict[str, str],
               **kwargs: Any) -> tuple[int, Any]:
    async with gateway.http.request(method, gateway.url + "/api/v1" + path, headers=headers,
                                    **kwargs) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


async def snapshot(store: Store) -> dict[str, Any]:
    """Everything a merge may touch, as stored."""
    return {
        "contacts": {d["_id"]: {k: d.get(k) for k in ("profile", "merged_into", "merged_from",
                                                       "name")}
                     async for d in store.contacts.find()},
        "identities": {d["_id"]: d async for d in store.identities.find()},
        "conversations": {d["_id"]: (d["contact_id"], d["seq"])
                          async for d in store.conversations.find()},
    }


async def two_customers(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> tuple[str, str, TelegramUser]:
    """Ann on the web chat and Ann on Telegram, not linked: two contacts with a profile."""
    await visitor.connect()
    await visitor.say("hello")
    ann = TelegramUser(gateway, telegram, people, 6021)
    await ann.say("hello")
    await ann.until(GREETING)
    await gateway.settle()
    web = await web_contact(gateway, visitor)
    tg = await gateway.store.identities.find_one({"_id": f"telegram:{ann.id}"})
    assert tg is not None and tg["contact_id"] != web
    old, new = utcnow() - timedelta(days=3), utcnow() - timedelta(days=1)
    await gateway.store.update_profile(web, {
        "tier": "gold", "email": {"value": "ann@old.example", "set_at": old},
        "city": {"value": "Turku", "set_at": new}})
    await gateway.store.update_profile(tg["contact_id"], {
        "phone": "+358 40 1234567", "tier": "silver",
        "email": {"value": "ann@new.example", "set_at": new},
        "city": {"value": "Espoo", "set_at": old}})
    return web, str(tg["contact_id"]), ann


async def test_merge_moves_everything_and_undo_restores_it_exactly(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    web, tg, ann = await two_customers(gateway, visitor, telegram, people)
    _, auth = await gateway.agent("Alice")
    before = await snapshot(gateway.store)
    tg_conversation = await gateway.store.find_conversation("telegram", str(ann.id))
    assert tg_conversation is not None

    status, merge = await call(gateway, "POST", f"/contacts/{web}/merge", auth,
                               json={"contact_id": tg})
    assert status == 201, merge
    assert (merge["survivor"], merge["merged"]) == (web, tg)
    assert merge["identities"] == [f"telegram:{ann.id}"]
    assert merge["conversations"] == {
        tg_conversation.id: await gateway.store.top_seq(tg_conversation.id)}
    status, contact = await call(gateway, "GET", f"/contacts/{web}", auth)
    assert status == 200
    assert sorted(i["channel"] for i in contact["identities"]) == ["telegram", "webchat"]
    profile = contact["profile"]
    # new keys come over; the survivor's values stay unless the other's are newer
    assert profile["phone"] == "+358 40 1234567" and profile["tier"] == "gold"
    assert profile["email"]["value"] == "ann@new.example"
    assert profile["city"]["value"] == "Turku"
    moved = await gateway.store.get_conversation(tg_conversation.id)
    assert moved is not None and moved.contact_id == web
    gone = await gateway.store.get_contact(tg)
    assert gone is not None and gone.merged_into == web and gone.identities == []
    status, listed = await call(gateway, "GET", f"/contacts/{web}/merges", auth)
    assert status == 200 and [m["id"] for m in listed["items"]] == [merge["id"]]
    # merging it again, or into itself: refused
    status, again = await call(gateway, "POST", f"/contacts/{web}/merge", auth,
                               json={"contact_id": tg})
    assert (status, again["error"]) == (409, "conflict") and "already merged" in again["message"]
    status, self_merge = await call(gateway, "POST", f"/contacts/{web}/merge", auth,
                                    json={"contact_id": web})
    assert status == 409 and "itself" in self_merge["message"]
    status, missing = await call(gateway, "POST", f"/contacts/{web}/merge", auth,
                                 json={"contact_id": "nope"})
    assert status == 404, missing
    status, bad = await call(gateway, "POST", f"/contacts/{web}/merge", auth, json={"id": 1})
    assert status == 400 and "contact_id" in bad["message"]

    status, undone = await call(gateway, "POST", f"/merges/{merge['id']}/undo", auth)
    assert status == 200, undone
    assert undone["undone_at"] is not None
    assert await snapshot(gateway.store) == before
    status, twice = await call(gateway, "POST", f"/merges/{merge['id']}/undo", auth)
    assert status == 409 and "already undone" in twice["message"]
    status, got = await call(gateway, "GET", f"/merges/{merge['id']}", auth)
    assert status == 200 and got["undone_by"] is not None
    assert (await call(gateway, "GET", "/merges/nope", auth))[0] == 404

    # after the undo Ann's Telegram is her own contact again, answered there as before
    await ann.say("what are your opening hours?")
    await ann.until("We're open")
    await gateway.settle()
    back = await gateway.store.find_conversation("telegram", str(ann.id))
    assert back is not None and back.contact_id == tg


async def test_undo_is_refused_once_it_could_not_be_exact(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    web, tg, ann = await two_customers(gateway, visitor, telegram, people)
    _, auth = await gateway.agent("Alice")
    status, merge = await call(gateway, "POST", f"/contacts/{web}/merge", auth,
                               json={"contact_id": tg})
    assert status == 201
    # a profile value the merge brought changed since
    await gateway.store.update_profile(web, {"phone": "+358 50 7654321"})
    after_change = await snapshot(gateway.store)
    status, refused = await call(gateway, "POST", f"/merges/{merge['id']}/undo", auth)
    assert (status, refused["error"]) == (409, "conflict")
    assert refused["message"] == "profile field 'phone' changed since the merge"
    assert await snapshot(gateway.store) == after_change  # nothing was changed
    await gateway.store.update_profile(web, {"phone": "+358 40 1234567"})

    # Ann wrote on Telegram after the merge: her conversation has new messages
    await ann.say("what are your opening hours?")
    await ann.until("We're open")
    await gateway.settle()
    status, refused = await call(gateway, "POST", f"/merges/{merge['id']}/undo", auth)
    assert status == 409
    assert "has new messages since the merge" in refused["message"]
    contact = await gateway.store.get_contact(web)
    assert contact is not None and len(contact.identities) == 2


async def test_undo_is_refused_when_the_survivor_was_merged_on(store: Store) -> None:
    contacts = ContactStore(store)
    a = await store.resolve_identity("webchat", "v_a")
    b = await store.resolve_identity("telegram", "1")
    c = await store.resolve_identity("webchat", "v_c")
    first = await contacts.merge(a.contact_id, b.contact_id, "agent-1")
    await contacts.merge(c.contact_id, a.contact_id, "agent-1")
    # a link token issued to a merged contact links to the survivor
    token, _ = await contacts.create_token(a.contact_id, "telegram")
    assert await contacts.consume_token(token, "telegram", "telegram:9") == (
        LinkState.LINKED, c.contact_id)
    with pytest.raises(Exception, match="was itself merged into"):
        await contacts.undo(first.id)


async def test_expired_link_codes_tokens_and_counters_have_ttl_indexes(gateway: Gateway) -> None:
    async def ttl_of(collection: str) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # the gateway creates indexes in the background at start
            indexes = {i["name"]: i async for i in await gateway.store.db[collection]
                       .list_indexes()}
            ttl = {n: i for n, i in indexes.items() if "expireAfterSeconds" in i}
            if ttl or asyncio.get_running_loop().time() > deadline:
                return ttl
            await asyncio.sleep(0.05)

    for collection, field in [("email_codes", "expires_at"), ("email_code_limits", "created_at"),
                              ("link_tokens", "expires_at")]:
        ttl = await ttl_of(collection)
        assert len(ttl) == 1, (collection, ttl)
        [index] = ttl.values()
        assert dict(index["key"]) == {field: 1}
        assert index["expireAfterSeconds"] == 24 * 3600
