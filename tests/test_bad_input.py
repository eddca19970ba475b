"""Bad input gets a clear error, loses nothing, and the server keeps serving.

Everything goes over real sockets (web chat) and real HTTP (agent API) to a whole gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from pymongo.errors import AutoReconnect

import connectors.webchat.connector as webchat
from gateway.keys import AGENTS, CONNECTORS, PIPELINE, ROUTING
from gateway.model import Role
from gateway.settings import Settings
from tests.conftest import Gateway, Visitor, running_gateway
from tests.fakes.telegram_api import FakeTelegram, People

SHOP = "https://shop.example"
ACKED_TEXTS = ("hello", "opening hours", "shipping costs", "returns")  # the bot knows these


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """This module's gateways also allow one third-party page to embed the chat."""
    return settings.model_copy(update={"webchat_allowed_origins": [SHOP]})


def msg(**fields: Any) -> dict[str, Any]:
    return {"type": "message", **fields}


# (frame sent after welcome, error code, client_id the error carries, word its message names)
BAD_FRAMES = [
    pytest.param("{not json", "bad_json", None, "JSON", id="malformed-json"),
    pytest.param("[1, 2]", "bad_json", None, "JSON object", id="array"),
    pytest.param("42", "bad_json", None, "JSON object", id="number"),
    pytest.param("[" * 30000 + "]" * 30000, "bad_json", None, "JSON", id="nested-too-deep"),
    pytest.param(b'{"type": "ping"}', "bad_frame", None, "text", id="binary"),
    pytest.param({"type": "shout", "client_id": "c-1"}, "unknown_type", "c-1", "shout",
                 id="unknown-type"),
    pytest.param({"client_id": "c-1", "text": "hi"}, "unknown_type", "c-1", "type", id="no-type"),
    pytest.param({"type": "hello", "token": None}, "already_ready", None, "hello",
                 id="second-hello"),
    pytest.param(msg(text="hi"), "bad_frame", None, "client_id", id="no-client-id"),
    pytest.param(msg(client_id=7, text="hi"), "bad_frame", None, "client_id",
                 id="client-id-number"),
    pytest.param(msg(client_id="has space", text="hi"), "bad_frame", "has space", "client_id",
                 id="client-id-pattern"),
    pytest.param(msg(client_id="c" * 65, text="hi"), "bad_frame", None, "client_id",
                 id="client-id-too-long"),
    pytest.param(msg(client_id="c-1"), "bad_frame", "c-1", "text", id="no-text"),
    pytest.param(msg(client_id="c-1", text=""), "bad_frame", "c-1", "text", id="empty-text"),
    pytest.param(msg(client_id="c-1", text=" \n\t "), "bad_frame", "c-1", "text",
                 id="blank-text"),
    pytest.param(msg(client_id="c-1", text=["hi"]), "bad_frame", "c-1", "text", id="text-list"),
    pytest.param({"type": "action", "client_id": "c-1", "value": "faq:hours"}, "bad_frame",
                 "c-1", "title", id="action-without-title"),
    pytest.param({"type": "history", "before": 0}, "bad_frame", None, "before",
                 id="history-before-0"),
    pytest.param({"type": "history", "before": 10**20}, "bad_frame", None, "before",
                 id="history-before-huge"),
    pytest.param({"type": "history", "before": 5, "limit": 101}, "bad_frame", None, "limit",
                 id="history-limit"),
    pytest.param(msg(client_id="c-1", text="x" * 4001), "text_too_long", "c-1", "4000",
                 id="text-too-long"),
    pytest.param(msg(client_id="c-1", text="x" * 70_000), "too_large", "c-1", "65536",
                 id="frame-too-large"),
]


async def send_raw(visitor: Visitor, frame: Any) -> None:
    assert visitor.ws is not None
    if isinstance(frame, bytes):
        await visitor.ws.send_bytes(frame)
    elif isinstance(frame, str):
        await visitor.ws.send_str(frame)
    else:
        await visitor.ws.send_json(frame)


