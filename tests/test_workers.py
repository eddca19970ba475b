"""``omnigate serve --workers N`` and the supervised embedded store, as real processes.

- two workers on one port share one embedded store (owned by the master); a killed worker
  is started again; a stop leaves no server behind;
- the gateway SIGKILLed and started again 0.2 s later (what a supervisor does): ready
  within 15 s on a fresh server, nothing lost, nothing answered twice;
- the embedded store SIGKILLed under load: the gateway restarts it; every message the
  visitors sent (resent on ``unavailable``, as the widget does) is stored and answered once;
  the same for Telegram webhooks (5xx, never 200, for what is not stored; redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pymongo import AsyncMongoClient

from tests.conftest import Visitor, need, secantus_executable
from tests.fakes.telegram_api import FakeTelegram
from tests.processes import ServeProcess
from tests.test_embedded import pid_running, wait_gone
from tests.test_live_processes import Remote

QUESTION = "what are your opening hours?"


@pytest.fixture(autouse=True)
def _secantus_installed() -> None:
    if secantus_executable() is None:
        need("SecantusDB (secantusd-py)", "pip install --pre 'secantusdb' (or omnigate[test])")


def server_pid(data_dir: Path) -> int:
    return int(json.loads((data_dir / "store.json").read_text())["pid"])


async def healthz_pid(url: str) -> int | None:
    """The pid of whichever worker answers a NEW connection (None if none answers)."""
    try:
        async with aiohttp.ClientSession() as one, one.get(url + "/healthz") as response:
            return int((await response.json())["pid"])
    except aiohttp.ClientError:
        return None


def is_bot(item: dict[str, Any]) -> bool:
    return item["type"] == "message" and item["role"] == "bot"


async def ask(visitor: Visitor, text: str, client_id: str, timeout: float = 60.0) -> None:
    """Send until acknowledged (again with the same client_id after ``unavailable`` or a
    lost socket, as the widget does), then wait for the bot's answer to it (catching up
    by a resume if it does not come live)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    acked: int | None = None
    while acked is None:
        assert loop.time() < deadline, f"{client_id} never acknowledged: {visitor.frames[-5:]}"
        try:
            assert visitor.ws is not None
            await visitor.ws.send_json({"type": "message", "client_id": client_id,
                                        "text": text})
            while acked is None:
                frame = await visitor.recv(15)
                if frame["type"] == "ack" and frame.get("client_id") == client_id:
                    acked = int(frame["seq"])
                elif frame["type"] == "error" and frame.get("code") in ("unavailable",
                                                                         "internal"):
                    await asyncio.sleep(0.5)
                    break
        except (TimeoutError, TypeError, ConnectionError, aiohttp.ClientError):
            await asyncio.sleep(0.5)
            await reconnect(visitor, deadline)
    while not any(is_bot(i) and i["seq"] > acked for i in visitor.items):
        assert loop.time() < deadline, f"no answer to {client_id}"
        try:
            await visitor.recv(5)
        except (TimeoutError, TypeError, ConnectionError, aiohttp.ClientError):
            await reconnect(visitor, deadline)  # catch up from the watermark


