"""GET /metrics on a real gateway: every metric docs/metrics.md names, store command
counting, webhook statuses, the store gauges (the same on every process), the token, and
prometheus-client's multiprocess mode with two ``omnigate serve`` processes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from pymongo.errors import OperationFailure

from gateway.settings import Settings
from tests.conftest import Gateway, Visitor, running_gateway
from tests.fakes.telegram_api import FakeTelegram, People
from tests.processes import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "metrics.md"
TOKEN = "123456:TEST-token_abc"
SECRET = "s3cret_Secret-42"


def documented() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md's table: name -> (type, label names)."""
    rows = re.findall(r"^\| `(omnigate_\w+)` \| (\w+) \| ([^|]*) \|", DOC.read_text(), re.M)
    assert len(rows) >= 10, "the metrics table of docs/metrics.md was not found"
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in found
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def by_label(found: list[Sample], name: str, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in found if s.name == name}


async def scrape(http: aiohttp.ClientSession, url: str, **headers: str) -> list[Sample]:
    async with http.get(url + "/metrics", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain"
        return samples(await response.text())


async def eventually(read: Callable[[], Any], check: Callable[[Any], bool],
                     timeout: float = 15.0) -> Any:
    """Read until ``check`` holds (the store gauges are cached for a second)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await read()
        if check(got):
            return got
        assert asyncio.get_running_loop().time() < deadline, f"still {got!r}"
        await asyncio.sleep(0.2)


async def round_trip(visitor: Visitor) -> None:
    await visitor.connect()
    await visitor.say("hello")
    await visitor.until(lambda i: i["type"] == "message" and i["role"] == "bot")


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(token=TOKEN)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def settings(settings: Settings, telegram: FakeTelegram) -> Settings:
    return settings.model_copy(update={
        "telegram_token": TOKEN, "telegram_mode": "webhook", "telegram_webhook_secret": SECRET,
        "telegram_api_url": telegram.url})


async def test_every_documented_metric_is_there_with_its_labels(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram
) -> None:
    await round_trip(visitor)
    status, _ = await telegram.deliver(gateway.http, gateway.url + "/webhooks/telegram",
                                       People(telegram).message(People.user(7), text="hi"),
                                       "wrong-secret")
    assert status == 403
    found = await scrape(gateway.http, gateway.url)
    for name, (kind, labels) in documented().items():
        names = {"histogram": [f"{name}_bucket", f"{name}_count", f"{name}_sum"]}.get(
            kind, [name])
        for sample_name in names:
            present = [s for s in found if s.name == sample_name]
            assert present, f"{sample_name} ({kind}) is missing from /metrics"
            for sample in present:
                assert set(sample.labels) - {"le"} == labels, (sample_name, sample.labels)
    assert value(found, "omnigate_messages_total", channel="webchat", direction="inbound") == 1
    assert value(found, "omnigate_messages_total", channel="telegram", direction="inbound") == 0
    assert value(found, "omnigate_webhook_requests_total", channel="telegram",
                 status="403") == 1
    assert value(found, "omnigate_worker_processes") == 1
    assert value(found, "process_cpu_seconds_total") > 0  # prometheus-client's own


async def test_store_commands_are_counted_by_command(gateway: Gateway, visitor: Visitor
                                                     ) -> None:
    await gateway.settle()
    before = await scrape(gateway.http, gateway.url)
    await round_trip(visitor)
    await gateway.settle()
    after = await scrape(gateway.http, gateway.url)
    total = "omnigate_store_commands_total"
    assert value(after, total) > value(before, total)
    # the message was written (an insert, alone or in a transaction) and read back
    assert value(after, total, command="insert") > value(before, total, command="insert")
    assert value(after, total, command="find") > value(before, total, command="find")
    # each command counted is timed once, in the same scrape
    counts = by_label(after, total, "command")
    assert counts == by_label(after, "omnigate_store_command_seconds_count", "command")

    with pytest.raises(OperationFailure):
        await gateway.store.db.command("omnigateNoSuchCommand")
    failed = await scrape(gateway.http, gateway.url)
    assert value(failed, "omnigate_store_command_failures_total",
                 command="omnigateNoSuchCommand") == 1
    assert value(failed, total, command="omnigateNoSuchCommand") == 1
    assert value(failed, "omnigate_store_command_failures_total", command="insert") == 0


async def test_webhook_requests_are_counted_by_channel_and_status(
    gateway: Gateway, telegram: FakeTelegram
) -> None:
    people = People(telegram)
    hook = gateway.url + "/webhooks/telegram"
    status, _ = await telegram.deliver(gateway.http, hook, people.message(people.user(1), text="a"),
                                       "wrong-secret")
    assert status == 403
    status, _ = await telegram.deliver(gateway.http, hook, people.message(people.user(1), text="b"),
                                       SECRET)
    assert status == 200
    async with gateway.http.post(hook, data=b"{not json",
                                 headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as bad:
        assert bad.status == 400
    async with gateway.http.post(gateway.url + "/webhooks/nosuch/x", json={}) as missing:
        assert missing.status == 404  # the router raises: counted all the same
    async with gateway.http.get(gateway.url + "/healthz") as health:
        assert health.status == 200  # not a webhook: not counted
    found = await scrape(gateway.http, gateway.url)
    counted = {(s.labels["channel"], s.labels["status"]): s.value for s in found
               if s.name == "omnigate_webhook_requests_total"}
    assert counted == {("telegram", "403"): 1, ("telegram", "200"): 1, ("telegram", "400"): 1,
                       ("other", "404"): 1}


async def test_store_gauges_count_the_store_the_same_on_every_process(
    gateway: Gateway, visitor: Visitor, settings: Settings, telegram: FakeTelegram
) -> None:
    names = ("omnigate_queue_waiting", "omnigate_agents_online", "omnigate_outbox_pending")
    async with running_gateway(settings) as other:  # a second process on the same store

        async def gauges() -> list[dict[str, float]]:
            return [{n: value(found, n) for n in names}
                    for found in [await scrape(gw.http, gw.url) for gw in (gateway, other)]]

        assert (await gauges())[0] == dict.fromkeys(names, 0)
        await visitor.connect()
        await visitor.say("I want to talk to a human please")
        await visitor.until(lambda i: i["type"] == "event" and i["name"] == "handoff")
        # Telegram refuses to send for a minute: the bot's answer waits in the outbox
        telegram.fail("sendMessage", 429, "Too Many Requests", retry_after=60, times=100)
        people = People(telegram)
        status, _ = await telegram.deliver(gateway.http, other.url + "/webhooks/telegram",
                                           people.message(people.user(9), text="hello"), SECRET)
        assert status == 200
        waiting = await eventually(
            gauges, lambda both: both[0] == both[1] and both[0]["omnigate_queue_waiting"] == 1
            and both[0]["omnigate_outbox_pending"] >= 1)
        assert waiting[0]["omnigate_agents_online"] == 0
        stuck = await gateway.store.messages.count_documents(
            {"delivery.status": {"$in": ["pending", "sending"]}})
        assert waiting[0]["omnigate_outbox_pending"] == stuck

        # an agent comes online and is given the waiting conversation
        _, alice = await gateway.agent("Alice")
        async with gateway.http.put(gateway.url + "/api/v1/me/presence", headers=alice,
                                    json={"presence": "online"}) as response:
            assert response.status == 200
        assigned = {**waiting[0], "omnigate_queue_waiting": 0, "omnigate_agents_online": 1}
        await eventually(gauges, lambda both: both == [assigned, assigned])


async def test_metrics_token_and_switch(settings: Settings) -> None:
    token = "tok-" + "x" * 28
    async with running_gateway(settings.model_copy(update={"metrics_token": token})) as gw:
        async with gw.http.get(gw.url + "/metrics") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "omnigate_" not in await response.text()
        for wrong in ("Bearer nope", f"Bearer {token}x", token, f"Basic {token}"):
            async with gw.http.get(gw.url + "/metrics",
                                   headers={"Authorization": wrong}) as response:
                assert response.status == 401, wrong
        found = await scrape(gw.http, gw.url, Authorization=f"Bearer {token}")
        assert value(found, "omnigate_worker_processes") == 1
    async with running_gateway(settings.model_copy(update={"metrics": False})) as gw:
        async with gw.http.get(gw.url + "/metrics") as response:
            assert response.status == 404
        async with gw.http.get(gw.url + "/healthz") as response:
            assert response.status == 200


async def test_multiprocess_mode_sums_over_the_workers_of_the_box(
    settings: Settings, tmp_path: Path
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    one = ServeProcess(settings, tmp_path, "one", {"PROMETHEUS_MULTIPROC_DIR": str(shared)})
    two = ServeProcess(settings, tmp_path, "two", {"PROMETHEUS_MULTIPROC_DIR": str(shared)})
    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(one.ready(http), two.ready(http))
            for url in (one.url, two.url, two.url):
                async with http.post(url + "/webhooks/nosuch", json={}) as response:
                    assert response.status == 404
            for url in (one.url, two.url):
                found = await scrape(http, url)
                assert value(found, "omnigate_webhook_requests_total", channel="other",
                             status="404") == 3, url
                assert value(found, "omnigate_worker_processes") == 2, url
                assert value(found, "omnigate_store_commands_total") > 0
                assert value(found, "omnigate_queue_waiting") == 0  # from the store, once
                assert not [s for s in found if s.name.startswith("process_")]
            kinds = {p.name.split("_")[0] for p in shared.iterdir()}
            assert kinds == {"counter", "histogram", "gauge"}  # the workers' files
            assert two.stop() == 0
            found = await scrape(http, one.url)
            assert value(found, "omnigate_worker_processes") == 1  # two left the live sum
            assert value(found, "omnigate_webhook_requests_total", channel="other",
                         status="404") == 3  # its counts stay: counters never go back
    finally:
        one.stop()
        two.stop()
