"""Slack in Socket Mode: apps.connections.open, then envelopes over a WebSocket.

The real slack_sdk SocketModeClient (through bolt's AsyncSocketModeHandler) connects to the
fake's apps.connections.open and WebSocket; an envelope is acknowledged only once stored.
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
    APP_TOKEN,
    BOT_TOKEN,
    FakeSlack,
    SlackSender,
    dm,
    press,
)

ADA = "U0000ADA"
DM = "D0000USER1"


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    fake.add_user(ADA, "Ada Lovelace", display_name="ada")
    yield fake
    await fake.close()


@pytest.fixture
def settings(settings: Settings, slack: FakeSlack) -> Settings:
    return settings.model_copy(update={
        "slack_bot_token": BOT_TOKEN, "slack_app_token": APP_TOKEN,
        "slack_api_url": slack.api_url,
    })


@pytest.fixture
async def connected(gateway: Gateway, slack: FakeSlack) -> FakeSlack:
    await slack.until(lambda: slack.sockets, what="the Socket Mode connection")
    return slack


async def acked(slack: FakeSlack, envelope_id: str) -> dict[str, Any]:
    ack: dict[str, Any] = await slack.until(lambda: slack.acks.get(envelope_id),
                                            what=f"the ack of {envelope_id}")
    return ack


async def inbound(gateway: Gateway) -> list[dict[str, Any]]:
    cursor = gateway.store.messages.find({"channel": "slack", "direction": "in"})
    return await cursor.sort("created_at", 1).to_list()


async def test_socket_mode_message_is_acked_once_stored_and_answered(
    gateway: Gateway, connected: FakeSlack
) -> None:
    slack = connected
    [opened] = slack.calls_of("apps.connections.open")
    assert opened.token == APP_TOKEN
    envelope_id = await slack.socket_send(SlackSender.envelope(dm(ADA, "hello", channel=DM)))
    assert await acked(slack, envelope_id) == {"envelope_id": envelope_id}
    [item] = await inbound(gateway)  # stored before the ack went out
    assert item["text"] == "hello" and item["conversation_ref"]["thread_key"] == DM
    menu = await slack.until(lambda: next((m for m in slack.posts(DM) if m.buttons), None))

    # a button press arrives as an interactive envelope
    hours = next(b for b in menu.buttons if b["value"] == "flow:hours")
    envelope_id = await slack.socket_send(press(ADA, menu, hours), kind="interactive")
    await acked(slack, envelope_id)
    await slack.until(lambda: any("Monday to Friday" in (m.text or "")
                                  for m in slack.posts(DM)))
    # Slack redelivers an envelope it thinks was lost: stored once, answered once
    event = dm(ADA, "shipping costs", channel=DM)
    for attempt in range(2):
        sent = await slack.socket_send(SlackSender.envelope(event), retry_attempt=attempt)
        await acked(slack, sent)
    await gateway.settle()
    assert [i["text"] for i in await inbound(gateway)] == ["hello", "Opening hours",
                                                          "shipping costs"]
    assert sum("Shipping is free" in (m.text or "") for m in slack.posts(DM)) == 1


async def test_socket_mode_store_failure_leaves_the_envelope_unacked(
    gateway: Gateway, connected: FakeSlack
) -> None:
    slack = connected
    connector = gateway.app[CONNECTORS]["slack"]
    assert isinstance(connector, SlackConnector)
    real = connector.context
    tried: list[Any] = []

    async def broken(message: Any) -> Any:
        tried.append(message)
        raise AutoReconnect("store down")

    connector._context = ConnectorContext(ingest=broken, store=real.store)
    event = dm(ADA, "hello", channel=DM)
    lost = await slack.socket_send(SlackSender.envelope(event))
    await slack.until(lambda: tried, what="the ingest attempt")
    connector._context = real
    # a later envelope is acknowledged; the failed one never was, so Slack sends it again
    await acked(slack, await slack.socket_send(SlackSender.envelope(dm(ADA, "shipping costs"))))
    assert lost not in slack.acks
    await acked(slack, await slack.socket_send(SlackSender.envelope(event), retry_attempt=1))
    await gateway.settle()
    assert sorted(i["text"] for i in await inbound(gateway)) == ["hello", "shipping costs"]


async def test_socket_mode_bad_envelopes_are_dropped_and_nothing_is_stored(
    gateway: Gateway, connected: FakeSlack
) -> None:
    slack = connected
    for payload in ({"type": "event_callback", "event": "message"},
                    {"type": "event_callback", "event": {**dm(ADA, "hi"), "ts": "soon"}},
                    {"type": "block_actions", "actions": []}):
        await acked(slack, await slack.socket_send(payload))
    await gateway.settle()
    assert await gateway.store.messages.count_documents({}) == 0


async def test_socket_mode_reconnects_when_slack_asks(
    gateway: Gateway, connected: FakeSlack
) -> None:
    slack = connected
    await slack.sockets[-1].send_json({"type": "disconnect", "reason": "refresh_requested",
                                       "debug_info": {"host": "fake"}})
    await slack.until(lambda: slack.socket_opens >= 2, what="a second connection")
    assert len(slack.calls_of("apps.connections.open")) >= 2
    await acked(slack, await slack.socket_send(SlackSender.envelope(dm(ADA, "hello", channel=DM))))
    assert [i["text"] for i in await inbound(gateway)] == ["hello"]


async def test_http_events_are_off_without_a_signing_secret(
    gateway: Gateway, connected: FakeSlack
) -> None:
    # even correctly signed with some secret: without ours configured, nothing is taken
    sender = SlackSender(gateway.http, gateway.url, secret="anything")
    body = json.dumps(SlackSender.envelope(dm(ADA, "hello"))).encode()
    status, text = await sender.post("/webhooks/slack/events", body,
                                     timestamp=int(time.time()))
    assert status == 404 and "Socket Mode" in json.loads(text)["message"]
    assert await gateway.store.messages.count_documents({}) == 0
