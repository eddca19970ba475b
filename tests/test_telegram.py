"""Telegram by webhook, end to end: the whole gateway on a real port, the real aiogram
client talking to a local fake Bot API (tests/fakes/telegram_api.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pymongo.errors import AutoReconnect

from connectors.base import DeliveryError
from connectors.telegram.outbound import split_text
from gateway.app import create_app
from gateway.keys import CONNECTORS, OUTBOX, PIPELINE
from gateway.model import OutboundDraft, Party, Role
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import Gateway
from tests.fakes.telegram_api import FakeTelegram, People

TOKEN = "123456:TEST-token_abc"
SECRET = "s3cret_Secret-42"
HOOK = "/webhooks/telegram"
PUBLIC_URL = "https://gw.example/webhooks/telegram"
GREETING = "Hi! I'm the Omnigate demo bot."
HOURS = "We're open Monday to Friday"
BOT = Party(role=Role.BOT, name="Omnigate bot")


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
        "telegram_webhook_secret": SECRET, "telegram_webhook_url": PUBLIC_URL,
        "telegram_api_url": telegram.url})


@pytest.fixture
def people(telegram: FakeTelegram) -> People:
    return People(telegram)


async def post(gateway: Gateway, telegram: FakeTelegram, update: dict[str, Any],
               secret: str | None = SECRET) -> tuple[int, Any]:
    headers_secret = secret if secret is not None else ""
    if secret is None:  # no header at all
        async with gateway.http.post(gateway.url + HOOK, json=update) as response:
            return response.status, await response.json()
    return await telegram.deliver(gateway.http, gateway.url + HOOK, update, headers_secret)


def inbound_count(gateway: Gateway) -> Any:
    return gateway.store.messages.count_documents({"direction": "in"})


async def test_start_registers_the_webhook_with_its_secret(
    gateway: Gateway, telegram: FakeTelegram
) -> None:
    [call] = telegram.of("setWebhook")
    assert call.params["url"] == PUBLIC_URL
    assert call.params["secret_token"] == SECRET
    assert call.params["allowed_updates"] == ["message", "edited_message", "callback_query",
                                              "my_chat_member"]
    assert call.params.get("drop_pending_updates", False) is False
    assert telegram.webhook is not None and telegram.of("getMe")


async def test_set_webhook_is_retried_until_telegram_accepts_it(
    settings: Settings, store: Store, telegram: FakeTelegram
) -> None:
    """(``store`` drops the test's database at the end.)"""
    telegram.fail("setWebhook", 502, "Bad Gateway", times=2)
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()  # starts although Telegram refused
    try:
        await telegram.wait_for(lambda: telegram.webhook, timeout=10)
        assert [c.status for c in telegram.of("setWebhook", ok=None)] == [502, 502, 200]
        assert telegram.webhook["secret_token"] == SECRET
    finally:
        await server.close()


async def test_message_in_bot_reply_out(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    ann = people.user(1001, "Ann", last_name="Lee", username="annlee")
    update = people.message(ann, text="hello")
    status, body = await post(gateway, telegram, update)
    # acknowledged only once stored: the item is there when the 200 arrives
    assert (status, body["outcome"]) == (200, "stored")
    stored = await gateway.store.find_by_external_id(
        "telegram", f"1001:{update['message']['message_id']}")
    assert stored is not None and stored.text == "hello"
    assert stored.sender.name == "Ann Lee" and stored.sender.id == "1001"
    assert stored.conversation_ref.thread_key == "1001"
    assert stored.channel_data["update_id"] == update["update_id"]
    assert stored.channel_data["username"] == "annlee"

    texts = await telegram.wait_for(lambda: len(telegram.texts(1001)) >= 2 and
                                    telegram.texts(1001))
    assert texts[0].startswith(GREETING)
    menu = telegram.of("sendMessage")[1].params
    keyboard = menu["reply_markup"]["inline_keyboard"]
    assert [row[0]["callback_data"] for row in keyboard] == [
        "flow:hours", "flow:shipping", "flow:returns_policy", "flow:order_status",
        "flow:start_return", "flow:human"]
    assert keyboard[0][0]["text"] == "Opening hours"
    await gateway.settle()
    contact = await gateway.store.get_contact(stored.contact_id)
    assert contact is not None
    assert [(i.channel, i.external_id, i.reachable) for i in contact.identities] == [
        ("telegram", "1001", True)]
    items, _ = await gateway.store.history(stored.conversation_id)
    assert all(i.delivery.status.value == "delivered" for i in items if i.delivery)
    assert all(i.delivery.external_id.startswith("1001:") for i in items if i.delivery)


async def test_button_press_round_trip(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    ann = people.user(1002)
    await post(gateway, telegram, people.message(ann, text="hello"))
    await telegram.wait_for(lambda: len(telegram.texts(1002)) >= 2)
    menu = telegram.of("sendMessage")[1].result  # the message as Telegram returned it
    press = people.press(ann, menu, "flow:hours")
    status, body = await post(gateway, telegram, press)
    assert (status, body["outcome"]) == (200, "stored")
    query_id = press["callback_query"]["id"]
    await telegram.wait_for(lambda: query_id in telegram.answered)
    answer = await telegram.wait_for(
        lambda: [t for t in telegram.texts(1002) if t.startswith(HOURS)])
    assert len(answer) == 1
    choice = await gateway.store.find_by_external_id("telegram", "cb:" + query_id)
    assert choice is not None
    assert (choice.value, choice.text, choice.conversation_ref.thread_key) == (
        "flow:hours", "Opening hours", "1002")
    # the answer carries the menu again
    last = telegram.of("sendMessage")[-1].params
    assert last["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "flow:hours"


async def test_long_button_values_are_mapped_and_come_back(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    pipeline = gateway.app[PIPELINE]
    conversation = await pipeline.open_conversation("telegram", "1003", "1003", "Bo")
    long_value = "choice:" + "é" * 60  # 127 bytes: over callback_data's 64
    awkward = "og~looks-like-a-key"
    draft = OutboundDraft(sender=BOT, text="Pick one", buttons=[
        {"title": "Long", "value": long_value}, {"title": "Odd", "value": awkward},
        {"title": "Plain", "value": "plain"}])
    await gateway.app[OUTBOX].enqueue(conversation, [draft])
    [call] = await telegram.wait_for(lambda: telegram.of("sendMessage"))
    rows = call.params["reply_markup"]["inline_keyboard"]
    data = [row[0]["callback_data"] for row in rows]
    assert all(len(d.encode()) <= 64 for d in data)
    assert data[2] == "plain" and data[0] != long_value and data[1] != awkward
    for pressed, value in ((data[0], long_value), (data[1], awkward)):
        press = people.press(people.user(1003), call.result, pressed)
        assert (await post(gateway, telegram, press))[0] == 200
        stored = await gateway.store.find_by_external_id(
            "telegram", "cb:" + press["callback_query"]["id"])
        assert stored is not None and stored.value == value
    # an unknown key (state lost, or forged): answered, nothing stored
    forged = people.press(people.user(1003), call.result, "og~nope")
    before = await inbound_count(gateway)
    assert (await post(gateway, telegram, forged))[1]["outcome"] == "ignored"
    assert await inbound_count(gateway) == before
    await telegram.wait_for(lambda: forged["callback_query"]["id"] in telegram.answered)


async def test_redelivered_updates_are_stored_and_answered_once(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    ann = people.user(1004)
    update = people.message(ann, text="what are your opening hours?")
    first = await post(gateway, telegram, update)
    again = await post(gateway, telegram, update)
    assert (first[0], first[1]["outcome"], again[0], again[1]["outcome"]) == (
        200, "stored", 200, "duplicate")
    await telegram.wait_for(lambda: telegram.texts(1004))
    await gateway.settle()
    assert len([t for t in telegram.texts(1004) if t.startswith(HOURS)]) == 1
    menu = telegram.of("sendMessage")[-1].result
    press = people.press(ann, menu, "flow:shipping")
    results = [await post(gateway, telegram, press) for _ in range(3)]
    assert [r[1]["outcome"] for r in results] == ["stored", "duplicate", "duplicate"]
    await gateway.settle()
    await telegram.wait_for(lambda: telegram.of("answerCallbackQuery"))
    await asyncio.sleep(0)  # would a second answer be on its way?
    assert len(telegram.of("answerCallbackQuery", ok=None)) == 1
    assert len([t for t in telegram.texts(1004) if t.startswith("Shipping is free")]) == 1
    assert await inbound_count(gateway) == 2


@pytest.mark.parametrize("secret", [None, "", "wrong", "s3cret_Secret-43", SECRET + "x",
                                    SECRET.lower(), SECRET + "é", "é" * 16])
async def test_missing_or_wrong_secret_is_403_and_nothing_is_stored(
    gateway: Gateway, telegram: FakeTelegram, people: People, secret: str | None
) -> None:
    status, body = await post(gateway, telegram, people.message(people.user(1005), text="hi"),
                              secret)
    assert status == 403 and body["error"] == "forbidden"
    assert await inbound_count(gateway) == 0
    assert await gateway.store.conversations.count_documents({}) == 0
    assert not telegram.of("sendMessage", ok=None)


async def test_group_chat_only_mentions_and_replies_to_the_bot(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    group = people.group(-100777)
    ann, ben = people.user(2001, "Ann"), people.user(2002, "Ben")
    name = "@" + telegram.username

    def mention(who: str = name) -> list[dict[str, Any]]:
        return [{"type": "mention", "offset": 0, "length": len(who)}]

    chatter = [
        people.message(ann, group, "hello everyone"),
        people.message(ben, group, "@other_bot opening hours", entities=mention("@other_bot")),
        people.message(ann, group, "/start"),  # a command, but not for this bot by name
        people.message(ben, group, f"see {name}", entities=[]),  # no entity: not a mention
    ]
    for update in chatter:
        status, body = await post(gateway, telegram, update)
        assert (status, body["outcome"]) == (200, "ignored")
    asked = people.message(ann, group, f"{name} what are your opening hours?",
                           entities=mention())
    assert (await post(gateway, telegram, asked))[1]["outcome"] == "stored"
    answer = await telegram.wait_for(
        lambda: [c for c in telegram.of("sendMessage") if c.params["text"].startswith(HOURS)])
    assert answer[0].params["chat_id"] == -100777
    # in a group the reply quotes the message it answers
    assert answer[0].params["reply_parameters"]["message_id"] == asked["message"]["message_id"]
    stored = await gateway.store.find_by_external_id(
        "telegram", f"-100777:{asked['message']['message_id']}")
    assert stored is not None and stored.text == "what are your opening hours?"
    assert stored.conversation_ref.thread_key == "-100777:2001"  # one per person in a group

    bot_message = answer[0].result
    replying = people.message(ben, group, "and on sunday?", reply_to_message=bot_message)
    assert (await post(gateway, telegram, replying))[1]["outcome"] == "stored"
    command = people.message(ben, group, f"/help{name}")
    assert (await post(gateway, telegram, command))[1]["outcome"] == "stored"
    helped = await gateway.store.find_by_external_id(
        "telegram", f"-100777:{command['message']['message_id']}")
    assert helped is not None and helped.text == "/help"
    await gateway.settle()
    assert await inbound_count(gateway) == 3
    threads = await gateway.store.conversations.distinct("thread_key")
    assert sorted(threads) == ["-100777:2001", "-100777:2002"]


async def test_start_payload_reaches_the_pipeline_as_deep_link(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    update = people.message(people.user(1008), text="/start ref-42_abc")
    assert (await post(gateway, telegram, update))[1]["outcome"] == "stored"
    item = await gateway.store.find_by_external_id(
        "telegram", f"1008:{update['message']['message_id']}")
    assert item is not None and (item.deep_link, item.text) == ("ref-42_abc", "/start")
    texts = await telegram.wait_for(lambda: telegram.texts(1008))
    assert texts[0].startswith(GREETING)
    plain = people.message(people.user(1008), text="/start")
    await post(gateway, telegram, plain)
    item = await gateway.store.find_by_external_id(
        "telegram", f"1008:{plain['message']['message_id']}")
    assert item is not None and item.deep_link is None


async def test_edited_message_updates_the_stored_one_and_keeps_the_original(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    original = people.message(people.user(1009), text="my order is 1243")
    await post(gateway, telegram, original)
    await gateway.settle()
    replies = len(telegram.of("sendMessage"))
    edit = people.edited(original, "my order is 1234")
    assert (await post(gateway, telegram, edit))[1]["outcome"] == "edited"
    assert (await post(gateway, telegram, edit))[1]["outcome"] == "duplicate"
    key = f"1009:{original['message']['message_id']}"
    item = await gateway.store.find_by_external_id("telegram", key)
    assert item is not None
    assert item.text == "my order is 1234"
    assert [e.text for e in item.edits] == ["my order is 1243"]
    assert item.channel_data["edited"]["update_id"] == edit["update_id"]
    second = people.edited(original, "my order is 1234, sorry")
    await post(gateway, telegram, second)
    older = await post(gateway, telegram, edit)  # a late redelivery of the first edit
    assert older[1]["outcome"] == "duplicate"
    item = await gateway.store.find_by_external_id("telegram", key)
    assert item is not None and item.text == "my order is 1234, sorry"
    assert [e.text for e in item.edits] == ["my order is 1243", "my order is 1234"]
    # an edit of something never stored: ignored, nothing created
    stray = people.edited(people.message(people.user(1009), text="x"), "y")
    assert (await post(gateway, telegram, stray))[1]["outcome"] == "ignored"
    await gateway.settle()
    assert len(telegram.of("sendMessage")) == replies  # edits are not new turns
    assert await inbound_count(gateway) == 1


async def test_store_failure_is_500_and_the_redelivery_is_stored_once(
    gateway: Gateway, telegram: FakeTelegram, people: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise AutoReconnect("store down (test)")

    update = people.message(people.user(1010), text="hello")
    monkeypatch.setattr(gateway.store, "append_inbound", down)
    status, body = await post(gateway, telegram, update)
    assert (status, body["error"]) == (500, "store_unavailable")
    monkeypatch.undo()
    assert await inbound_count(gateway) == 0
    status, body = await post(gateway, telegram, update)
    assert (status, body["outcome"]) == (200, "stored")
    await telegram.wait_for(lambda: len(telegram.texts(1010)) >= 2)
    await gateway.settle()
    assert len(telegram.texts(1010)) == 2


async def test_blocked_user_stops_delivery_and_is_unreachable(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    ann = people.user(1011)
    telegram.blocked.add(1011)
    await post(gateway, telegram, people.message(ann, text="hello"))
    await gateway.settle()
    failed = await gateway.store.messages.find({"delivery.status": "failed"}).to_list()
    assert len(failed) == 2  # the greeting and the menu: given up, not retried
    assert all(d["delivery"]["attempts"] == 1 for d in failed)
    assert "blocked" in failed[0]["delivery"]["last_error"]
    assert len(telegram.of("sendMessage", ok=False)) == 2
    identity = await gateway.store.identities.find_one({"_id": "telegram:1011"})
    assert identity is not None and identity["reachable"] is False
    assert "blocked" in identity["unreachable_reason"]
    # the user unblocks the bot: Telegram says so with my_chat_member
    telegram.blocked.discard(1011)
    member = telegram.new_update(my_chat_member={
        "chat": people.private(ann), "from": ann, "date": 1700000000,
        "old_chat_member": {"status": "kicked", "user": telegram.me, "until_date": 0},
        "new_chat_member": {"status": "member", "user": telegram.me}})
    assert (await post(gateway, telegram, member))[0] == 200
    identity = await gateway.store.identities.find_one({"_id": "telegram:1011"})
    assert identity is not None and identity["reachable"] is True


async def test_chat_not_found_is_permanent_and_unreachable(
    gateway: Gateway, telegram: FakeTelegram
) -> None:
    pipeline = gateway.app[PIPELINE]
    conversation = await pipeline.open_conversation("telegram", "1012", "1012", "Cy")
    telegram.missing_chats.add(1012)
    [item] = await gateway.app[OUTBOX].enqueue(
        conversation, [OutboundDraft(sender=BOT, text="are you there?")])
    await gateway.settle()
    stored = await gateway.store.get_message(item.id)
    assert stored is not None and stored.delivery is not None
    assert (stored.delivery.status.value, stored.delivery.attempts) == ("failed", 1)
    identity = await gateway.store.identities.find_one({"_id": "telegram:1012"})
    assert identity is not None and identity["reachable"] is False
    assert identity["unreachable_reason"] == "Bad Request: chat not found"


async def test_server_errors_are_retried_until_delivered(
    gateway: Gateway, telegram: FakeTelegram
) -> None:
    conversation = await gateway.app[PIPELINE].open_conversation("telegram", "1013", "1013")
    telegram.fail("sendMessage", 500, "Internal Server Error", times=2)
    [item] = await gateway.app[OUTBOX].enqueue(
        conversation, [OutboundDraft(sender=BOT, text="third time lucky")])
    await telegram.wait_for(lambda: telegram.texts(1013), timeout=15)
    await gateway.settle()
    stored = await gateway.store.get_message(item.id)
    assert stored is not None and stored.delivery is not None
    assert (stored.delivery.status.value, stored.delivery.attempts) == ("delivered", 3)
    assert telegram.texts(1013) == ["third time lucky"]
    identity = await gateway.store.identities.find_one({"_id": "telegram:1013"})
    assert identity is not None and identity["reachable"] is True


def long_text() -> str:
    lines = [f"line {n:05d} " + "lorem ipsum dolor sit amet " * 3 for n in range(330)]
    return "\n".join(lines) + "\nend 🙂"  # about 32,000 characters: 8 parts


async def test_long_text_is_split_at_4096_in_order(
    gateway: Gateway, telegram: FakeTelegram
) -> None:
    conversation = await gateway.app[PIPELINE].open_conversation("telegram", "1014", "1014")
    text = long_text()
    await gateway.app[OUTBOX].enqueue(conversation, [
        OutboundDraft(sender=BOT, text=text, buttons=[{"title": "OK", "value": "ok"}]),
        OutboundDraft(sender=BOT, text="after the long one")])
    await telegram.wait_for(lambda: "after the long one" in telegram.texts(1014))
    parts = telegram.texts(1014)[:-1]
    assert parts == split_text(text) and len(parts) >= 8
    assert all(len(p.encode("utf-16-le")) // 2 <= 4096 for p in parts)
    assert "".join(parts) == text
    assert all(p.endswith("\n") for p in parts[:-1])  # cut at line ends
    sends = telegram.of("sendMessage")
    assert [("reply_markup" in c.params) for c in sends] == [False] * (len(parts) - 1) + [
        True, False]  # the buttons go with the last part


async def test_429_retry_after_is_honoured_without_loss_or_reordering(
    gateway: Gateway, telegram: FakeTelegram
) -> None:
    conversation = await gateway.app[PIPELINE].open_conversation("telegram", "1015", "1015")
    text = long_text()
    # the second part is refused once with 429 retry_after=1
    telegram.fail("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1,
                  after=1)
    [long_item, _] = await gateway.app[OUTBOX].enqueue(conversation, [
        OutboundDraft(sender=BOT, text=text), OutboundDraft(sender=BOT, text="next message")])
    await telegram.wait_for(lambda: "next message" in telegram.texts(1015), timeout=15)
    await gateway.settle()
    texts = telegram.texts(1015)
    assert "".join(texts[:-1]) == text and texts[-1] == "next message"
    assert len(texts) == len(set(texts))  # no part sent twice
    calls = telegram.of("sendMessage", ok=None)
    [refused] = [n for n, c in enumerate(calls) if c.status == 429]
    assert refused == 1
    assert calls[2].params["text"] == calls[1].params["text"]  # the same part, again
    assert calls[2].at - calls[1].at >= 0.95  # not before retry_after
    stored = await gateway.store.get_message(long_item.id)
    assert stored is not None and stored.delivery is not None
    assert stored.delivery.status.value == "delivered" and stored.delivery.attempts == 2
    assert stored.delivery.parts_sent == len(texts) - 2  # every part but the last recorded


async def test_handoff_agent_reply_reaches_telegram(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    """Through handoff: the customer asks for a human, an agent claims and replies via the
    agent REST API, and it arrives at Telegram as sendMessage to the right chat."""
    api, http = gateway.url + "/api/v1", gateway.http
    ann = people.user(1016)
    await post(gateway, telegram, people.message(ann, text="hello"))
    await post(gateway, telegram, people.message(ann, text="I want to talk to a human please"))
    note = await telegram.wait_for(lambda: [c for c in telegram.of("sendMessage")
                                            if c.params.get("entities")])
    handoff = note[0].params
    assert handoff["entities"] == [{"type": "italic", "offset": 0,
                                    "length": len(handoff["text"])}]
    await gateway.settle()
    _, alice = await gateway.agent("Alice")
    queue = await (await http.get(api + "/conversations", headers=alice)).json()
    [conversation] = queue["items"]
    assert conversation["channel"] == "telegram" and conversation["owner"] == "queued"
    cid = conversation["id"]
    assert (await http.post(f"{api}/conversations/{cid}/claim", headers=alice)).status == 200
    reply = await http.post(f"{api}/conversations/{cid}/messages", headers=alice,
                            json={"text": "Hi, how can I help?"})
    assert reply.status == 201
    sent = await telegram.wait_for(lambda: [c for c in telegram.of("sendMessage")
                                            if "how can I help" in c.params["text"]])
    assert sent[0].params["chat_id"] == 1016
    assert sent[0].params["text"] == "Alice: Hi, how can I help?"
    assert sent[0].params["entities"] == [{"type": "bold", "offset": 0, "length": 6}]
    joined = [t for t in telegram.texts(1016) if "Alice joined" in t]
    assert len(joined) == 1
    # while Alice owns it the bot stays silent
    before = len(telegram.texts(1016))
    await post(gateway, telegram, people.message(ann, text="hello?"))
    await gateway.settle()
    assert len(telegram.texts(1016)) == before


async def test_stop_closes_the_bot_session(gateway: Gateway) -> None:
    connector = gateway.app[CONNECTORS]["telegram"]
    session = connector.bot.session
    await connector.stop()
    assert session._session is None or session._session.closed
    with pytest.raises(DeliveryError, match="not running"):
        await connector.send(None, None)  # type: ignore[arg-type]
    status, body = await post(gateway, FakeTelegram(token=TOKEN), {"update_id": 1})
    assert (status, body["error"]) == (503, "unavailable")