async def served(visitor: Visitor, text: str, client_id: str | None = None) -> dict[str, Any]:
    """A valid message is acked, echoed as the customer's, and answered by the bot."""
    ack = await visitor.say(text, client_id)
    assert ack["duplicate"] is False
    echo = await visitor.until(lambda i: i["seq"] == ack["seq"])
    assert (echo["role"], echo["text"], echo["client_id"]) == ("customer", text, ack["client_id"])
    await visitor.until(lambda i: i.get("role") == "bot" and i["seq"] > ack["seq"])
    return ack


async def stored_customer_messages(gateway: Gateway) -> list[tuple[str, str, int]]:
    """(client_id, text, seq) of every customer message in the store, oldest first."""
    docs = await gateway.store.messages.find({"sender.role": Role.CUSTOMER.value}).to_list()
    docs.sort(key=lambda d: (d["conversation_id"], d["seq"]))
    return [(d["external_id"].split(":", 1)[1], d["text"], d["seq"]) for d in docs]


async def closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> int | None:
    """Read until the server closes the socket; its close code."""
    while True:
        frame = await ws.receive(timeout)
        if frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            return ws.close_code


@pytest.mark.parametrize(("frame", "code", "client_id", "names"), BAD_FRAMES)
async def test_a_bad_frame_is_answered_and_the_socket_keeps_serving(
    gateway: Gateway, visitor: Visitor, frame: Any, code: str, client_id: str | None, names: str
) -> None:
    await visitor.connect()
    first = await served(visitor, "hello")
    await send_raw(visitor, frame)
    error = await visitor.next_frame("error")
    assert (error["code"], error["client_id"]) == (code, client_id)
    assert names in error["message"]
    second = await served(visitor, "opening hours")
    await gateway.settle()
    assert await stored_customer_messages(gateway) == [
        (first["client_id"], "hello", first["seq"]),
        (second["client_id"], "opening hours", second["seq"]),
    ]


async def test_after_all_the_abuse_every_acked_message_is_stored_exactly_once(
    gateway: Gateway, visitor: Visitor
) -> None:
    session = await visitor.connect()
    acked: list[tuple[str, str, int]] = []  # (client_id, text, seq) of every ack

    async def say(text: str) -> None:
        ack = await served(visitor, text)
        acked.append((ack["client_id"], text, ack["seq"]))

    await say("hello")
    for n, param in enumerate(BAD_FRAMES):
        frame, code, *_ = param.values
        await send_raw(visitor, frame)
        assert (await visitor.next_frame("error"))["code"] == code
        await say(ACKED_TEXTS[n % len(ACKED_TEXTS)])
    client_id, text, seq = acked[1]
    resent = await visitor.say(text, client_id)  # the same message again: stored once
    assert (resent["duplicate"], resent["seq"]) == (True, seq)
    # a frame over 1 MiB ends the socket; the visitor comes back and carries on
    await send_raw(visitor, msg(client_id="c-huge", text="x" * (1024 * 1024)))
    assert visitor.ws is not None and await closed_with(visitor.ws) == 1009
    assert (await visitor.connect())["welcome"]["visitor_id"] == session["welcome"]["visitor_id"]
    await say("returns")
    await gateway.settle()

    assert await stored_customer_messages(gateway) == acked
    conversation = await gateway.store.find_conversation("webchat",
                                                         session["welcome"]["visitor_id"])
    assert conversation is not None
    history, has_more = await gateway.store.history(conversation.id, limit=1000)
    assert not has_more
    top = await gateway.store.top_seq(conversation.id)
    assert [i.seq for i in history] == list(range(top, 0, -1))  # no gaps, no repeats


async def test_before_hello_only_hello_is_accepted(gateway: Gateway) -> None:
    visitor = Visitor(gateway)
    visitor.ws = await gateway.socket()
    for frame, code, client_id in [
        (msg(client_id="c-early", text="hi"), "not_ready", "c-early"),
        ({"type": "ping"}, "not_ready", None),
        ("{oops", "bad_json", None),
        ({"type": "hello", "watermark": -1}, "bad_frame", None),
        ({"type": "hello", "token": 12345}, "bad_frame", None),
    ]:
        await send_raw(visitor, frame)
        error = await visitor.next_frame("error")
        assert (error["code"], error["client_id"]) == (code, client_id), frame
    await visitor.ws.send_json({"type": "hello", "token": None, "watermark": None})
    assert (await visitor.next_frame("welcome"))["new"] is True
    await visitor.next_frame("synced")
    await served(visitor, "hello")
    assert "c-early" not in [cid for cid, _, _ in await stored_customer_messages(gateway)]
    await visitor.close()