async def reconnect(visitor: Visitor, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        assert loop.time() < deadline, "could not reconnect"
        try:
            await visitor.close()
            await visitor.connect()
            return
        except (TimeoutError, TypeError, ConnectionError, aiohttp.ClientError, KeyError):
            await asyncio.sleep(0.5)


async def history(http: aiohttp.ClientSession, url: str, token: str,
                  answers: int) -> list[dict[str, Any]]:
    """Everything the visitor sees, from a fresh socket (no watermark), once ``answers``
    bot messages are there (a turn's reply can still be on its way when the visitor's
    next message was answered first), and a moment more to catch any extra one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    settled = False
    while True:
        fresh = Visitor(Remote(http, url))  # type: ignore[arg-type]
        fresh.token = token
        await fresh.connect(resume=False)
        await fresh.close()
        if sum(1 for i in fresh.items if is_bot(i)) >= answers:
            if settled:
                return fresh.items
            settled = True
            await asyncio.sleep(1.0)
            continue
        if loop.time() > deadline:
            return fresh.items
        await asyncio.sleep(0.3)


def turns(items: list[dict[str, Any]]) -> tuple[list[str], int]:
    """(what the visitor said, in order; how many bot messages there are). A turn's reply
    may come after the visitor's next message (both were waiting after a restart), so
    the replies are counted, not paired."""
    said = [i["text"] for i in items if i["type"] == "message" and i["role"] == "customer"]
    return said, sum(1 for i in items if is_bot(i))


async def test_two_workers_share_one_port_and_one_embedded_store(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        gateway = ServeProcess(None, tmp_path, "w", args=("--workers", "2"))
        try:
            await gateway.ready(http)
            store = server_pid(gateway.data_dir)
            pids: set[int] = set()
            # A new connection each time: the kernel spreads them over the workers that
            # listen. The first to answer made `ready` true; the other may still be
            # starting (on a loaded machine, seconds later), so this waits for it.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while len(pids) < 2 and loop.time() < deadline:
                if (pid := await healthz_pid(gateway.url)) is not None:
                    pids.add(pid)
                await asyncio.sleep(0.02)
            assert len(pids) == 2 and gateway.pid not in pids, pids

            async with http.get(gateway.url + "/metrics") as response:
                text = await response.text()
            assert "omnigate_worker_processes 2.0" in text  # one scrape sums both

            visitor = Visitor(Remote(http, gateway.url))  # type: ignore[arg-type]
            await visitor.connect()
            await ask(visitor, QUESTION, "c-first")

            victim = pids.pop()
            os.kill(victim, signal.SIGKILL)  # the master starts it again
            deadline = loop.time() + 60
            while True:
                pid = await healthz_pid(gateway.url)
                if pid is not None and pid not in (victim, *pids):
                    break
                assert loop.time() < deadline, f"worker {victim} not replaced: {gateway.text()}"
                await asyncio.sleep(0.1)
            assert server_pid(gateway.data_dir) == store  # the store lived on
            await ask(visitor, QUESTION, "c-second")
            assert visitor.token is not None
            assert turns(await history(http, gateway.url, visitor.token, 2)) == (
                [QUESTION, QUESTION], 2)
        finally:
            code = gateway.stop()
        assert code == 0, gateway.text()
        await wait_gone(store)
        assert not (gateway.data_dir / "store.json").exists()


async def test_gateway_killed_and_restarted_at_once_gets_a_fresh_store_and_loses_nothing(
    tmp_path: Path,
) -> None:
    async with aiohttp.ClientSession() as http:
        first = ServeProcess(None, tmp_path, "first", data="data")
        second: ServeProcess | None = None
        try:
            await first.ready(http)
            visitor = Visitor(Remote(http, first.url))  # type: ignore[arg-type]
            await visitor.connect()
            await ask(visitor, QUESTION, "c-before")
            old_store = server_pid(first.data_dir)
            assert visitor.ws is not None
            await visitor.ws.send_json({"type": "message", "client_id": "c-at-kill",
                                        "text": QUESTION})
            await visitor.next_frame("ack")  # stored: it must be answered, once
            first.kill()
            await asyncio.sleep(0.2)
            second = ServeProcess(None, tmp_path, "second", port=first.port, data="data")
            await second.ready(http, timeout=15)  # the issue: ready within 15 s
            assert not pid_running(old_store)  # never attached to the dying server
            assert server_pid(second.data_dir) != old_store

            await reconnect(visitor, asyncio.get_running_loop().time() + 30)
            await ask(visitor, QUESTION, "c-after")
            assert visitor.token is not None
            seen = await history(http, second.url, visitor.token, 3)
            assert turns(seen) == ([QUESTION] * 3, 3), [
                (i["seq"], i["type"], i.get("role"), i.get("text", i.get("name"))) for i in seen]
        finally:
            first.stop()
            if second is not None:
                assert second.stop() == 0, second.text()


async def test_embedded_store_killed_under_load_is_restarted_and_every_message_answered_once(
    tmp_path: Path,
) -> None:
    async with aiohttp.ClientSession() as http:
        gateway = ServeProcess(None, tmp_path, "g", env={"OMNIGATE_LOG_LEVEL": "INFO"})
        try:
            await gateway.ready(http)
            visitors = [Visitor(Remote(http, gateway.url)) for _ in range(5)]  # type: ignore[arg-type]
            for visitor in visitors:
                await visitor.connect()
            rounds = 6
            killed = asyncio.Event()

            async def chat(visitor: Visitor) -> None:
                for n in range(rounds):
                    await ask(visitor, f"{QUESTION} ({n})", f"c{uuid.uuid4().hex[:8]}-{n}",
                              timeout=120)
                    if n == 1:
                        await killed.wait()  # everyone is mid-conversation at the kill

            async def kill() -> None:
                await asyncio.sleep(0.5)
                victim = server_pid(gateway.data_dir)
                os.kill(victim, signal.SIGKILL)
                killed.set()
                deadline = asyncio.get_running_loop().time() + 60
                info = gateway.data_dir / "store.json"
                while not info.exists() or server_pid(gateway.data_dir) == victim:
                    assert asyncio.get_running_loop().time() < deadline, gateway.text()
                    await asyncio.sleep(0.1)

            await asyncio.gather(kill(), *(chat(v) for v in visitors))
            assert "restarting it in" in gateway.text()
            assert "embedded store restarted" in gateway.text()
            for visitor in visitors:
                assert visitor.token is not None
                got = turns(await history(http, gateway.url, visitor.token, rounds))
                assert got == ([f"{QUESTION} ({n})" for n in range(rounds)], rounds), got
        finally:
            gateway.stop()


async def test_telegram_webhooks_while_the_embedded_store_is_killed_lose_nothing(
    tmp_path: Path,
) -> None:
    """Telegram senders keep posting while the embedded store is SIGKILLed again and
    again (each restart waits longer: the supervisor's backoff, until an outage outlasts
    the gateway's 5 s store timeout; a probe update is posted right after each kill): an
    update is answered 200 only once it is stored, otherwise with a 5xx, and Telegram
    delivers it again (as this test does). In the end
    every update is stored once and every reply sent once (docs/delivery.md: a second
    copy only after a GATEWAY crash)."""
    token, secret = "123456:STORE-KILL", "store-kill-secret"
    fake = FakeTelegram(token=token)
    await fake.start()
    env = {"OMNIGATE_LOG_LEVEL": "INFO", "OMNIGATE_TELEGRAM_TOKEN": token,
           "OMNIGATE_TELEGRAM_MODE": "webhook", "OMNIGATE_TELEGRAM_WEBHOOK_SECRET": secret,
           "OMNIGATE_TELEGRAM_API_URL": fake.url}
    statuses: list[int] = []
    chats = [515100 + n for n in range(3)]
    probe = 515199  # posted right after each kill
    sent: dict[int, int] = {}
    try:
        async with aiohttp.ClientSession() as http:
            gateway = ServeProcess(None, tmp_path, "g", env=env)
            try:
                await gateway.ready(http)
                done = asyncio.Event()

                async def post_until_ok(update: dict[str, Any]) -> None:
                    deadline = asyncio.get_running_loop().time() + 120
                    while True:
                        assert asyncio.get_running_loop().time() < deadline, gateway.text()
                        try:
                            status, body = await fake.deliver(
                                http, gateway.url + "/webhooks/telegram", update, secret)
                        except aiohttp.ClientError:
                            status, body = 599, "connection"
                        statuses.append(status)
                        if status == 200:
                            return
                        assert status >= 500, (status, body)  # never a 4xx: retry
                        await asyncio.sleep(0.3)

                async def send(chat: int) -> None:
                    """The chat's next message (its first: hello), until stored."""
                    n = sent.get(chat, 0)
                    text = "hello" if n == 0 else f"{QUESTION} ({n})"
                    await post_until_ok({"update_id": chat * 100 + n, "message": {
                        "message_id": n + 1, "date": 1_700_000_000 + n, "text": text,
                        "from": {"id": chat, "is_bot": False, "first_name": "K"},
                        "chat": {"id": chat, "type": "private", "first_name": "K"}}})
                    sent[chat] = n + 1

                async def sender(chat: int) -> None:
                    while sent.get(chat, 0) < 3 or not done.is_set():
                        await send(chat)
                        n = sent[chat]
                        await fake.wait_for(  # greeting + menu, then one answer each
                            lambda c=chat, e=n + 1: len(fake.texts(c)) >= e, timeout=120)

                async def kill() -> None:
                    loop = asyncio.get_running_loop()
                    try:
                        for _ in range(6):
                            await asyncio.sleep(0.3)
                            victim = server_pid(gateway.data_dir)
                            os.kill(victim, signal.SIGKILL)
                            # a probe posted at once: refused while the outage lasts
                            # longer than the store timeout, then stored
                            await send(probe)
                            deadline = loop.time() + 60
                            while True:  # store.json is rewritten once it is back
                                with contextlib.suppress(OSError, ValueError):
                                    if server_pid(gateway.data_dir) != victim:
                                        break
                                assert loop.time() < deadline, gateway.text()
                                await asyncio.sleep(0.05)
                            if any(s != 200 for s in statuses):
                                break  # an outage was long enough to be refused
                    finally:
                        done.set()

                await asyncio.gather(kill(), *(sender(c) for c in chats))
                await asyncio.sleep(1.5)  # time for a second copy, if one were coming
                print("webhook statuses while the store was killed:",
                      {s: statuses.count(s) for s in sorted(set(statuses))})
                assert "embedded store restarted" in gateway.text()
                assert any(s >= 500 for s in statuses), "no update was ever refused"
                await fake.wait_for(lambda: len(fake.texts(probe)) >= 1 + sent[probe],
                                    timeout=60)
                for chat in [*chats, probe]:
                    texts = fake.texts(chat)
                    assert len(texts) == 1 + sent[chat], texts  # greeting, menu, answers
                    assert sum("Monday" in t for t in texts) == sent[chat] - 1, texts
                uri = json.loads((gateway.data_dir / "store.json").read_text())["uri"]
                client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
                try:
                    stored = await client["omnigate"]["messages"].count_documents(
                        {"direction": "in", "channel": "telegram"})
                finally:
                    await client.close()
                assert stored == sum(sent.values())
            finally:
                gateway.stop()
    finally:
        await fake.close()
