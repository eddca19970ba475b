"""Slack over real HTTP: signed events in, chat.postMessage out, against a local Slack.

The gateway runs whole (conftest ``gateway``); Slack's Web API is tests/fakes/slack_api.py,
reached by the real slack_sdk client through OMNIGATE_SLACK_API_URL; events are signed with
slack_sdk's own SignatureVerifier, exactly as Slack signs them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo.errors import AutoReconnect

from connectors.base import ConnectorContext
from connectors.slack import SlackConnector
from gateway.keys import CONNECTORS
from gateway.settings import Settings
from tests.conftest import Gateway
from tests.fakes.slack_api import (
    BOT_ID,
    BOT_TOKEN,
    BOT_USER_ID,
    SIGNING_SECRET,
    FakeSlack,
    Message,
    SlackSender,
    dm,
    mention,
    new_ts,
    press,
)

ADA = "U0000ADA"
BOB = "U0000BOB"
DM = "D0000USER1"
SUPPORT = "C0000SUPPORT"


@pytest.fixture
async def slack(request: pytest.FixtureRequest) -> AsyncIterator[FakeSlack]:
    """The local Slack; ``indirect`` parametrization: how many auth.test calls fail."""
    fake = await FakeSlack().start()
    fake.fail("auth.test", times=getattr(request, "param", 0), error="invalid_auth")
    fake.add_user(ADA, "Ada Lovelace", display_name="ada")
    fake.add_user(BOB, "Bob Builder")
    yield fake
    await fake.close()


@pytest.fixture
def settings(settings: Settings, slack: FakeSlack) -> Settings:
    return settings.model_copy(update={
        "slack_bot_token": BOT_TOKEN, "slack_signing_secret": SIGNING_SECRET,
        "slack_api_url": slack.api_url,
    })


@pytest.fixture
def sender(gateway: Gateway) -> SlackSender:
    return SlackSender(gateway.http, gateway.url)


def connector(gateway: Gateway) -> SlackConnector:
    found = gateway.app[CONNECTORS]["slack"]
    assert isinstance(found, SlackConnector)
    return found


async def stored(gateway: Gateway, **query: Any) -> list[dict[str, Any]]:
    cursor = gateway.store.messages.find({"channel": "slack", **query})
    return await cursor.sort([("conversation_id", 1), ("seq", 1)]).to_list()


async def inbound(gateway: Gateway) -> list[dict[str, Any]]:
    return await stored(gateway, direction="in")


def with_buttons(slack: FakeSlack, channel: str) -> Message | None:
    return next((m for m in reversed(slack.posts(channel)) if m.buttons), None)


def button(message: Message, value: str) -> dict[str, Any]:
    return next(b for b in message.buttons if b["value"] == value)


# ----------------------------------------------------------------- the basics


async def test_url_verification_answers_the_challenge(sender: SlackSender) -> None:
    challenge = "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    body = json.dumps({"token": "t", "challenge": challenge,
                       "type": "url_verification"}).encode()
    status, text = await sender.post("/webhooks/slack/events", body)
    assert status == 200
    assert json.loads(text) == {"challenge": challenge}
    # the same request with a wrong signature gets no challenge back
    status, text = await sender.post("/webhooks/slack/events", body, signature="v0=" + "0" * 64)
    assert status == 401
    assert "3eZbrw" not in text


async def test_direct_message_gets_the_bot_reply_in_that_dm(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    status, _ = await sender.event(dm(ADA, "hello", channel=DM))
    assert status == 200
    # acknowledged only once stored: the message is there the moment Slack has its 200
    [item] = await inbound(gateway)
    assert item["text"] == "hello" and item["external_id"].startswith(f"{DM}:")
    assert item["conversation_ref"]["thread_key"] == DM
    assert item["sender"] == {"role": "customer", "id": ADA, "name": "ada"}

    menu = await slack.until(lambda: with_buttons(slack, DM), what="the bot's menu")
    assert all(m.thread_ts is None for m in slack.posts(DM))  # a DM reply is not threaded
    assert "Omnigate demo bot" in slack.posts(DM)[0].text
    assert {b["value"] for b in menu.buttons} >= {"flow:hours", "flow:human"}
    assert len({b["action_id"] for b in menu.buttons}) == len(menu.buttons)  # unique ids
    sections = [b for b in menu.blocks if b["type"] == "section"]
    assert sections and sections[0]["text"]["text"] == "What can I help you with?"

    # the second message goes to the same conversation; users.info was asked once
    await sender.event(dm(ADA, "shipping costs", channel=DM))
    await slack.until(lambda: any("Shipping is free" in (m.text or "") for m in slack.posts(DM)))
    items = await inbound(gateway)
    assert len({i["conversation_id"] for i in items}) == 1
    assert len(slack.calls_of("users.info")) == 1
    contact = await gateway.store.contacts.find_one({"_id": items[0]["contact_id"]})
    assert contact is not None and contact["name"] == "ada"


async def test_mentions_make_one_conversation_per_thread_and_replies_go_there(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    root = new_ts()
    assert (await sender.event(mention(ADA, "hello", ts=root)))[0] == 200
    menu = await slack.until(lambda: with_buttons(slack, SUPPORT))
    assert {m.thread_ts for m in slack.posts(SUPPORT)} == {root}  # all in Ada's thread
    [first] = await inbound(gateway)
    assert first["text"] == "hello"  # the bot's own mention is taken out
    assert first["conversation_ref"]["thread_key"] == f"{SUPPORT}:{root}"

    # a reply in that thread mentioning the bot again: the same conversation
    await sender.event(mention(BOB, "opening hours", thread_ts=root))
    await slack.until(lambda: any("Monday to Friday" in (m.text or "")
                                  for m in slack.posts(SUPPORT)))
    # a plain follow-up in the thread (message.channels, no mention): still that conversation
    await sender.event({**dm(ADA, "returns", channel=SUPPORT, thread_ts=root),
                        "channel_type": "channel"})
    await slack.until(lambda: any("return any item" in (m.text or "")
                                  for m in slack.posts(SUPPORT)))
    assert {m.thread_ts for m in slack.posts(SUPPORT)} == {root}
    items = await inbound(gateway)
    assert [i["text"] for i in items] == ["hello", "opening hours", "returns"]
    assert len({i["conversation_id"] for i in items}) == 1

    # channel chatter that is not addressed to the bot: acknowledged, not stored
    status, _ = await sender.event({**dm(BOB, "lunch?", channel=SUPPORT),
                                    "channel_type": "channel"})
    assert status == 200
    # a new top-level mention opens a second conversation, answered in its own thread
    other = new_ts()
    await sender.event(mention(BOB, "hi", ts=other))
    await slack.until(lambda: any(m.thread_ts == other for m in slack.posts(SUPPORT)))
    items = await inbound(gateway)
    assert len(items) == 4 and "lunch?" not in [i["text"] for i in items]
    assert len({i["conversation_id"] for i in items}) == 2

    # a button pressed in the thread: the choice reaches the bot, the answer the thread
    posted = len(slack.posts(SUPPORT))
    status, _ = await sender.interactive(press(BOB, menu, button(menu, "flow:shipping")))
    assert status == 200
    answer = await slack.until(lambda: next(
        (m for m in slack.posts(SUPPORT)[posted:] if "Shipping is free" in (m.text or "")), None))
    assert answer.thread_ts == root


async def test_a_retried_event_is_stored_and_answered_once(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    event = dm(ADA, "opening hours", channel=DM)
    first = await sender.event(event, event_id="Ev0RETRY")
    again = await sender.event(event, event_id="Ev0RETRY", retry_num=1)
    third = await sender.event(event, event_id="Ev0RETRY", retry_num=2)
    assert first[0] == again[0] == third[0] == 200
    # Slack sends a mention as app_mention and as message (message.channels): once too
    ts = new_ts()
    await sender.event(mention(BOB, "hello", ts=ts))
    await sender.event({**dm(BOB, f"<@{BOT_USER_ID}> hello", channel=SUPPORT, ts=ts),
                        "channel_type": "channel", "thread_ts": ts})
    await gateway.settle()
    items = await inbound(gateway)
    assert [i["text"] for i in items] == ["opening hours", "hello"]
    assert items[0]["channel_data"]["event_id"] == "Ev0RETRY"
    answers = [m for m in slack.posts(DM) if "Monday to Friday" in (m.text or "")]
    assert len(answers) == 1


@pytest.mark.parametrize("age", [305, 3600, -305])
async def test_a_replayed_or_future_request_is_refused(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender, age: int
) -> None:
    # correctly signed, but for a timestamp outside Slack's 300 s window (a few seconds
    # past it: whole-second timestamps and the time the request takes make 301 a coin toss)
    status, _ = await sender.event(dm(ADA, "hello"), timestamp=int(time.time()) - age)
    assert status == 401
    # just inside the window it is accepted (the clock check is the only difference)
    assert (await sender.event(dm(ADA, "hi"), timestamp=int(time.time()) - 290))[0] == 200
    await gateway.settle()
    assert [i["text"] for i in await inbound(gateway)] == ["hi"]


@pytest.mark.parametrize("forge", ["wrong-secret", "tampered-body", "no-signature",
                                   "no-timestamp", "garbage-timestamp", "uppercase-hex"])
async def test_a_bad_signature_is_401_and_nothing_is_stored(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender, forge: str
) -> None:
    body = json.dumps(sender.envelope(dm(ADA, "hello"))).encode()
    now = str(int(time.time()))
    good = sender.sign(body, now)
    headers = {"X-Slack-Request-Timestamp": now, "X-Slack-Signature": good}
    if forge == "wrong-secret":
        other = SlackSender(sender.http, "", "not-the-secret")
        headers["X-Slack-Signature"] = other.sign(body, now)
    elif forge == "tampered-body":
        body = body.replace(b"hello", b"HELLO")
    elif forge == "no-signature":
        del headers["X-Slack-Signature"]
    elif forge == "no-timestamp":
        del headers["X-Slack-Request-Timestamp"]
    elif forge == "garbage-timestamp":
        headers["X-Slack-Request-Timestamp"] = "soon"
    else:
        headers["X-Slack-Signature"] = good.upper().replace("V0=", "v0=")
    async with sender.http.post(sender.url + "/webhooks/slack/events", data=body,
                                headers={"Content-Type": "application/json", **headers}) as r:
        assert r.status == 401
    await gateway.settle()
    assert await gateway.store.messages.count_documents({}) == 0
    assert slack.calls_of("chat.postMessage") == []


async def test_the_bots_own_and_other_bots_messages_are_ignored(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    own = {**dm(BOT_USER_ID, "Hi! I'm the Omnigate demo bot."), "bot_id": BOT_ID,
           "subtype": "bot_message"}
    own_no_subtype = {**dm(BOT_USER_ID, "What can I help you with?"), "bot_id": BOT_ID}
    other_bot = {**dm(ADA, "beep"), "subtype": "bot_message", "bot_id": "B0OTHER"}
    other_bot_user = {**dm(ADA, "boop"), "bot_id": "B0OTHER"}
    system = {**dm(ADA, "<@U0000ADA> has joined the channel"), "subtype": "channel_join"}
    for event in (own, own_no_subtype, other_bot, other_bot_user, system):
        assert (await sender.event(event))[0] == 200
    await gateway.settle()
    assert await gateway.store.messages.count_documents({}) == 0
    assert slack.calls_of("chat.postMessage") == []


async def test_a_button_press_reaches_the_bot_as_the_customers_choice(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    await sender.event(dm(ADA, "hello", channel=DM))
    menu = await slack.until(lambda: with_buttons(slack, DM))
    hours = button(menu, "flow:hours")
    assert hours["text"]["text"] == "Opening hours"
    payload = press(ADA, menu, hours)
    status, _ = await sender.interactive(payload)
    assert status == 200
    answer = await slack.until(lambda: next(
        (m for m in slack.posts(DM) if "Monday to Friday" in (m.text or "")), None))
    assert answer.thread_ts is None
    pressed = (await inbound(gateway))[-1]
    assert (pressed["value"], pressed["text"]) == ("flow:hours", "Opening hours")
    assert pressed["external_id"] == f"action:{DM}:{payload['actions'][0]['action_ts']}"
    # the same press delivered twice is one choice
    assert (await sender.interactive(payload))[0] == 200
    await gateway.settle()
    assert len([i for i in await inbound(gateway) if i["value"] == "flow:hours"]) == 1
    # a press on a message that belongs to no conversation: acknowledged, nothing stored
    stray = Message("D0000STRAY", new_ts(), "old menu", None, {"blocks": menu.blocks})
    assert (await sender.interactive(press(ADA, stray, hours)))[0] == 200
    await gateway.settle()
    assert len(await inbound(gateway)) == 2


async def test_a_store_failure_is_a_5xx_and_the_retry_is_stored(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    slack_connector = connector(gateway)
    real = slack_connector.context

    async def broken(_message: Any) -> Any:
        raise AutoReconnect("store down")

    slack_connector._context = ConnectorContext(ingest=broken, store=real.store)
    event = dm(ADA, "hello", channel=DM)
    status, _ = await sender.event(event, event_id="Ev0DOWN")
    assert status == 503
    payload = {"type": "block_actions", "user": {"id": ADA}, "channel": {"id": DM},
               "actions": [{"action_id": "omnigate:0", "value": "faq:hours",
                            "action_ts": new_ts()}]}
    assert (await sender.interactive(payload))[0] == 200  # no conversation yet: nothing to do
    slack_connector._context = real
    status, _ = await sender.event(event, event_id="Ev0DOWN", retry_num=1)
    assert status == 200
    await gateway.settle()
    assert [i["text"] for i in await inbound(gateway)] == ["hello"]


# ---------------------------------------------------------------- bad input


def event_body(**event: Any) -> bytes:
    envelope = {"type": "event_callback", "team_id": "T0001", "event_id": "Ev0BAD",
                "event": {**dm(ADA, "hello"), **event}}
    return json.dumps(envelope).encode()


FORM = "application/x-www-form-urlencoded"
BAD_BODIES = [
    pytest.param(b"{not json", "application/json", id="malformed-json"),
    pytest.param(b"[1, 2]", "application/json", id="array"),
    pytest.param(b"42", "application/json", id="number"),
    pytest.param(b"[" * 5000 + b"]" * 5000, "application/json", id="nested-too-deep"),
    pytest.param(b"[" * 100_000, "application/json", id="nested-far-too-deep"),
    pytest.param(b"payload=" + b"%5B" * 100_000, FORM, id="form-payload-nested-too-deep"),
    pytest.param(b"\xff\xfe{}", "application/json", id="not-utf8"),
    pytest.param(b"", "application/json", id="empty"),
    pytest.param(b'{"type": "shortcut", "callback_id": "x"}', "application/json",
                 id="unsupported-type"),
    pytest.param(b'{"type": 7}', "application/json", id="type-number"),
    pytest.param(b'{"type": "event_callback"}', "application/json", id="no-event"),
    pytest.param(b'{"type": "event_callback", "event": "message"}', "application/json",
                 id="event-string"),
    pytest.param(b'{"type": "event_callback", "event": {"type": ["message"]}}',
                 "application/json", id="event-type-list"),
    pytest.param(event_body(text=["hi"]), "application/json", id="text-list"),
    pytest.param(event_body(ts="yesterday"), "application/json", id="bad-ts"),
    pytest.param(event_body(ts="99999999999999.1"), "application/json", id="ts-far-future"),
    pytest.param(event_body(channel="D 1"), "application/json", id="bad-channel"),
    pytest.param(event_body(user={"id": ADA}), "application/json", id="user-object"),
    pytest.param(event_body(text="\ud800 broken"), "application/json", id="lone-surrogate"),
    pytest.param(event_body(files=[{"id": "F1", "size": 2**70}]), "application/json",
                 id="file-size-huge"),
    pytest.param(event_body(files="F1"), "application/json", id="files-string"),
    pytest.param(b"type=block_actions", FORM, id="form-no-payload"),
    pytest.param(b"payload=%7Bbad", FORM, id="form-payload-not-json"),
    pytest.param(b"payload=" + json.dumps({"type": "block_actions"}).encode(), FORM,
                 id="actions-missing"),
    pytest.param(b"payload=" + json.dumps({"type": "block_actions", "actions": [{}]}).encode(),
                 FORM, id="action-id-missing"),
    pytest.param(b"payload=" + json.dumps({"type": "block_actions", "actions": [
        {"action_id": "omnigate:0", "value": "faq:hours", "action_ts": "1.2"}]}).encode(),
                 FORM, id="action-no-user"),
]


@pytest.mark.parametrize(("body", "content_type"), BAD_BODIES)
async def test_bad_bodies_get_a_400_and_nothing_is_stored(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender, body: bytes, content_type: str
) -> None:
    for path in ("/webhooks/slack/events", "/webhooks/slack/interactive"):
        status, text = await sender.post(path, body, content_type=content_type)
        assert status == 400, text
        assert json.loads(text)["message"]
    assert await gateway.store.messages.count_documents({}) == 0
    # and the gateway keeps serving
    assert (await sender.event(dm(ADA, "hello")))[0] == 200


async def test_events_we_do_not_handle_are_acknowledged_and_not_stored(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    others = [
        {"type": "reaction_added", "user": ADA, "reaction": "thumbsup",
         "item": {"type": "message", "channel": DM, "ts": new_ts()}, "event_ts": new_ts()},
        {"type": "app_home_opened", "user": ADA, "channel": DM, "tab": "messages"},
        {**dm(ADA, "hello"), "subtype": "message_deleted", "deleted_ts": new_ts()},
    ]
    for event in others:
        assert (await sender.event(event))[0] == 200
    rate_limited = {"token": "t", "type": "app_rate_limited", "team_id": "T0001",
                    "minute_rate_limited": 1518467820, "api_app_id": "A0001"}
    status, _ = await sender.post("/webhooks/slack/events", json.dumps(rate_limited).encode())
    assert status == 200
    await gateway.settle()
    assert await gateway.store.messages.count_documents({}) == 0


async def test_an_edited_message_keeps_its_first_version(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    original = dm(ADA, "my order 1243", channel=DM)
    await sender.event(original)
    edited = {"type": "message", "subtype": "message_changed", "channel": DM,
              "channel_type": "im", "hidden": True, "ts": new_ts(), "event_ts": new_ts(),
              "message": {"type": "message", "user": ADA, "text": "my order 1234",
                          "ts": original["ts"], "edited": {"user": ADA, "ts": new_ts()}},
              "previous_message": {"type": "message", "user": ADA, "text": "my order 1243",
                                   "ts": original["ts"]}}
    assert (await sender.event(edited))[0] == 200
    [item] = await inbound(gateway)
    assert item["text"] == "my order 1234"
    assert [e["text"] for e in item["edits"]] == ["my order 1243"]


async def test_slacks_ssl_check_is_answered(gateway: Gateway, sender: SlackSender) -> None:
    status, _ = await sender.post("/webhooks/slack/events", b"ssl_check=1&token=legacy",
                                  content_type=FORM)
    assert status == 200


@pytest.mark.parametrize("slack", [2], indirect=True)
async def test_until_auth_test_works_events_are_refused_with_a_5xx(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    # auth.test failed at start-up and fails once more: we cannot tell the bot's own
    # messages apart, so the event is refused (Slack retries it), not taken
    event = dm(ADA, "hello", channel=DM)
    assert (await sender.event(event))[0] == 500
    assert await gateway.store.messages.count_documents({}) == 0
    # url_verification does not need it
    body = json.dumps({"type": "url_verification", "challenge": "c"}).encode()
    assert (await sender.post("/webhooks/slack/events", body))[0] == 200
    # Slack's retry, once auth.test works again, is taken
    assert (await sender.event(event, retry_num=1))[0] == 200
    assert [c.error for c in slack.calls_of("auth.test")] == ["invalid_auth"] * 2 + [None]
    await slack.until(lambda: with_buttons(slack, DM))
