"""Signed web chat visitor tokens: a hello writes nothing, the first message creates the
visitor, old stored tokens still work, forged ones are refused, processes agree.

Real sockets to whole gateways on the real store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from connectors.webchat.tokens import SECRET_ID, TokenSigner, legacy_key, load_secret
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import Gateway, Visitor, running_gateway


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """All sockets of these tests come from 127.0.0.1: no per-address hello limit."""
    return settings.model_copy(update={"webchat_connects_per_minute": 0})


async def counts(store: Store) -> dict[str, int]:
    """The number of documents in every collection of the database."""
    names = sorted(await store.db.list_collection_names())
    return {name: await store.db[name].count_documents({}) for name in names}


async def closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> int | None:
    while True:
        frame = await ws.receive(timeout)
        if frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            return ws.close_code


async def hello(gateway: Gateway, token: str | None) -> tuple[dict[str, Any], int | None]:
    """Say hello with ``token``; (the first frame answered, the close code if it closed)."""
    ws = await gateway.socket()
    try:
        await ws.send_json({"type": "hello", "token": token, "watermark": None})
        first = await ws.receive_json(timeout=10)
        if first["type"] == "error":
            return first, await closed_with(ws)
        while (await ws.receive_json(timeout=10))["type"] != "synced":
            pass  # the replayed history
        return first, None
    finally:
        await ws.close()


async def test_hellos_without_token_write_nothing_until_the_first_message(
    gateway: Gateway,
) -> None:
    store = gateway.store
    await gateway.settle()
    before = await counts(store)

    async def anonymous() -> dict[str, Any]:
        ws = await gateway.socket()
        await ws.send_json({"type": "hello", "token": None, "watermark": None})
        welcome = await ws.receive_json(timeout=30)
        synced = await ws.receive_json(timeout=30)
        assert (welcome["type"], synced["type"]) == ("welcome", "synced")
        await ws.close()
        return welcome

    welcomes: list[dict[str, Any]] = []
    for _ in range(20):  # 200 sockets, 10 at a time
        welcomes += await asyncio.gather(*(anonymous() for _ in range(10)))
    assert len({w["token"] for w in welcomes}) == 200
    assert all(w["new"] is True and w["conversation_id"] is None for w in welcomes)
    assert await counts(store) == before  # not one document, in any collection

    # the first message creates the visitor's contact and conversation
    visitor = Visitor(gateway)
    visitor.token = welcomes[-1]["token"]
    session = await visitor.connect()
    assert session["welcome"]["new"] is False
    assert session["welcome"]["visitor_id"] == welcomes[-1]["visitor_id"]
    ack = await visitor.say("opening hours")
    answer = await visitor.until(lambda f: f["role"] == "bot")
    conversation = await store.find_conversation("webchat", welcomes[-1]["visitor_id"])
    assert conversation is not None
    await visitor.close()

    # a reconnect with the token resumes that conversation, with its history
    again = Visitor(gateway)
    again.token = welcomes[-1]["token"]
    resumed = await again.connect(resume=False)
    assert resumed["welcome"]["conversation_id"] == conversation.id
    replayed = [item["id"] for item in again.items]
    assert ack["id"] in replayed and answer["id"] in replayed
    await again.close()
    # the other 199 visitors still have nothing stored
    assert await store.contacts.count_documents({}) == 1


async def test_a_token_stored_by_an_older_version_resumes_as_before(gateway: Gateway) -> None:
    store = gateway.store
    # the way versions before signed tokens issued one: a random token, its SHA-256 stored
    old_token, visitor_id = secrets.token_urlsafe(32), "v_" + secrets.token_urlsafe(12)
    await store.put_state("webchat", legacy_key(old_token), {"visitor_id": visitor_id})
    assert await store.get_state(
        "webchat", "token:" + hashlib.sha256(old_token.encode()).hexdigest()) is not None

    visitor = Visitor(gateway)
    visitor.token = old_token
    session = await visitor.connect()
    assert session["welcome"]["token"] == old_token  # kept: the browser need not change it
    assert session["welcome"]["visitor_id"] == visitor_id
    ack = await visitor.say("opening hours")
    await visitor.until(lambda f: f["role"] == "bot")
    await visitor.close()

    back = Visitor(gateway)
    back.token = old_token
    resumed = await back.connect(resume=False)
    assert resumed["welcome"]["conversation_id"] is not None
    assert ack["id"] in [item["id"] for item in back.items]
    conversation = await store.find_conversation("webchat", visitor_id)
    assert conversation is not None and conversation.id == resumed["welcome"]["conversation_id"]
    await back.close()


def forge(visitor_id: str, key: bytes) -> str:
    mac = hmac.new(key, f"v1.{visitor_id}".encode(), hashlib.sha256).digest()
    return f"v1.{visitor_id}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


async def test_forged_and_garbled_tokens_are_refused_with_4401(gateway: Gateway) -> None:
    visitor = Visitor(gateway)
    await visitor.connect()
    await visitor.say("hello")
    assert visitor.token is not None
    _, visitor_id, mac = visitor.token.split(".")
    other = TokenSigner(secrets.token_bytes(32)).issue(visitor_id)  # another secret
    for token in [
        other,
        forge(visitor_id, b"guessed key"),
        f"v1.{visitor_id}.",
        f"v1.{visitor_id}",
        f"v1.{visitor_id}.{mac}.x",
        f"v2.{visitor_id}.{mac}",
        f"v1.v_someoneelse123.{mac}",  # the MAC of another visitor
        f"v1.{visitor_id}.{mac[:-1]}{'B' if mac[-1] == 'A' else 'A'}",  # same bytes in b64
        f"v1.{visitor_id}.{mac}\u00e9",
        "v1." + "x" * 300,
    ]:
        frame, code = await hello(gateway, token)
        assert (frame["type"], frame["code"], code) == ("error", "invalid_token", 4401), token
    frame, code = await hello(gateway, visitor.token)  # the real one still works
    assert frame["type"] == "welcome" and code is None
    await visitor.close()


async def test_processes_on_one_store_accept_each_others_tokens(settings: Settings) -> None:
    """Two gateways started at once on one store make one secret; a token from either
    resumes on the other."""
    async with running_gateway(settings) as first, running_gateway(settings) as second:
        store = first.store
        assert await store.channel_state.count_documents({"_id": SECRET_ID}) == 1
        visitor = Visitor(first)
        await visitor.connect()
        ack = await visitor.say("hello")
        await visitor.close()
        elsewhere = Visitor(second)
        elsewhere.token = visitor.token
        resumed = await elsewhere.connect(resume=False)
        assert resumed["welcome"]["new"] is False
        assert ack["id"] in [item["id"] for item in elsewhere.items]
        await elsewhere.close()


async def test_the_secret_is_created_once_under_concurrent_starts(store: Store) -> None:
    secrets_seen = await asyncio.gather(*(load_secret(store) for _ in range(8)))
    assert len(set(secrets_seen)) == 1 and len(secrets_seen[0]) == 32
    assert await store.channel_state.count_documents({"_id": SECRET_ID}) == 1


async def test_with_a_secret_key_nothing_is_stored_and_it_signs(settings: Settings) -> None:
    key = "k" * 40
    keyed = settings.model_copy(update={"secret_key": key})
    async with running_gateway(keyed) as gateway:
        assert await gateway.store.channel_state.count_documents({"_id": SECRET_ID}) == 0
        frame, _ = await hello(gateway, None)
        token = frame["token"]
        assert TokenSigner(key.encode()).verify(token) == frame["visitor_id"]
        again, code = await hello(gateway, token)
        assert again["type"] == "welcome" and code is None
        # a gateway on the store's random secret instead does not accept it
        async with running_gateway(settings) as unkeyed:
            refused, code = await hello(unkeyed, token)
            assert (refused["code"], code) == ("invalid_token", 4401)
