"""Slack, sending: chat.postMessage through the outbox, Slack's errors, agents' replies.

Same setup as tests/test_slack.py: the whole gateway, the local Slack of
tests/fakes/slack_api.py behind OMNIGATE_SLACK_API_URL, events signed as Slack signs them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from connectors.slack import SlackConnector
from gateway.keys import CONNECTORS
from gateway.settings import Settings
from tests.conftest import Gateway
from tests.fakes.slack_api import (
    ALL_SCOPES,
    BOT_TOKEN,
    SIGNING_SECRET,
    FakeSlack,
    Message,
    SlackSender,
    dm,
    mention,
    new_ts,
)

ADA = "U0000ADA"
BOB = "U0000BOB"
DM = "D0000USER1"
SUPPORT = "C0000SUPPORT"


@pytest.fixture
async def slack(request: pytest.FixtureRequest) -> AsyncIterator[FakeSlack]:
    """The local Slack; ``indirect`` parametrization sets the bot token's scopes."""
    fake = await FakeSlack(scopes=getattr(request, "param", ALL_SCOPES)).start()
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


def with_buttons(slack: FakeSlack, channel: str) -> Message | None:
    return next((m for m in reversed(slack.posts(channel)) if m.buttons), None)


# ------------------------------------------------------------------ sending


def texts(slack: FakeSlack, channel: str) -> list[str]:
    return [m.text or "" for m in slack.posts(channel)]


