"""Rate limits on a real gateway with low limits: hellos per address, messages per
visitor, webhook requests per address. Over the limit nothing is stored and the server
goes on serving; after ``retry_after`` the same request succeeds.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import WSMsgType

from connectors.telegram.inbound import message_key
from gateway.settings import Settings
from tests.conftest import Gateway, Visitor, running_gateway
from tests.fakes.telegram_api import FakeTelegram, People
from tests.test_bad_input import TELEGRAM_SECRET, telegram_webhook_gateway


async def closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> int | None:
    while True:
        frame = await ws.receive(timeout)
        if frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            return ws.close_code


async def test_hellos_over_the_per_address_limit_get_rate_limited_and_4429(
    settings: Settings,
) -> None:
    limited = settings.model_copy(update={"webchat_connects_per_minute": 3})  # burst 3
    async with running_gateway(limited) as gateway:
        visitors = [Visitor(gateway) for _ in range(3)]
        for v in visitors:
            await v.connect()
        ws = await gateway.socket()
        await ws.send_json({"type": "hello", "token": None, "watermark": None})
        frame = await ws.receive_json(timeout=10)
        assert (frame["type"], frame["code"]) == ("error", "rate_limited")
        assert 0 < frame["retry_after"] <= 20  # one hello comes back every 20 s
        assert isinstance(frame["message"], str) and frame["message"]
        assert await closed_with(ws) == 4429
        # a returning visitor counts too (every hello costs the server reads)
        ws = await gateway.socket()
        await ws.send_json({"type": "hello", "token": visitors[0].token, "watermark": None})
        assert (await ws.receive_json(timeout=10))["code"] == "rate_limited"
        assert await closed_with(ws) == 4429
        # the sockets already open go on serving
        ack = await visitors[0].say("hello")
        assert ack["duplicate"] is False
        await visitors[0].until(lambda f: f["role"] == "bot")
        for v in visitors:
            await v.close()


async def test_messages_over_the_limit_are_refused_unstored_then_accepted_after_retry_after(
    settings: Settings,
) -> None:
    # burst 2, then one message every 5 s, per visitor
    limited = settings.model_copy(update={"webchat_messages_per_minute": 12,
                                          "webchat_message_burst": 2})
    async with running_gateway(limited) as gateway:
        visitor = Visitor(gateway)
        visitor_id = (await visitor.connect())["welcome"]["visitor_id"]
        assert visitor.ws is not None
        ids = [f"c{uuid.uuid4().hex[:12]}" for _ in range(3)]
        for client_id, text in zip(ids, ("hello", "opening hours", "shipping costs"),
                                   strict=True):
            await visitor.ws.send_json({"type": "message", "client_id": client_id, "text": text})
        acks: dict[str, dict[str, object]] = {}
        refused = None
        while len(acks) < 2 or refused is None:
            frame = await visitor.recv()
            if frame["type"] == "ack":
                acks[str(frame["client_id"])] = frame
            elif frame["type"] == "error":
                refused = frame
        assert set(acks) == set(ids[:2])
        assert refused["code"] == "rate_limited" and refused["client_id"] == ids[2]
        retry_after = refused["retry_after"]
        assert isinstance(retry_after, float | int) and 0 < retry_after <= 5
        stored = gateway.store.messages
        assert await stored.count_documents({"external_id": f"{visitor_id}:{ids[2]}"}) == 0
        # the socket stays open; after retry_after the same message is stored and answered
        await visitor.ws.send_json({"type": "ping"})
        await visitor.next_frame("pong")
        await asyncio.sleep(math.ceil(retry_after * 10) / 10 + 0.05)
        await visitor.ws.send_json({"type": "message", "client_id": ids[2],
                                    "text": "shipping costs"})
        ack = await visitor.next_frame("ack", timeout=15)
        assert (ack["client_id"], ack["duplicate"]) == (ids[2], False)
        assert await stored.count_documents({"external_id": f"{visitor_id}:{ids[2]}"}) == 1
        await visitor.until(lambda f: f["role"] == "bot" and f["seq"] > ack["seq"])
        await visitor.close()


@pytest.fixture
async def webhooks(settings: Settings) -> AsyncIterator[tuple[Gateway, FakeTelegram]]:
    """A gateway with Telegram by webhook (local fake Bot API), 1 request/s per address."""
    async with telegram_webhook_gateway(settings, webhook_requests_per_second=1) as both:
        yield both


async def test_webhooks_over_the_limit_get_429_with_retry_after_and_nothing_stored(
    webhooks: tuple[Gateway, FakeTelegram],
) -> None:
    gateway, telegram = webhooks
    url = gateway.url + "/webhooks/telegram"
    people = People(telegram)
    ann = People.user(1001)
    refused = None
    for _ in range(20):  # burst 2: well before 20 a request is refused
        update = people.message(ann, text="hello")
        async with gateway.http.post(url, json=update, headers={
                "X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET}) as response:
            if response.status == 429:
                refused = (update, response.headers.get("Retry-After"), await response.json())
                break
            assert response.status == 200
    assert refused is not None, "never limited"
    update, retry_after, body = refused
    assert retry_after is not None and int(retry_after) >= 1
    assert body["error"] == "rate_limited" and body["retry_after"] == int(retry_after)
    key = message_key(update["message"]["chat"]["id"], update["message"]["message_id"])
    assert await gateway.store.find_by_external_id("telegram", key) is None
    # the limit is per address over every /webhooks/ endpoint (Slack's too), checked
    # before any handler: here Slack is off, and the answer is still 429, not 404
    statuses = []
    for _ in range(20):
        async with gateway.http.post(gateway.url + "/webhooks/slack/events",
                                     data=b"{}") as slack:
            statuses.append(slack.status)
            if slack.status == 429:
                assert slack.headers.get("Retry-After") is not None
                break
    assert statuses[-1] == 429 and set(statuses) <= {404, 429}
    # other routes are not limited; the webhook serves again after Retry-After
    async with gateway.http.get(gateway.url + "/healthz") as health:
        assert health.status == 200
    await asyncio.sleep(int(retry_after) + 0.1)
    status, answer = await telegram.deliver(gateway.http, url, update, TELEGRAM_SECRET)
    assert (status, answer["outcome"]) == (200, "stored")
    assert await gateway.store.find_by_external_id("telegram", key) is not None
