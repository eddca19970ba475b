"""CSAT after resolve, over the real channels: the question with buttons, the answer
(a press or a typed digit) stored and thanked once, never reopening the conversation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

from gateway.csat import DEFAULT_QUESTION, DEFAULT_THANKS, CsatConfig, parse_answer
from gateway.keys import PIPELINE, ROUTING
from gateway.model import Activity, Conversation, InboundMessage, OwnerState, Party, Role, utcnow
from gateway.settings import Settings
from tests.conftest import Gateway, Visitor, running_gateway
from tests.fakes.telegram_api import FakeTelegram, People

TOKEN = "123456:TEST-token_abc"
SECRET = "s3cret_Secret-42"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"csat": True})


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Wait until ``await check()`` is truthy; returns it (fails at the deadline)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def conversation(gateway: Gateway, conversation_id: str) -> Conversation:
    found = await gateway.store.get_conversation(conversation_id)
    assert found is not None
    return found


async def history(gateway: Gateway, conversation_id: str) -> list[Activity]:
    items, _ = await gateway.store.history(conversation_id, limit=200)
    return list(reversed(items))


async def agent_resolves(gateway: Gateway, conversation_id: str) -> None:
    """Handoff (if the bot owns it), an agent claims, replies and resolves over the API."""
    routing = gateway.app[ROUTING]
    if (await conversation(gateway, conversation_id)).owner is OwnerState.BOT:
        assert await routing.handoff(conversation_id, "customer asked for a human")
    _, alice = await gateway.agent(f"Alice{ObjectId()}")
    api = f"{gateway.url}/api/v1/conversations/{conversation_id}"
    for path, body in (("/claim", None), ("/messages", {"text": "Done, anything else?"}),
                       ("/resolve", None)):
        async with gateway.http.post(api + path, headers=alice, json=body) as response:
            assert response.status in (200, 201), await response.text()


async def customer_says(gateway: Gateway, thread: str, text: str | None = None,
                        value: str | None = None) -> None:
    await gateway.app[PIPELINE].ingest(InboundMessage(
        channel="webchat", external_id=f"{thread}:{ObjectId()}", thread_key=thread,
        sender=Party(role=Role.CUSTOMER, id=thread), sender_external_id=thread,
        text=text, value=value))


def is_question(item: dict[str, Any]) -> bool:
    return item["type"] == "message" and [b["value"] for b in item["buttons"]] == [
        f"csat:{n}" for n in range(1, 6)]


async def test_webchat_press_is_stored_thanked_once_and_does_not_reopen(
    gateway: Gateway, visitor: Visitor
) -> None:
    await visitor.connect()
    ack = await visitor.say("hello")
    first = await gateway.store.get_message(ack["id"])
    assert first is not None
    cid = first.conversation_id
    await gateway.settle()
    await agent_resolves(gateway, cid)

    question = await visitor.until(is_question)
    assert question["text"] == DEFAULT_QUESTION
    assert [b["title"] for b in question["buttons"]] == ["1", "2", "3", "4", "5"]
    asked = (await conversation(gateway, cid)).csat
    assert asked is not None and asked.score is None

    await visitor.press(question["buttons"][3])  # "4"
    thanks = await visitor.until(lambda i: i["type"] == "message" and i["role"] == "bot")
    assert thanks["text"] == DEFAULT_THANKS
    await gateway.settle()
    stored = await conversation(gateway, cid)
    assert stored.owner is OwnerState.RESOLVED
    assert stored.csat is not None and (stored.csat.score, stored.csat.comment) == (4, None)
    assert stored.csat.answered_at is not None and stored.csat.asked_at == asked.asked_at

    # a second press (another score, or the same) changes nothing and thanks no more
    await visitor.press(question["buttons"][0])
    await visitor.press(question["buttons"][3])
    await gateway.settle()
    again = await conversation(gateway, cid)
    assert again.owner is OwnerState.RESOLVED and again.csat == stored.csat
    items = await history(gateway, cid)
    assert [i.text for i in items].count(DEFAULT_THANKS) == 1
    assert "reopened" not in [i.name for i in items]
    [outcome] = await gateway.app[ROUTING].outcomes.db.outcomes.find(
        {"conversation_id": cid}).to_list()
    assert (outcome["csat_asked"], outcome["csat_score"]) == (True, 4)

    # anything else reopens it to the bot, as before
    await visitor.say("one more question")
    reopened = await visitor.until(lambda i: i["type"] == "event")
    assert reopened["name"] == "reopened"
    await gateway.settle()
    assert (await conversation(gateway, cid)).owner is OwnerState.BOT


async def test_typed_digit_with_comment_and_the_window(gateway: Gateway) -> None:
    pipeline = gateway.app[PIPELINE]
    first = await pipeline.open_conversation("webchat", "v_typed", "v_typed")
    await agent_resolves(gateway, first.id)
    await customer_says(gateway, "v_typed", "5 - quick and friendly, thanks!")
    done = await eventually(lambda: _answered(gateway, first.id))
    assert (done.score, done.comment) == (5, "quick and friendly, thanks!")
    await gateway.settle()
    assert (await conversation(gateway, first.id)).owner is OwnerState.RESOLVED

    # after the window, a digit is an ordinary message: it reopens, nothing is recorded
    late = await pipeline.open_conversation("webchat", "v_late", "v_late")
    await agent_resolves(gateway, late.id)
    await gateway.settle()
    asked = (await conversation(gateway, late.id)).csat
    assert asked is not None
    await gateway.store.conversations.update_one(
        {"_id": late.id}, {"$set": {"csat.asked_at": asked.asked_at - timedelta(hours=25)}})
    await customer_says(gateway, "v_late", "4")
    await gateway.settle()
    after = await conversation(gateway, late.id)
    assert after.owner is OwnerState.BOT
    assert after.csat is not None and after.csat.score is None
    assert "reopened" in [i.name for i in await history(gateway, late.id)]


async def test_other_text_reopens_and_a_later_press_still_counts(gateway: Gateway) -> None:
    pipeline = gateway.app[PIPELINE]
    conv = await pipeline.open_conversation("webchat", "v_thanks", "v_thanks")
    await agent_resolves(gateway, conv.id)
    await customer_says(gateway, "v_thanks", "thanks a lot!")
    await gateway.settle()
    assert (await conversation(gateway, conv.id)).owner is OwnerState.BOT
    # reopened: a typed digit is the bot's now, but the question's button still answers it
    await customer_says(gateway, "v_thanks", value="csat:2")
    done = await eventually(lambda: _answered(gateway, conv.id))
    assert done.score == 2
    await gateway.settle()
    texts = [i.text for i in await history(gateway, conv.id)]
    assert texts.count(DEFAULT_THANKS) == 1


async def test_disabled_asks_nothing(settings: Settings) -> None:
    async with running_gateway(settings.model_copy(update={"csat": False})) as gateway:
        conv = await gateway.app[PIPELINE].open_conversation("webchat", "v_off", "v_off")
        await agent_resolves(gateway, conv.id)
        await gateway.settle()
        stored = await conversation(gateway, conv.id)
        assert stored.owner is OwnerState.RESOLVED and stored.csat is None
        assert not any(i.buttons for i in await history(gateway, conv.id))
        await customer_says(gateway, "v_off", "5")
        await gateway.settle()
        assert (await conversation(gateway, conv.id)).owner is OwnerState.BOT
        [outcome] = await gateway.app[ROUTING].outcomes.db.outcomes.find({}).to_list()
        assert outcome["csat_asked"] is False


async def test_bot_resolves_ask_only_when_configured(gateway: Gateway) -> None:
    routing = gateway.app[ROUTING]
    conv = await gateway.app[PIPELINE].open_conversation("webchat", "v_bot", "v_bot")
    assert await routing.bot_resolve(conv.id, "k1", topic="faq")
    assert (await conversation(gateway, conv.id)).csat is None
    routing.configure_csat(CsatConfig(enabled=True, after_bot=True))
    await customer_says(gateway, "v_bot", "hello again")
    await gateway.settle()
    assert await routing.bot_resolve(conv.id, "k2", topic="faq")
    assert (await conversation(gateway, conv.id)).csat is not None


@pytest.mark.parametrize(("text", "value", "expected"), [
    ("4", None, (4, None)),
    (" 5/5 great", None, (5, "great")),
    ("3 stars: slow but fine", None, (3, "slow but fine")),
    ("1!", None, (1, None)),
    ("10", None, None),
    ("4.5", None, None),
    ("45 minutes waiting", None, None),
    ("6", None, None),
    ("thanks", None, None),
    (None, "csat:2", (2, None)),
    ("2", "flow:hours", None),
    (None, "csat:9", None),
])
def test_parse_answer(text: str | None, value: str | None, expected: Any) -> None:
    now = utcnow()
    item = Activity.model_validate({
        "id": "i", "conversation_id": "c", "contact_id": "p", "seq": 1, "contact_seq": 1,
        "direction": "in", "channel": "webchat",
        "conversation_ref": {"channel": "webchat", "thread_key": "t"},
        "sender": {"role": "customer"}, "timestamp": now, "created_at": now,
        "text": text, "value": value})
    answer = parse_answer(item, typed=True)
    assert (None if answer is None else (answer.score, answer.comment)) == expected
    untyped = parse_answer(item, typed=False)  # only the buttons' values count
    assert (None if untyped is None else untyped.score) == (
        expected[0] if value is not None and expected is not None else None)


async def _answered(gateway: Gateway, conversation_id: str) -> Any:
    csat = (await conversation(gateway, conversation_id)).csat
    return csat if csat is not None and csat.score is not None else None


# ------------------------------------------------------------------ Telegram


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(token=TOKEN)
    await fake.start()
    yield fake
    await fake.close()


async def test_telegram_inline_keyboard_and_typed_digit(
    settings: Settings, telegram: FakeTelegram
) -> None:
    settings = settings.model_copy(update={
        "telegram_token": TOKEN, "telegram_mode": "webhook",
        "telegram_webhook_secret": SECRET, "telegram_webhook_url": "https://gw.example/tg",
        "telegram_api_url": telegram.url})
    people = People(telegram)
    async with running_gateway(settings) as gateway:
        ann = people.user(2001, "Ann")
        status, _ = await telegram.deliver(gateway.http, gateway.url + "/webhooks/telegram",
                                           people.message(ann, text="hello"), SECRET)
        assert status == 200
        await gateway.settle()
        conv = await gateway.store.find_conversation("telegram", "2001")
        assert conv is not None
        await agent_resolves(gateway, conv.id)
        call = await telegram.wait_for(lambda: [
            c for c in telegram.of("sendMessage") if c.params.get("text") == DEFAULT_QUESTION])
        keyboard = call[0].params["reply_markup"]["inline_keyboard"]
        buttons = [b for row in keyboard for b in row]
        assert [(b["text"], b["callback_data"]) for b in buttons] == [
            (str(n), f"csat:{n}") for n in range(1, 6)]

        typed = people.message(ann, text="3 took a while")
        for _ in range(2):  # Telegram redelivers: stored once, counted once
            status, _ = await telegram.deliver(
                gateway.http, gateway.url + "/webhooks/telegram", typed, SECRET)
            assert status == 200
        await telegram.wait_for(lambda: DEFAULT_THANKS in telegram.texts(2001))
        await gateway.settle()
        stored = await conversation(gateway, conv.id)
        assert stored.owner is OwnerState.RESOLVED
        assert stored.csat is not None
        assert (stored.csat.score, stored.csat.comment) == (3, "took a while")
        assert telegram.texts(2001).count(DEFAULT_THANKS) == 1
        assert "reopened" not in [i.name for i in await history(gateway, conv.id)]
