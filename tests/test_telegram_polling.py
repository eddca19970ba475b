"""Telegram by long polling: getUpdates in a background task, the offset kept in the store
so that a restart neither loses nor re-ingests an update."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pymongo.errors import AutoReconnect

from gateway.app import create_app
from gateway.keys import CONNECTORS
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import Gateway
from tests.fakes.telegram_api import FakeTelegram, People

TOKEN = "654321:POLL-token_xyz"
GREETING = "Hi! I'm the Omnigate demo bot."
HOURS = "We're open Monday to Friday"


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(token=TOKEN)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def settings(settings: Settings, telegram: FakeTelegram) -> Settings:
    return settings.model_copy(update={
        "telegram_token": TOKEN, "telegram_mode": "polling", "telegram_api_url": telegram.url})


@pytest.fixture
def people(telegram: FakeTelegram) -> People:
    return People(telegram)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Gateway]:
    """A gateway on the test's database, stopped (not dropped) at the end of the block."""
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    gateway = Gateway(server, app)
    try:
        yield gateway
    finally:
        await gateway.close()
        await server.close()


def replies_to(telegram: FakeTelegram, chat_id: int, prefix: str) -> list[str]:
    return [t for t in telegram.texts(chat_id) if t.startswith(prefix)]


async def test_polling_message_in_bot_reply_out(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    ann = people.user(3001)
    update = telegram.push(people.message(ann, text="what are your opening hours?"))
    await telegram.wait_for(lambda: replies_to(telegram, 3001, HOURS))
    assert telegram.of("deleteWebhook")  # getUpdates is refused while a webhook is set
    first = telegram.of("getUpdates", ok=None)[0].params
    assert first["allowed_updates"] == ["message", "edited_message", "callback_query",
                                        "my_chat_member"]
    assert first["timeout"] > 0  # long polling
    stored = await gateway.store.find_by_external_id(
        "telegram", f"3001:{update['message']['message_id']}")
    assert stored is not None and stored.channel_data["update_id"] == update["update_id"]
    # the next request confirms it, and the offset is in the store
    state = await telegram.wait_for(lambda: telegram.of("getUpdates", ok=None)[-1].params.get(
        "offset") == update["update_id"] + 1)
    assert state
    saved = await gateway.store.get_state("telegram", "polling")
    assert saved is not None and saved["offset"] == update["update_id"] + 1
    # a button press comes in the same way, and is answered
    menu = telegram.of("sendMessage")[-1].result
    press = telegram.push(people.press(ann, menu, "flow:returns_policy"))
    await telegram.wait_for(lambda: press["callback_query"]["id"] in telegram.answered)
    await telegram.wait_for(lambda: replies_to(telegram, 3001, "You can return"))


async def test_restart_neither_loses_nor_reingests(
    settings: Settings, store: Store, telegram: FakeTelegram, people: People
) -> None:
    ann, ben = people.user(3002, "Ann"), people.user(3003, "Ben")
    async with running(settings) as gateway:
        first = [telegram.push(people.message(ann, text="hello")),
                 telegram.push(people.message(ben, text="hello"))]
        await telegram.wait_for(lambda: telegram.texts(3002) and telegram.texts(3003))
        await gateway.settle()
        await telegram.wait_for(lambda: not telegram.pending)  # confirmed by the next poll
        saved = await store.get_state("telegram", "polling")
        assert saved is not None and saved["offset"] == first[-1]["update_id"] + 1
    polls_before = len(telegram.of("getUpdates", ok=None))
    # while the gateway is down, the customer writes again
    later = telegram.push(people.message(ann, text="what are your opening hours?"))
    async with running(settings) as gateway:
        await telegram.wait_for(lambda: replies_to(telegram, 3002, HOURS))
        await gateway.settle()
        resumed = telegram.of("getUpdates", ok=None)[polls_before].params
        assert resumed["offset"] == first[-1]["update_id"] + 1  # from the stored offset
    assert await store.messages.count_documents({"direction": "in"}) == 3
    assert len(replies_to(telegram, 3002, GREETING)) == 1  # hello answered once
    assert len(replies_to(telegram, 3003, GREETING)) == 1
    assert (await store.get_state("telegram", "polling") or {})["offset"] == (
        later["update_id"] + 1)


async def test_store_outage_while_polling_loses_nothing(
    gateway: Gateway, telegram: FakeTelegram, people: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = {"left": 2}
    append = gateway.store.append_inbound

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise AutoReconnect("store down (test)")
        return await append(*args, **kwargs)

    monkeypatch.setattr(gateway.store, "append_inbound", flaky)
    monkeypatch.setattr(gateway.app[CONNECTORS]["telegram"], "poll_timeout", 1)
    update = telegram.push(people.message(people.user(3004), text="shipping costs"))
    await telegram.wait_for(lambda: replies_to(telegram, 3004, "Shipping is free"),
                            timeout=20)
    assert failures["left"] == 0
    # the update was asked for again (same offset) until it was stored
    offsets = [c.params.get("offset") for c in telegram.of("getUpdates", ok=None)]
    assert offsets.count(offsets[0]) >= 3
    await gateway.settle()
    assert await gateway.store.messages.count_documents({"direction": "in"}) == 1
    item = await gateway.store.find_by_external_id(
        "telegram", f"3004:{update['message']['message_id']}")
    assert item is not None


async def test_a_webhook_set_elsewhere_is_removed_and_polling_goes_on(
    settings: Settings, store: Store, telegram: FakeTelegram, people: People
) -> None:
    telegram.webhook = {"url": "https://old.example/hook", "secret_token": None}
    async with running(settings):
        telegram.push(people.message(people.user(3005), text="hello"))
        await telegram.wait_for(lambda: telegram.texts(3005))
    assert telegram.webhook is None


async def test_stop_ends_the_long_poll_at_once_and_closes_the_session(
    settings: Settings, store: Store, telegram: FakeTelegram
) -> None:
    async with running(settings) as gateway:
        await telegram.wait_for(lambda: telegram.of("getUpdates", ok=None))  # waiting now
        connector = gateway.app[CONNECTORS]["telegram"]
        poller = connector._poller
        session = connector.bot.session
        started = time.monotonic()
        await connector.stop()
        assert time.monotonic() - started < 3
    assert poller is not None and poller.done()  # the lease runner: stopped, not holding
    assert not poller.holding.is_set()
    assert session._session is None or session._session.closed
    # the webhook route says this gateway polls
    async with running(settings) as gateway, gateway.http.post(
            gateway.url + "/webhooks/telegram", json={"update_id": 1}) as response:
        assert response.status == 404