@pytest.mark.parametrize(
    "token", ["not-a-token-we-issued", "", "x" * 201, "t" * 60_000], ids=["unknown", "empty",
                                                                          "too-long", "huge"])
async def test_a_bad_token_is_refused_with_4401(gateway: Gateway, token: str) -> None:
    ws = await gateway.socket()
    await ws.send_json({"type": "hello", "token": token, "watermark": None})
    error = await ws.receive_json(timeout=5)
    assert (error["type"], error["code"]) == ("error", "invalid_token")
    assert await closed_with(ws) == 4401
    fresh = Visitor(gateway)  # forgetting the token and starting again works
    assert (await fresh.connect())["welcome"]["new"] is True
    await fresh.close()


async def test_a_token_of_another_visitor_altered_by_one_character_is_refused(
    gateway: Gateway, visitor: Visitor
) -> None:
    await visitor.connect()
    await served(visitor, "hello")
    assert visitor.token is not None
    altered = visitor.token[:-1] + ("A" if visitor.token[-1] != "A" else "B")
    ws = await gateway.socket()
    await ws.send_json({"type": "hello", "token": altered, "watermark": None})
    assert (await ws.receive_json(timeout=5))["code"] == "invalid_token"
    assert await closed_with(ws) == 4401


async def test_no_hello_in_time_closes_with_4408(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webchat, "HELLO_TIMEOUT", 0.3)
    silent = await gateway.socket()
    assert await closed_with(silent) == 4408
    # chatter that is not a hello does not extend the deadline
    chatty = await gateway.socket()
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 5
    while loop.time() < give_up:
        await chatty.send_json({"type": "ping"})
        frame = await chatty.receive(timeout=5)
        if frame.type is not WSMsgType.TEXT:
            break
        assert json.loads(frame.data)["code"] == "not_ready"
        await asyncio.sleep(0.05)  # pace the client, like a slow drip of frames
    assert chatty.close_code == 4408
    visitor = Visitor(gateway)  # the server still serves
    await visitor.connect()
    await served(visitor, "hello")
    await visitor.close()


async def test_text_at_the_limit_is_accepted(gateway: Gateway, visitor: Visitor) -> None:
    await visitor.connect()
    plain = await visitor.say("  " + "x" * 4000 + "  ")  # trimmed to exactly 4000
    escaped = "é" * 4000  # sent as \u00e9: 24,000 bytes, still one frame
    assert visitor.ws is not None
    await visitor.ws.send_str(json.dumps(msg(client_id="c-accents", text=escaped)))
    accents = await visitor.next_frame("ack")
    assert accents["client_id"] == "c-accents"
    await gateway.settle()
    stored = await stored_customer_messages(gateway)
    assert [(cid, text) for cid, text, _ in stored] == [
        (plain["client_id"], "x" * 4000), ("c-accents", escaped)]


async def test_a_frame_over_one_mebibyte_closes_with_1009_and_the_server_goes_on(
    gateway: Gateway, visitor: Visitor
) -> None:
    await visitor.connect()
    assert visitor.ws is not None
    await visitor.ws.send_str("x" * (1024 * 1024 + 1))
    assert await closed_with(visitor.ws) == 1009
    other = Visitor(gateway)
    await other.connect()
    await served(other, "hello")
    await other.close()


