"""GET /metrics (docs/metrics.md), /healthz and /readyz on a real gateway and store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import Settings
from tests.conftest import Gateway, Visitor, running_gateway
from tests.fakes.telegram_api import FakeTelegram

TOKEN = "123456:METRICS-token"
SECRET = "metrics-secret"

DOCUMENTED = {  # docs/metrics.md: name -> (type, labels)
    "omnigate_messages": ("counter", {"channel", "direction"}),
    "omnigate_turn_seconds": ("histogram", set()),
    "omnigate_store_commands": ("counter", {"command"}),
    "omnigate_store_command_failures": ("counter", {"command"}),
    "omnigate_store_command_seconds": ("histogram", {"command"}),
    "omnigate_outbox_pending": ("gauge", set()),
    "omnigate_outbox_failed": ("counter", {"channel"}),
    "omnigate_webhook_requests": ("counter", {"channel", "status"}),
    "omnigate_queue_waiting": ("gauge", set()),
    "omnigate_agents_online": ("gauge", set()),
}


async def scrape(gateway: Gateway, headers: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    async with gateway.http.get(gateway.url + "/metrics", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain"
        text = await response.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, sample: str | None = None,
          **labels: str) -> float:
    total = 0.0
    for s in families[name].samples:
        if (sample is None or s.name == sample) and all(
                s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


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
        "telegram_webhook_secret": SECRET, "telegram_webhook_url": "https://example.com/tg",
        "telegram_api_url": telegram.url})


async def test_every_documented_metric_is_exposed_with_its_labels(gateway: Gateway,
                                                                  visitor: Visitor) -> None:
    await visitor.connect()
    await visitor.say("what are your opening hours?")
    await visitor.until(lambda i: i.get("role") == "bot" and "Monday" in i.get("text", ""))
    families = await scrape(gateway)
    for name, (kind, labels) in DOCUMENTED.items():
        assert name in families, name
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert labels <= set(sample.labels), (name, sample)
    assert "process_cpu_seconds" in families  # the process collector
    assert value(families, "omnigate_messages", "omnigate_messages_total",
                 channel="webchat", direction="in") >= 1
    assert value(families, "omnigate_messages", "omnigate_messages_total",
                 channel="webchat", direction="out") >= 1
    assert value(families, "omnigate_turn_seconds", "omnigate_turn_seconds_count") >= 1


async def test_store_commands_are_counted_by_command(gateway: Gateway,
                                                     visitor: Visitor) -> None:
    await visitor.connect()
    await visitor.say("hello")
    await visitor.until(lambda i: i.get("role") == "bot")
    before = await scrape(gateway)
    await visitor.say("what are your opening hours?")
    await visitor.until(lambda i: i.get("role") == "bot" and "Monday" in i.get("text", ""))
    await gateway.settle()
    after = await scrape(gateway)
    name, sample = "omnigate_store_commands", "omnigate_store_commands_total"
    assert value(after, name, sample) > value(before, name, sample)
    assert value(after, name, sample, command="insert") > value(before, name, sample,
                                                                command="insert")
    timed = value(after, "omnigate_store_command_seconds",
                  "omnigate_store_command_seconds_count")
    assert timed > 0


async def test_webhook_answers_are_counted_by_status(gateway: Gateway,
                                                     telegram: FakeTelegram) -> None:
    update = {"update_id": 1, "message": {
        "message_id": 1, "date": 1, "text": "hi",
        "from": {"id": 5, "is_bot": False, "first_name": "A"},
        "chat": {"id": 5, "type": "private", "first_name": "A"}}}
    url = gateway.url + "/webhooks/telegram"
    async with gateway.http.post(url, json=update, headers={
            "X-Telegram-Bot-Api-Secret-Token": "wrong"}) as response:
        assert response.status == 403
    async with gateway.http.post(url, json=update, headers={
            "X-Telegram-Bot-Api-Secret-Token": SECRET}) as response:
        assert response.status == 200
    families = await scrape(gateway)
    name, sample = "omnigate_webhook_requests", "omnigate_webhook_requests_total"
    assert value(families, name, sample, channel="telegram", status="403") == 1
    assert value(families, name, sample, channel="telegram", status="200") == 1


async def test_store_gauges_are_read_from_the_store(gateway: Gateway,
                                                    visitor: Visitor) -> None:
    families = await scrape(gateway)
    assert value(families, "omnigate_queue_waiting") == 0
    await visitor.connect()
    await visitor.say("talk to a human")
    await visitor.until(lambda i: i.get("name") == "handoff")
    await gateway.settle()
    await asyncio.sleep(1.1)  # past the gauges' one-second cache
    assert value(await scrape(gateway), "omnigate_queue_waiting") == 1
    agent_id, auth = await gateway.agent("Alice")
    async with gateway.http.put(gateway.url + "/api/v1/me/presence", headers=auth,
                                json={"presence": "online"}) as response:
        assert response.status == 200
    await asyncio.sleep(1.1)  # past the gauges' one-second cache
    families = await scrape(gateway)
    assert value(families, "omnigate_agents_online") == 1
    # online with capacity: the queued conversation was assigned to her, or still waits
    queued = await gateway.store.conversations.count_documents({"owner": "queued"})
    assert value(families, "omnigate_queue_waiting") == queued
    pending = await gateway.store.messages.count_documents(
        {"delivery.status": {"$in": ["pending", "sending"]}})
    assert value(families, "omnigate_outbox_pending") == pending
    assert agent_id


async def test_a_metrics_token_is_required_when_set(settings: Settings) -> None:
    token = "s3cret-metrics-token-0123"
    async with running_gateway(settings.model_copy(update={"metrics_token": token})) as gw:
        async with gw.http.get(gw.url + "/metrics") as response:
            assert response.status == 401
        async with gw.http.get(gw.url + "/metrics",
                               headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        families = await scrape(gw, {"Authorization": f"Bearer {token}"})
        assert "omnigate_store_commands" in families


async def test_metrics_can_be_turned_off(settings: Settings) -> None:
    async with (running_gateway(settings.model_copy(update={"metrics": False})) as gw,
                gw.http.get(gw.url + "/metrics") as response):
        assert response.status == 404


async def test_healthz_is_liveness_and_readyz_readiness(gateway: Gateway) -> None:
    async with gateway.http.get(gateway.url + "/healthz") as response:
        assert response.status == 200 and (await response.json())["status"] == "ok"
    async with gateway.http.get(gateway.url + "/readyz") as response:
        body = await response.json()
        assert response.status == 200 and body["store"] == "ok" and body["pid"] > 0


def test_the_log_level_is_accepted_in_any_case() -> None:
    assert Settings(log_level="debug").log_level == "DEBUG"
    assert Settings(log_level=" Warning ").log_level == "WARNING"
    with pytest.raises(ValueError, match="log_level"):
        Settings(log_level="chatty")
