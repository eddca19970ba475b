"""Shared rig for tests/test_engine_*.py: the engine's test flows (tests/fixtures/flows/
engine/all) served by the whole gateway, a local HTTP server for ``http`` steps, and a
customer who writes straight into the real pipeline and reads the bot's replies from the
real store."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.keys import PIPELINE
from gateway.model import Conversation, InboundMessage, OwnerState, Party, Role
from gateway.settings import Settings
from gateway.store.turn_records import current as current_turn_state
from gateway.store.turn_records import history as bot_history
from tests.conftest import Gateway

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "flows" / "engine" / "all"
TESTING_ACTIONS = "tests.actions_testing"


@dataclass(frozen=True)
class Said:
    """One bot message: its text and its buttons as (title, value)."""

    text: str
    buttons: list[tuple[str, str]]


class Shop:
    """A local HTTP API for the ``http`` steps; records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = asyncio.Event()  # lets /slow answer (at teardown)
        self.server: TestServer | None = None
        app = web.Application()
        app.router.add_get("/orders/{number}", self.order)
        app.router.add_post("/echo", self.echo)
        app.router.add_get("/broken", self.broken)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/search/{tail:.*}", self.search)
        self.app = app

    def _record(self, request: web.Request, body: Any = None) -> None:
        self.requests.append({"method": request.method, "raw_path": request.raw_path,
                              "headers": dict(request.headers), "body": body})

    async def order(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"order": {
            "number": request.match_info["number"], "state": "shipped",
            "items": [{"name": "Shoe"}, {"name": "Sock"}], "total": 59.9}})

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._record(request, body)
        return web.json_response({"body": body, "header": request.headers.get("X-Customer")})

    async def broken(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"error": "down"}, status=500)

    async def slow(self, request: web.Request) -> web.Response:
        self._record(request)
        await asyncio.wait_for(self.release.wait(), 30)
        return web.json_response({"state": "late"})

    async def search(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"path": request.match_info["tail"],
                                  "q": request.query.get("q")})

    async def start(self) -> int:
        self.server = TestServer(self.app, host="127.0.0.1")
        await self.server.start_server()
        port = self.server.port
        assert port is not None
        return port

    async def close(self) -> None:
        self.release.set()
        if self.server is not None:
            await self.server.close()


def copy_flows(tmp_path: Path, shop: Shop) -> Path:
    """A copy of the engine's test flows, pointing their http steps at ``shop``."""
    target = tmp_path / "flows"
    shutil.copytree(FIXTURE, target)
    assert shop.server is not None
    for path in target.glob("*.yaml"):
        path.write_text(path.read_text().replace("__PORT__", str(shop.server.port)))
    return target


def engine_settings(settings: Settings, flows_dir: Path) -> Settings:
    return settings.model_copy(update={
        "flows_dir": flows_dir, "flows_hot_reload": False, "actions_package": TESTING_ACTIONS})


@dataclass
class Customer:
    """A web chat customer writing through the real pipeline (as the connector hands
    messages over); replies are read back from the store."""

    gateway: Gateway
    id: str = field(default_factory=lambda: f"v{uuid.uuid4().hex[:10]}")
    name: str | None = "Ana"
    thread: str | None = None
    conversation_id: str | None = None

    async def send(self, text: str | None = None, *, value: str | None = None) -> list[Said]:
        """Say ``text`` (or press a button: ``value``, with ``text`` as its title); the
        bot's replies to it, once the gateway has settled."""
        message = InboundMessage(
            channel="webchat", external_id=f"{self.id}:{uuid.uuid4().hex}",
            thread_key=self.thread or self.id,
            sender=Party(role=Role.CUSTOMER, id=self.id, name=self.name),
            sender_external_id=self.id, text=text if text is not None else value, value=value)
        result = await self.gateway.app[PIPELINE].ingest(message)
        assert not result.duplicate
        self.conversation_id = result.conversation.id
        await self.gateway.settle()
        cursor = self.gateway.store.messages.find(
            {"reply_to_id": result.item.id, "sender.role": "bot"})
        return [Said(d.get("text") or "", [(b["title"], b["value"]) for b in d.get("buttons", [])])
                for d in await cursor.sort("seq", 1).to_list()]

    async def press(self, value: str, title: str | None = None) -> list[Said]:
        return await self.send(title or value, value=value)

    async def texts(self, text: str | None = None, *, value: str | None = None) -> list[str]:
        return [s.text for s in await self.send(text, value=value)]

    async def conversation(self) -> Conversation:
        assert self.conversation_id is not None
        found = await self.gateway.store.get_conversation(self.conversation_id)
        assert found is not None
        return found

    async def owner(self) -> OwnerState:
        return (await self.conversation()).owner

    async def state(self) -> dict[str, Any]:
        state = await current_turn_state(self.gateway.store, (await self.conversation()).id)
        assert state is not None
        return dict(state.bot_state)

    async def events(self) -> list[dict[str, Any]]:
        """The bot's event log as the next custom action would get it (before its turn)."""
        conversation = await self.conversation()
        state = await current_turn_state(self.gateway.store, conversation.id)
        assert state is not None
        top = await self.gateway.store.seq_above(conversation.id, 0)
        return await bot_history(self.gateway.store, conversation.id, state.bot_since, top + 1)

    async def slots(self) -> dict[str, Any]:
        return dict((await self.state()).get("slots") or {})
