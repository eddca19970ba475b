"""Live delivery across gateway PROCESSES sharing one store.

A visitor's socket is held by process B; the agent claims and replies through process
A's REST API. The reply must reach the visitor's OPEN socket on B (through the store's
change feed, never one process's memory), not only after a reconnect; and the bot's
answers to the visitor's later messages keep arriving in order on the same socket.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from gateway.settings import Settings
from tests.conftest import Gateway, Visitor
from tests.fakes.telegram_api import FakeTelegram
from tests.processes import ServeProcess

TOKEN = "123456:TWO-PROCESSES"
SECRET = "two-processes-secret"


class Remote:
    """What :class:`Visitor` needs of a gateway: a socket to process ``url``."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url

    async def socket(self, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        return await self.http.ws_connect(self.url + "/webchat/ws", **kwargs)


async def api(http: aiohttp.ClientSession, base: str, method: str, path: str,
              headers: dict[str, str], **kwargs: Any) -> tuple[int, Any]:
    async with http.request(method, base + "/api/v1" + path, headers=headers,
                            **kwargs) as response:
        return response.status, await response.json()


async def test_an_agent_reply_through_process_a_reaches_the_open_socket_on_process_b(
    gateway: Gateway, settings: Settings, tmp_path: Path
) -> None:
    a, b = ServeProcess(settings, tmp_path, "a"), ServeProcess(settings, tmp_path, "b")
    try:
        await a.ready(gateway.http)
        await b.ready(gateway.http)
        _, alice = await gateway.agent("Alice")
        visitor = Visitor(Remote(gateway.http, b.url))  # type: ignore[arg-type]
        visitor_id = (await visitor.connect())["welcome"]["visitor_id"]
        await visitor.say("talk to a human")
        await visitor.until(lambda i: i.get("name") == "handoff", timeout=20)
        conversation = await gateway.store.find_conversation("webchat", visitor_id)
        assert conversation is not None
        path = f"/conversations/{conversation.id}"
        status, claimed = await api(gateway.http, a.url, "POST", path + "/claim", alice)
        assert status == 200, claimed
        await visitor.until(lambda i: i.get("name") == "assigned", timeout=20)
        socket = visitor.ws

        loop = asyncio.get_running_loop()
        for n in range(3):  # several replies: each one live, in order, once
            sent = loop.time()
            status, body = await api(gateway.http, a.url, "POST", path + "/messages", alice,
                                     json={"text": f"reply {n} from process A"})
            assert status in (200, 201), body
            got = await visitor.until(lambda i: i.get("role") == "agent", timeout=10)
            assert got["text"] == f"reply {n} from process A"
            assert visitor.ws is socket  # the same open socket: no reconnect
            print(f"reply {n}: live on B after {1000 * (loop.time() - sent):.0f} ms")
        agent_texts = [i["text"] for i in visitor.items if i.get("role") == "agent"]
        assert agent_texts == [f"reply {n} from process A" for n in range(3)]

        # the visitor answers on B; the agent sees it through A's API
        await visitor.say("thanks, that helps")
        deadline = loop.time() + 20
        while True:
            status, history = await api(gateway.http, a.url, "GET", path + "/messages",
                                        alice)
            assert status == 200, history
            if any(i.get("text") == "thanks, that helps" for i in history["items"]):
                break
            assert loop.time() < deadline, history
            await asyncio.sleep(0.1)
        assert visitor.ws is not None
        await visitor.ws.close()
    finally:
        a.stop()
        b.stop()


async def test_a_telegram_update_posted_to_two_processes_at_once_is_answered_once(
    gateway: Gateway, settings: Settings, tmp_path: Path
) -> None:
    fake = FakeTelegram(token=TOKEN)
    await fake.start()
    extra = {"OMNIGATE_TELEGRAM_TOKEN": TOKEN, "OMNIGATE_TELEGRAM_MODE": "webhook",
             "OMNIGATE_TELEGRAM_WEBHOOK_SECRET": SECRET,
             "OMNIGATE_TELEGRAM_API_URL": fake.url}
    a = ServeProcess(settings, tmp_path, "a", extra)
    b = ServeProcess(settings, tmp_path, "b", extra)
    try:
        await a.ready(gateway.http)
        await b.ready(gateway.http)
        chat = 424242
        for n, question in enumerate(["hello", "what are your opening hours?"], 1):
            update = {"update_id": 9000 + n, "message": {
                "message_id": n, "date": 1_700_000_000 + n, "text": question,
                "from": {"id": chat, "is_bot": False, "first_name": "Twice"},
                "chat": {"id": chat, "type": "private", "first_name": "Twice"}}}
            answers = await asyncio.gather(
                fake.deliver(gateway.http, a.url + "/webhooks/telegram", update, SECRET),
                fake.deliver(gateway.http, b.url + "/webhooks/telegram", update, SECRET))
            assert [status for status, _ in answers] == [200, 200], answers
            expected = 2 if n == 1 else 3  # greeting + menu, then the answer
            await fake.wait_for(lambda e=expected: len(fake.texts(chat)) >= e, timeout=20)
        await asyncio.sleep(1.5)  # time for a second answer, if one were coming
        texts = fake.texts(chat)
        assert len(texts) == 3, texts
        assert "Monday" in texts[-1]
        stored = await gateway.store.messages.count_documents(
            {"direction": "in", "channel": "telegram"})
        assert stored == 2
    finally:
        a.stop()
        b.stop()
        await fake.close()