async def test_429_retry_after_is_waited_out_without_posting_twice(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    slack.fail("chat.postMessage", status=429, retry_after=1)
    await sender.event(dm(ADA, "hello", channel=DM))
    await slack.until(lambda: with_buttons(slack, DM))
    await gateway.settle()
    calls = slack.calls_of("chat.postMessage")
    assert [c.status for c in calls] == [429, 200, 200]
    assert calls[1].at - calls[0].at >= 1.0  # slack_sdk's handler honoured Retry-After
    assert calls[0].params["text"] == calls[1].params["text"]  # the same message, once
    assert len(texts(slack, DM)) == len(set(texts(slack, DM))) == 2
    replies = await stored(gateway, direction="out")
    assert [r["delivery"]["attempts"] for r in replies] == [1, 1]  # waited in place


async def test_a_long_retry_after_goes_back_to_the_outbox(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    slack_connector = connector(gateway)
    slack_connector.rate_limit_retry.max_wait = 0.5  # Slack asks for more than we wait inline
    slack.fail("chat.postMessage", status=429, retry_after=2)
    await sender.event(dm(ADA, "opening hours", channel=DM))
    first = await slack.until(lambda: slack.calls_of("chat.postMessage"))
    await slack.until(lambda: any("Monday to Friday" in t for t in texts(slack, DM)), timeout=15)
    calls = slack.calls_of("chat.postMessage")
    assert [c.status for c in calls][:2] == [429, 200]
    assert calls[1].at - first[0].at >= 2.0
    await gateway.settle()
    replies = await stored(gateway, direction="out")
    assert [r["delivery"]["status"] for r in replies] == ["delivered"] * len(replies)
    assert replies[0]["delivery"]["attempts"] == 2  # rescheduled by the outbox, not slept on
    assert all(texts(slack, DM).count(r["text"]) == 1 for r in replies)


@pytest.mark.parametrize("where", ["dm", "thread"])
async def test_a_post_whose_answer_was_lost_is_not_posted_again(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender, where: str
) -> None:
    # Slack posts the message, then the connection drops before the answer arrives: the
    # outbox retries, and the connector finds its earlier post instead of posting again.
    slack.fail("chat.postMessage", drop=True)
    root = new_ts()
    if where == "dm":
        await sender.event(dm(ADA, "hello", channel=DM))
        channel, lookup = DM, "conversations.history"
    else:
        await sender.event(mention(ADA, "hello", ts=root))
        channel, lookup = SUPPORT, "conversations.replies"
    await slack.until(lambda: with_buttons(slack, channel))
    await gateway.settle()
    posts = texts(slack, channel)
    assert len(posts) == len(set(posts)) == 2  # greeting and menu, each once
    assert [c.status for c in slack.calls_of("chat.postMessage")] == [200, 200]
    [check] = slack.calls_of(lookup)
    assert check.params["channel"] == channel
    if where == "thread":
        assert check.params["ts"] == root
    replies = await stored(gateway, direction="out")
    assert [r["delivery"]["attempts"] for r in replies] == [2, 1]
    assert replies[0]["delivery"]["external_id"] == slack.posts(channel)[0].ts


async def test_invalid_auth_fails_at_once_and_is_not_retried(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    slack.fail("chat.postMessage", error="invalid_auth")
    await sender.event(dm(ADA, "hello", channel=DM))
    await slack.until(lambda: with_buttons(slack, DM))
    await gateway.settle()
    greeting, menu = await stored(gateway, direction="out")
    assert greeting["delivery"]["status"] == "failed"
    assert greeting["delivery"]["attempts"] == 1
    assert "invalid_auth" in greeting["delivery"]["last_error"]
    assert menu["delivery"]["status"] == "delivered"
    assert len(slack.calls_of("chat.postMessage")) == 2
    identity = await gateway.store.identities.find_one({"_id": f"slack:{ADA}"})
    assert identity is not None and identity["reachable"] is True  # the token, not Ada


async def test_channel_not_found_fails_and_marks_the_customer_unreachable(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    gone = "X0000GONE"  # the fake answers channel_not_found for it
    await sender.event(dm(ADA, "hello", channel=gone))
    await slack.until(lambda: len(slack.calls_of("chat.postMessage")) == 2)
    await gateway.settle()
    replies = await stored(gateway, direction="out")
    assert [(r["delivery"]["status"], r["delivery"]["attempts"]) for r in replies] == [
        ("failed", 1), ("failed", 1)]
    assert all("channel_not_found" in r["delivery"]["last_error"] for r in replies)
    identity = await gateway.store.identities.find_one({"_id": f"slack:{ADA}"})
    assert identity is not None
    assert (identity["reachable"], identity["unreachable_reason"]) == (False, "channel_not_found")


async def test_transient_slack_errors_are_retried(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    slack.fail("chat.postMessage", error="internal_error")
    slack.fail("chat.postMessage", status=503, error="service_unavailable")
    await sender.event(dm(ADA, "hello", channel=DM))
    await slack.until(lambda: with_buttons(slack, DM), timeout=15)
    await gateway.settle()
    replies = await stored(gateway, direction="out")
    assert [r["delivery"]["status"] for r in replies] == ["delivered", "delivered"]
    assert replies[0]["delivery"]["attempts"] == 3
    assert len(texts(slack, DM)) == 2


async def test_a_long_reply_is_posted_in_parts_each_once(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    await sender.event(dm(ADA, "human please", channel=DM))
    await gateway.settle()
    [conversation] = await gateway.store.conversations.find({"channel": "slack"}).to_list()
    _, alice = await gateway.agent("Alice")
    api = f"{gateway.url}/api/v1/conversations/{conversation['_id']}"
    assert (await gateway.http.post(api + "/claim", headers=alice)).status == 200
    await gateway.settle()
    before = len(slack.posts(DM))
    paragraph = "Tom & Jerry <tm> " * 58  # 986 characters, 1,566 once escaped
    slack.fail("chat.postMessage", drop=True)  # the first part's answer is lost
    response = await gateway.http.post(api + "/messages", headers=alice,
                                       json={"text": "\n".join([paragraph] * 4)})
    assert response.status == 201
    await gateway.settle(timeout=15)
    parts = slack.posts(DM)[before:]
    assert len(parts) == 3  # 6,264 escaped characters in sections of at most 3,000
    assert all(len(p.text or "") <= 3000 for p in parts)
    assert len({p.ts for p in parts}) == 3
    assert "".join(p.text or "" for p in parts).count("Tom &amp; Jerry &lt;tm&gt;") == 232
    assert all(p.params["username"] == "Alice" for p in parts)
    reply = (await stored(gateway, direction="out"))[-1]
    assert reply["delivery"]["attempts"] == 2 and reply["delivery"]["parts_sent"] == 2
    assert reply["delivery"]["external_id"] == parts[-1].ts


# ------------------------------------------------------------------ handoff


async def test_handoff_agent_reply_arrives_in_the_dm_with_the_agents_name(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    api, http = gateway.url + "/api/v1", gateway.http
    await sender.event(dm(ADA, "hello", channel=DM))
    await slack.until(lambda: with_buttons(slack, DM))
    # the customer asks for a human, in words
    await sender.event(dm(ADA, "I want to talk to a human please", channel=DM))
    await slack.until(lambda: any("bringing in a human" in t for t in texts(slack, DM)))
    await gateway.settle()

    _, alice = await gateway.agent("Alice")
    queue = await (await http.get(api + "/conversations", headers=alice)).json()
    [conversation] = queue["items"]
    assert conversation["owner"] == "queued" and conversation["channel"] == "slack"
    assert conversation["contact"]["name"] == "ada"
    assert conversation["handoff"]["reason"] == "customer asked for a human"
    cid = conversation["id"]
    stored_conversation = await gateway.store.get_conversation(cid)
    assert stored_conversation is not None and stored_conversation.thread_key == DM
    assert (await http.post(f"{api}/conversations/{cid}/claim", headers=alice)).status == 200
    joined = await slack.until(lambda: next(
        (m for m in slack.posts(DM) if "Alice joined" in (m.text or "")), None))
    assert joined.blocks[0]["type"] == "context"  # an event: a small grey line
    assert "username" not in joined.params  # events speak as the app

    reply = await http.post(f"{api}/conversations/{cid}/messages", headers=alice,
                            json={"text": "Hi Ada, Alice here. How can I help?"})
    assert reply.status == 201
    got = await slack.until(lambda: next(
        (m for m in slack.posts(DM) if "Alice here" in (m.text or "")), None))
    assert got.channel == DM and got.thread_ts is None
    assert got.params["username"] == "Alice"
    assert got.text == "Hi Ada, Alice here. How can I help?"

    # while Alice owns it, the customer's messages reach her, and the bot stays silent
    bot_posts = len(slack.posts(DM))
    await sender.event(dm(ADA, "hello?", channel=DM))
    await gateway.settle()
    assert len(slack.posts(DM)) == bot_posts
    history = await (await http.get(f"{api}/conversations/{cid}/messages",
                                    headers=alice)).json()
    assert history["items"][0]["text"] == "hello?"
    statuses = await gateway.store.messages.distinct("delivery.status", {"conversation_id": cid})
    assert statuses == ["delivered"]


async def test_handoff_in_a_thread_the_agent_replies_in_that_thread(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    root = new_ts()
    await sender.event(mention(ADA, "I want to talk to a human", ts=root))
    await slack.until(lambda: any("bringing in a human" in t for t in texts(slack, SUPPORT)))
    await gateway.settle()
    _, bob = await gateway.agent("Bob")
    [conversation] = (await (await gateway.http.get(
        gateway.url + "/api/v1/conversations", headers=bob)).json())["items"]
    stored_conversation = await gateway.store.get_conversation(conversation["id"])
    assert stored_conversation is not None
    assert stored_conversation.thread_key == f"{SUPPORT}:{root}"
    api = f"{gateway.url}/api/v1/conversations/{conversation['id']}"
    await gateway.http.post(api + "/claim", headers=bob)
    await gateway.http.post(api + "/messages", headers=bob, json={"text": "On it."})
    got = await slack.until(lambda: next(
        (m for m in slack.posts(SUPPORT) if m.text == "On it."), None))
    assert (got.channel, got.thread_ts, got.params["username"]) == (SUPPORT, root, "Bob")


@pytest.mark.parametrize("slack", [ALL_SCOPES.replace(",chat:write.customize", "")],
                         indirect=True)
async def test_without_chat_write_customize_the_name_is_in_the_text(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    await sender.event(dm(ADA, "talk to a human", channel=DM))
    await gateway.settle()
    _, alice = await gateway.agent("Alice")
    [conversation] = await gateway.store.conversations.find({"channel": "slack"}).to_list()
    api = f"{gateway.url}/api/v1/conversations/{conversation['_id']}"
    await gateway.http.post(api + "/claim", headers=alice)
    await gateway.http.post(api + "/messages", headers=alice, json={"text": "Hello <3"})
    got = await slack.until(lambda: next(
        (m for m in slack.posts(DM) if "Hello" in (m.text or "")), None))
    assert got.text == "*Alice:* Hello &lt;3"
    assert "username" not in got.params
