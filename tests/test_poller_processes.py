"""Inbound pollers across two real ``omnigate serve`` PROCESSES sharing one store.

Telegram's getUpdates and an IMAP mailbox are read by exactly one process at a time,
the holder of the poller's lease (gateway/leases.py); when it is killed (SIGKILL: no
release), the other process takes over within 30 s and what arrives next is answered
once. In webhook mode any process takes an update: the same update posted to both at
once is stored and answered once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.desk.agents import Agents
from gateway.settings import Settings
from gateway.store import Store
from tests.fakes.telegram_api import FakeTelegram, People
from tests.mailservers import OURS, Dovecot, SmtpSink, mail, running_dovecot, start_sink, stop_sink
from tests.processes import ServeProcess as Process

TOKEN = "777001:LEASE-token_abc"
SECRET = "lease-secret_1"
HOURS = "We're open Monday to Friday"
TAKEOVER = 30.0  # the promise: another process polls within 30 s of the holder's death


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def start(
    settings: Settings, tmp_path: Path, http: aiohttp.ClientSession
) -> Iterator[Callable[[dict[str, str]], Any]]:
    started: list[Process] = []

    async def two(env: dict[str, str]) -> list[Process]:
        pair = [Process(settings, tmp_path, f"gw{n}", {"OMNIGATE_LOG_LEVEL": "INFO", **env})
                for n in range(2)]
        started.extend(pair)
        for process in pair:
            await process.ready(http)
        return pair

    yield two
    for process in started:
        process.stop()


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def holder_of(store: Store, name: str, processes: list[Process]) -> Process:
    """The process that holds the lease ``name`` (its owner is host:pid:random)."""

    async def find() -> Process | None:
        doc = await store.db["leases"].find_one({"_id": name})
        owner = str((doc or {}).get("owner") or "")
        pid = owner.split(":")[1] if owner.count(":") >= 2 else ""
        return next((p for p in processes if str(p.pid) == pid
                     and p.process.poll() is None), None)

    found: Process = await until(find, 30, f"a live holder of {name}")
    return found


def unique(values: list[str]) -> bool:
    return len(values) == len(set(values))


async def messages_of(http: aiohttp.ClientSession, base: str, auth: dict[str, str],
                      thread_filter: Callable[[dict[str, Any]], bool]) -> list[list[Any]]:
    """Through the agent API: for each bot-owned conversation that matches, its items."""
    async with http.get(base + "/api/v1/conversations?owner=bot&limit=200",
                        headers=auth) as response:
        assert response.status == 200, await response.text()
        listing = await response.json()
    found = []
    for conversation in listing["items"]:
        if not thread_filter(conversation):
            continue
        async with http.get(f"{base}/api/v1/conversations/{conversation['id']}/messages",
                            headers=auth) as response:
            assert response.status == 200, await response.text()
            found.append((await response.json())["items"])
    return found


@pytest.fixture
async def agent(store: Store) -> dict[str, str]:
    _, token = await Agents(store).add("Watcher")
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------ Telegram polling


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(token=TOKEN)
    await fake.start()
    yield fake
    await fake.close()


async def test_telegram_polling_runs_in_one_process_and_moves_when_it_is_killed(
    store: Store, telegram: FakeTelegram, start: Any,
) -> None:
    people = People(telegram)
    processes: list[Process] = await start({
        "OMNIGATE_TELEGRAM_TOKEN": TOKEN, "OMNIGATE_TELEGRAM_MODE": "polling",
        "OMNIGATE_TELEGRAM_API_URL": telegram.url})
    name = "telegram:polling:777001"
    first = await holder_of(store, name, processes)
    await telegram.wait_for(lambda: telegram.of("getUpdates", ok=None), timeout=30)

    ann = people.user(4001)
    telegram.push(people.message(ann, text="what are your opening hours?"))
    await telegram.wait_for(lambda: [t for t in telegram.texts(4001) if t.startswith(HOURS)],
                            timeout=30)
    await asyncio.sleep(6)  # more than one retry interval of the other process
    assert telegram.poll_conflicts() == [], "two processes long-polled at once"
    assert await holder_of(store, name, processes) is first

    first.kill()  # no release: the other process must notice and take over
    [second] = [p for p in processes if p is not first]
    bob = people.user(4002, "Bob")
    telegram.push(people.message(bob, text="what are your opening hours?"))
    await telegram.wait_for(lambda: [t for t in telegram.texts(4002) if t.startswith(HOURS)],
                            timeout=TAKEOVER)
    assert await holder_of(store, name, processes) is second
    assert "lease telegram:polling:777001: " in second.text()
    await asyncio.sleep(3)  # time for a second answer, if there were one
    for chat in (4001, 4002):
        replies = telegram.texts(chat)
        assert replies and unique(replies), (chat, replies)  # answered once
    assert telegram.poll_conflicts() == []
    offsets = [c.params.get("offset") for c in telegram.of("getUpdates")]
    seen = [o for o in offsets if o is not None]
    assert seen == sorted(seen), offsets  # one offset sequence, never going back


# ------------------------------------------------------------------ Telegram webhook


async def test_the_same_webhook_update_posted_to_two_processes_is_taken_once(
    store: Store, telegram: FakeTelegram, start: Any, http: aiohttp.ClientSession,
    agent: dict[str, str],
) -> None:
    people = People(telegram)
    processes: list[Process] = await start({
        "OMNIGATE_TELEGRAM_TOKEN": TOKEN, "OMNIGATE_TELEGRAM_MODE": "webhook",
        "OMNIGATE_TELEGRAM_WEBHOOK_SECRET": SECRET, "OMNIGATE_TELEGRAM_API_URL": telegram.url})
    for n in range(3):
        chat = 5001 + n
        update = people.message(people.user(chat), text="what are your opening hours?")
        results = await asyncio.gather(*(
            telegram.deliver(http, p.url + "/webhooks/telegram", update, SECRET)
            for p in processes))
        assert [status for status, _ in results] == [200, 200], results
        outcomes = sorted(body["outcome"] for _, body in results)
        assert outcomes == ["duplicate", "stored"], results
        await telegram.wait_for(lambda c=chat: [t for t in telegram.texts(c)  # type: ignore[misc]
                                                if t.startswith(HOURS)], timeout=30)
    await asyncio.sleep(3)  # time for a second answer, if there were one
    for n in range(3):
        replies = telegram.texts(5001 + n)
        assert replies and unique(replies), replies
    assert not telegram.of("getUpdates", ok=None)  # webhook mode: nobody polls
    conversations = await messages_of(http, processes[0].url, agent,
                                      lambda c: c["channel"] == "telegram")
    assert len(conversations) == 3
    for items in conversations:
        inbound = [i for i in items if i["direction"] == "in"]
        assert len(inbound) == 1, items  # stored once


# ------------------------------------------------------------------ IMAP


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot("leases") as server:
        yield server


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    server = await start_sink()
    yield server
    await stop_sink(server)


def replies_to(sink: SmtpSink, message_id: str) -> list[str]:
    return [str(r.message.get_body(("plain",)).get_content())  # type: ignore[union-attr]
            for r in sink.sink.messages if r.message["In-Reply-To"] == message_id]


async def test_one_process_reads_the_mailbox_and_another_takes_over_when_it_is_killed(
    store: Store, dovecot: Dovecot, sink: SmtpSink, start: Any, http: aiohttp.ClientSession,
    agent: dict[str, str],
) -> None:
    user = dovecot.new_user()
    processes: list[Process] = await start({
        "OMNIGATE_EMAIL_ADDRESS": OURS, "OMNIGATE_IMAP_HOST": "127.0.0.1",
        "OMNIGATE_IMAP_PORT": str(dovecot.port), "OMNIGATE_IMAP_USER": user,
        "OMNIGATE_IMAP_PASSWORD": "secret", "OMNIGATE_IMAP_TLS": "none",
        "OMNIGATE_SMTP_HOST": "127.0.0.1", "OMNIGATE_SMTP_PORT": str(sink.port),
        "OMNIGATE_SMTP_TLS": "none"})
    name = f"email:imap:{user}@127.0.0.1:{dovecot.port}/INBOX"
    first = await holder_of(store, name, processes)
    await until(lambda: "selected INBOX" in first.text(), 30, "the holder reading INBOX")

    before = mail("alice@customer.test", "hello")
    await dovecot.aappend(user, before)
    await until(lambda: replies_to(sink, str(before["Message-ID"])), 30, "the bot's answer")
    [other] = [p for p in processes if p is not first]
    assert "selected INBOX" not in other.text()  # the other process never read it

    first.kill()
    after = mail("bob@customer.test", "hello", name="Bob")
    await dovecot.aappend(user, after)
    await until(lambda: replies_to(sink, str(after["Message-ID"])), TAKEOVER,
                "the answer to a mail appended after the kill")
    assert await holder_of(store, name, processes) is other
    await asyncio.sleep(3)  # time for a second answer, if there were one
    for message in (before, after):
        replies = replies_to(sink, str(message["Message-ID"]))
        assert replies and unique(replies), replies  # answered once
    conversations = await messages_of(http, other.url, agent,
                                      lambda c: c["channel"] == "email")
    assert len(conversations) == 2
    for items in conversations:
        inbound = [i for i in items if i["direction"] == "in"]
        assert len(inbound) == 1, items  # ingested once
