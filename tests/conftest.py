"""Shared fixtures: one real MongoDB-compatible server per session, a fresh database per test.

``OMNIGATE_TEST_MONGODB_URI`` points the suite at a real MongoDB (a replica set: appends
use transactions) instead of the embedded SecantusDB server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.keys import AGENTS, PIPELINE, STORE
from gateway.model import Direction
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.orphan import dies_with_parent
from gateway.store.turn_records import processed_after

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(what: str, how: str) -> None:
    """A missing system service: fail in CI, skip (saying how to install it) elsewhere."""
    message = f"{what} is not available; install it with: {how}"
    if IN_CI:
        pytest.fail(message + " (CI=true: nothing may be skipped)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def secantus_executable() -> str | None:
    beside = Path(sys.executable).with_name("secantusd-py")
    return str(beside) if beside.exists() else shutil.which("secantusd-py")


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("OMNIGATE_TEST_MONGODB_URI")
    if given:
        yield given
        return
    executable = secantus_executable()
    if executable is None:
        need("SecantusDB (secantusd-py)", "pip install --pre 'secantusdb' (or omnigate[test])")
    assert executable is not None
    port = free_port()
    log = (tmp_path_factory.mktemp("secantus") / "server.log").open("wb")
    process = subprocess.Popen(  # dies with pytest: no orphan server if pytest is killed
        dies_with_parent([executable, "--host", "127.0.0.1", "--port", str(port),
                          "--storage-path", ":memory:", "--log-level", "WARNING"]),
        stdout=log, stderr=log, start_new_session=True,
    )
    try:
        wait_for_port(port, process, 30)
        yield f"mongodb://127.0.0.1:{port}/?directConnection=true"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def db_name() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def store(mongo_uri: str, db_name: str) -> AsyncIterator[Store]:
    store = Store.connect(mongo_uri, db_name)
    await store.ensure_indexes()
    try:
        yield store
    finally:
        await store.client.drop_database(db_name)
        await store.close()


@pytest.fixture
def settings(mongo_uri: str, db_name: str, tmp_path: Path) -> Settings:
    return Settings(
        mongodb_uri=mongo_uri, mongodb_db=db_name, data_dir=tmp_path / "data",
        outbox_sweep_seconds=0.2,
    )


async def unprocessed(store: Store) -> int:
    """Inbound items whose turn is not done (above their turn state's processed_seq, as
    the turn records written after its checkpoint bring it forward)."""
    count = 0
    async for conv in store.turn_state.find({}, {"processed_seq": 1}):
        done = await processed_after(store, conv["_id"], int(conv.get("processed_seq") or 0))
        count += await store.messages.count_documents(
            {"conversation_id": conv["_id"], "direction": Direction.INBOUND.value,
             "seq": {"$gt": done}})
    return count


async def processed(store: Store, item_id: str) -> bool:
    """Whether the inbound item's turn is done (at or below its processed_seq)."""
    doc = await store.messages.find_one({"_id": item_id}, {"conversation_id": 1, "seq": 1})
    assert doc is not None, f"no item {item_id}"
    conv = await store.turn_state.find_one({"_id": doc["conversation_id"]},
                                           {"processed_seq": 1})
    assert conv is not None
    done = await processed_after(store, doc["conversation_id"],
                                 int(conv.get("processed_seq") or 0))
    return done >= int(doc["seq"])


class Gateway:
    """A running gateway on a real TCP port, plus helpers to drive it."""

    def __init__(self, server: TestServer, app: web.Application) -> None:
        self.server = server
        self.app = app
        self.http = aiohttp.ClientSession()

    @property
    def url(self) -> str:
        return str(self.server.make_url("/")).rstrip("/")

    @property
    def store(self) -> Store:
        return self.app[STORE]

    async def agent(self, name: str) -> tuple[str, dict[str, str]]:
        """Create an agent; returns (id, auth headers)."""
        agent, token = await self.app[AGENTS].add(name)
        return agent.id, {"Authorization": f"Bearer {token}"}

    async def socket(self, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        return await self.http.ws_connect(self.url + "/webchat/ws", **kwargs)

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until no turn is being processed and nothing is waiting in the outbox."""
        pipeline = self.app[PIPELINE]
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            pending = await unprocessed(self.store)
            pending += await self.store.messages.count_documents(
                {"delivery.status": {"$in": ["pending", "sending"]}})
            if not pending and not pipeline.busy():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the gateway did not settle")

    async def close(self) -> None:
        await self.http.close()


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """The whole gateway from ``settings`` on a real port; its database dropped after."""
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    gw = Gateway(server, app)
    try:
        yield gw
    finally:
        await gw.close()
        await server.close()
        assert settings.mongodb_uri is not None
        cleanup = Store.connect(settings.mongodb_uri, settings.mongodb_db)
        await cleanup.client.drop_database(settings.mongodb_db)
        await cleanup.close()


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    async with running_gateway(settings) as gw:
        yield gw


class Visitor:
    """A web chat client speaking the socket protocol, as a front end would."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.token: str | None = None
        self.watermark: int | None = None
        self.items: list[dict[str, Any]] = []  # every message/event received, in order
        self.frames: list[dict[str, Any]] = []  # everything else (acks, errors, ...)
        self.skipped: list[int] = []  # seqs of items the visitor may not see

    async def connect(self, *, resume: bool = True) -> dict[str, Any]:
        self.ws = await self.gateway.socket()
        await self.ws.send_json({"type": "hello", "token": self.token,
                                 "watermark": self.watermark if resume else None})
        welcome = await self.next_frame("welcome")
        self.token = welcome["token"]
        synced = await self.next_frame("synced")
        return {"welcome": welcome, "synced": synced}

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.ws is not None
        while True:
            frame = await asyncio.wait_for(self.ws.receive_json(), timeout)
            if frame["type"] != "skip":  # a seq the visitor does not see (a private note)
                break
            assert self.watermark is None or frame["seq"] == self.watermark + 1
            self.watermark = frame["seq"]
            self.skipped.append(frame["seq"])
        if frame["type"] in ("message", "event"):
            assert self.watermark is None or frame["seq"] == self.watermark + 1, (
                f"out of order or repeated: {frame['seq']} after {self.watermark}")
            self.watermark = frame["seq"]
            self.items.append(frame)
        else:
            self.frames.append(frame)
        return frame

    async def next_frame(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == kind:
                return frame

    async def until(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Receive until an item matches ``predicate``; returns that item."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] in ("message", "event") and predicate(frame):
                return frame

    async def say(self, text: str, client_id: str | None = None) -> dict[str, Any]:
        client_id = client_id or f"c{uuid.uuid4().hex[:12]}"
        assert self.ws is not None
        await self.ws.send_json({"type": "message", "client_id": client_id, "text": text})
        return await self.next_frame("ack")

    async def press(self, button: dict[str, str]) -> dict[str, Any]:
        assert self.ws is not None
        await self.ws.send_json({"type": "action", "client_id": f"c{uuid.uuid4().hex[:12]}",
                                 "value": button["value"], "title": button["title"]})
        return await self.next_frame("ack")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


@pytest.fixture
async def visitor(gateway: Gateway) -> AsyncIterator[Visitor]:
    v = Visitor(gateway)
    yield v
    await v.close()