async def test_wrong_origin_is_refused_before_the_upgrade(gateway: Gateway) -> None:
    for origin in ("https://evil.example", "https://shop.example.evil.example",
                   "http://shop.example", "null"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await gateway.socket(headers={"Origin": origin})
        assert refused.value.status == 403, origin
    response = await gateway.http.get(gateway.url + "/webchat/ws",
                                      headers={"Origin": "https://evil.example"})
    assert response.status == 403
    assert (await response.json())["error"] == "origin_not_allowed"


@pytest.mark.parametrize("origin", ["allowed", "same"])
async def test_allowed_and_same_origin_may_chat(gateway: Gateway, origin: str) -> None:
    ws = await gateway.socket(headers={"Origin": SHOP if origin == "allowed" else gateway.url})
    await ws.send_json({"type": "hello", "token": None, "watermark": None})
    assert (await ws.receive_json(timeout=5))["type"] == "welcome"
    await ws.close()


async def test_store_unavailable_means_not_acked_and_a_resend_stores_once(
    gateway: Gateway, visitor: Visitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    await visitor.connect()
    first = await served(visitor, "hello")

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise AutoReconnect("store down (test)")

    monkeypatch.setattr(gateway.store, "append_inbound", down)
    await send_raw(visitor, msg(client_id="c-retry", text="opening hours"))
    error = await visitor.next_frame("error")
    assert (error["code"], error["client_id"]) == ("unavailable", "c-retry")
    await send_raw(visitor, {"type": "ping"})
    await visitor.next_frame("pong")  # answered in order: no ack came before it
    assert [f["client_id"] for f in visitor.frames if f["type"] == "ack"] == [first["client_id"]]

    monkeypatch.undo()
    stored = await served(visitor, "opening hours", "c-retry")
    again = await visitor.say("opening hours", "c-retry")
    assert again["duplicate"] is True and (again["id"], again["seq"]) == (stored["id"],
                                                                           stored["seq"])
    await gateway.settle()
    assert [cid for cid, _, _ in await stored_customer_messages(gateway)] == [
        first["client_id"], "c-retry"]
    answers = await gateway.store.messages.count_documents({"text": {"$regex": "Monday"}})
    assert answers == 1  # answered once


async def test_store_unavailable_at_hello(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise AutoReconnect("store down (test)")

    # a hello writes nothing (signed tokens), but it reads the visitor's conversation
    monkeypatch.setattr(gateway.store, "find_conversation", down)
    ws = await gateway.socket()
    await ws.send_json({"type": "hello", "token": None, "watermark": None})
    assert (await ws.receive_json(timeout=5))["code"] == "unavailable"
    assert await closed_with(ws) == aiohttp.WSCloseCode.TRY_AGAIN_LATER
    monkeypatch.undo()
    visitor = Visitor(gateway)
    assert (await visitor.connect())["welcome"]["new"] is True
    await visitor.close()


async def test_store_failing_during_the_replay_is_unavailable_not_internal(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Visitor(gateway)
    await first.connect()
    await first.say("hello")
    await first.close()

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise AutoReconnect("store down (test)")

    monkeypatch.setattr(gateway.store, "history", down)
    ws = await gateway.socket()
    await ws.send_json({"type": "hello", "token": first.token, "watermark": None})
    assert (await ws.receive_json(timeout=5))["type"] == "welcome"
    assert (await ws.receive_json(timeout=5))["code"] == "unavailable"
    assert await closed_with(ws) == aiohttp.WSCloseCode.TRY_AGAIN_LATER
    monkeypatch.undo()
    # nothing lingers in the hub, and the visitor resumes once the store is back
    hub = gateway.app[CONNECTORS]["webchat"].hub
    assert hub.count() == 0
    again = Visitor(gateway)
    again.token = first.token
    synced = (await again.connect())["synced"]
    assert synced["watermark"] >= 1
    await again.close()


async def test_agent_api_store_unavailable_is_503(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, alice = await gateway.agent("Alice")

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise AutoReconnect("store down (test)")

    def find_down(*_args: Any, **_kwargs: Any) -> Any:
        raise AutoReconnect("store down (test)")

    monkeypatch.setattr(gateway.store, "list_conversations", down)
    monkeypatch.setattr(gateway.store.conversations, "find", find_down)
    for query in ("", "?owner=bot", "?owner=queued,agent"):  # the queue and the plain list
        response = await gateway.http.get(
            gateway.url + "/api/v1/conversations" + query, headers=alice)
        assert response.status == 503, query
        assert (await response.json())["error"] == "unavailable"


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer wrong", "Bearer og_" + "x" * 43,
     "Token {token}", "{token}"],
    ids=["none", "basic", "empty-bearer", "wrong", "unknown", "wrong-scheme", "no-scheme"],
)
async def test_agent_api_refuses_without_a_valid_token(
    gateway: Gateway, authorization: str | None
) -> None:
    _, alice = await gateway.agent("Alice")
    token = alice["Authorization"].removeprefix("Bearer ")
    headers = {} if authorization is None else {
        "Authorization": authorization.format(token=token)}
    api = gateway.url + "/api/v1"
    for method, url in [("GET", api + "/me"), ("GET", api + "/conversations"),
                        ("POST", api + "/conversations/abc/claim"),
                        ("POST", api + "/conversations/abc/messages")]:
        response = await gateway.http.request(method, url, headers=headers, json={"text": "hi"})
        assert response.status == 401, (method, url)
        body = await response.json()
        assert body["error"] == "unauthorized" and set(body) == {"error", "message"}
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # the real token works, whatever the scheme's case; the docs need none
    ok = await gateway.http.get(api + "/me", headers={"Authorization": f"bearer {token}"})
    assert ok.status == 200 and (await ok.json())["name"] == "Alice"
    for public in ("/api/openapi.json", "/api/docs"):
        assert (await gateway.http.get(gateway.url + public)).status == 200


# ----------------------------------------------------------- JSON nested too deeply

DEEP = "[" * 100_000  # far past the parser's recursion limit: a RecursionError, not a 500
DEEP_FRAME = "[" * 60_000  # as deep, but under the sockets' 64 KiB frame limit
PASSWORD = "correct horse battery"


async def post_raw(gateway: Gateway, path: str, body: str,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with gateway.http.post(gateway.url + path, data=body, headers={
            **(headers or {}), "Content-Type": "application/json"}) as response:
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        return response.status, await response.json()


async def test_a_body_nested_too_deeply_on_sign_in_is_a_400(gateway: Gateway) -> None:
    await gateway.app[AGENTS].add("Alice", "alice@example.com", password=PASSWORD)
    status, error = await post_raw(gateway, "/api/v1/session", DEEP)
    assert (status, error["error"]) == (400, "bad_request")
    assert "nested too deeply" in error["message"]
    async with gateway.http.post(gateway.url + "/api/v1/session", json={
            "email": "alice@example.com", "password": PASSWORD}) as response:
        assert response.status == 200  # the server goes on serving


async def test_a_reply_nested_too_deeply_is_a_400_and_nothing_is_stored(
    gateway: Gateway,
) -> None:
    _, alice = await gateway.agent("Alice")
    conversation = await gateway.app[PIPELINE].open_conversation("webchat", "v_deep", "v_deep")
    assert await gateway.app[ROUTING].handoff(conversation.id, "test: needs a human")
    await gateway.settle()
    path = f"/api/v1/conversations/{conversation.id}"
    async with gateway.http.post(gateway.url + path + "/claim", headers=alice) as response:
        assert response.status == 200
    async with gateway.http.get(gateway.url + path, headers=alice) as response:
        seq = (await response.json())["last_seq"]
    for body in (DEEP, '{"text": "hi", "extra": ' + DEEP + "}"):
        status, error = await post_raw(gateway, path + "/messages", body, alice)
        assert (status, error["error"]) == (400, "bad_request")
        assert "nested too deeply" in error["message"]
    async with gateway.http.get(gateway.url + path, headers=alice) as response:
        assert (await response.json())["last_seq"] == seq  # nothing stored
    async with gateway.http.post(gateway.url + path + "/messages", headers=alice,
                                 json={"text": "Alice here"}) as response:
        assert response.status == 201
        assert (await response.json())["seq"] == seq + 1


async def test_a_web_chat_frame_nested_too_deeply_gets_an_error_frame(
    gateway: Gateway, visitor: Visitor
) -> None:
    await visitor.connect()
    for frame, code in [(DEEP_FRAME, "bad_json"), (DEEP, "too_large")]:
        await send_raw(visitor, frame)
        error = await visitor.next_frame("error")
        assert (error["code"], error["client_id"]) == (code, None)
        await served(visitor, "hello")
    await visitor.close()


async def test_a_console_frame_nested_too_deeply_gets_an_error_frame(gateway: Gateway) -> None:
    _, alice = await gateway.agent("Alice")

    async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
        while (frame := await ws.receive_json(timeout=5))["type"] != kind:
            pass  # presence and other pushes
        return frame  # type: ignore[no-any-return]

    async with gateway.http.ws_connect(gateway.url + "/api/v1/live", headers=alice) as ws:
        await next_of(ws, "ready")
        await ws.send_str(DEEP_FRAME)
        assert (await next_of(ws, "error"))["code"] == "bad_json"
        await ws.send_json({"type": "ping", "ref": "after"})
        assert (await next_of(ws, "pong"))["ref"] == "after"  # the socket goes on serving


TELEGRAM_TOKEN = "123456:TEST-token_abc"
TELEGRAM_SECRET = "s3cret_Secret-42"


@contextlib.asynccontextmanager
async def telegram_webhook_gateway(
    settings: Settings, **more: Any
) -> AsyncIterator[tuple[Gateway, FakeTelegram]]:
    """A gateway with Telegram on by webhook (``more`` settings on top), against a local
    fake Bot API."""
    fake = FakeTelegram(token=TELEGRAM_TOKEN)
    await fake.start()
    try:
        async with running_gateway(settings.model_copy(update={
                "telegram_token": TELEGRAM_TOKEN, "telegram_mode": "webhook",
                "telegram_webhook_secret": TELEGRAM_SECRET,
                "telegram_api_url": fake.url, **more})) as gw:
            yield gw, fake
    finally:
        await fake.close()


@pytest.fixture
async def telegram_gateway(settings: Settings) -> AsyncIterator[tuple[Gateway, FakeTelegram]]:
    async with telegram_webhook_gateway(
            settings, telegram_webhook_url="https://gw.example/webhooks/telegram") as both:
        yield both


async def test_a_telegram_update_nested_too_deeply_is_a_400(
    telegram_gateway: tuple[Gateway, FakeTelegram],
) -> None:
    gateway, telegram = telegram_gateway
    headers = {"X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET}
    for body in (DEEP, '{"update_id": 1, "message": ' + DEEP + "}"):
        status, error = await post_raw(gateway, "/webhooks/telegram", body, headers)
        assert (status, error["error"]) == (400, "bad_update")
    ann = People.user(1001)
    update = People(telegram).message(ann, text="hello")
    status, body = await telegram.deliver(gateway.http, gateway.url + "/webhooks/telegram",
                                          update, TELEGRAM_SECRET)
    assert (status, body["outcome"]) == (200, "stored")


# --------------------------------------------------------------- nosniff everywhere


async def nosniff(gateway: Gateway, method: str, path: str, status: int, **kwargs: Any) -> None:
    async with gateway.http.request(method, gateway.url + path, **kwargs) as response:
        assert response.status == status, (method, path)
        assert response.headers.get("X-Content-Type-Options") == "nosniff", (method, path)


async def test_every_response_says_nosniff(gateway: Gateway) -> None:
    _, alice = await gateway.agent("Alice")
    await nosniff(gateway, "GET", "/api/v1/me", 200, headers=alice)
    await nosniff(gateway, "GET", "/api/v1/me", 401)
    await nosniff(gateway, "GET", "/api/v1/no-such-thing", 404, headers=alice)
    await nosniff(gateway, "DELETE", "/api/v1/me", 405, headers=alice)
    await nosniff(gateway, "GET", "/no-such-page", 404)
    await nosniff(gateway, "POST", "/healthz", 405)
    await nosniff(gateway, "GET", "/healthz", 200)
    await nosniff(gateway, "GET", "/api/openapi.json", 200)
    await nosniff(gateway, "GET", "/console/", 200)
    await nosniff(gateway, "GET", "/webchat/widget.js", 200)
    await nosniff(gateway, "GET", "/webchat/widget.css", 200)
    await nosniff(gateway, "GET", "/webchat/no-such-file", 404)
    await nosniff(gateway, "GET", "/", 200)  # the demo page


async def test_webhook_responses_say_nosniff(
    telegram_gateway: tuple[Gateway, FakeTelegram],
) -> None:
    gateway, telegram = telegram_gateway
    update = People(telegram).message(People.user(1002), text="hello")
    headers = {"X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET}
    await nosniff(gateway, "POST", "/webhooks/telegram", 200, json=update, headers=headers)
    await nosniff(gateway, "POST", "/webhooks/telegram", 403, json=update)  # no secret
    await nosniff(gateway, "GET", "/webhooks/telegram", 405)
