"""The console's live socket over real HTTP: auth and roles per frame, queue and assignment
updates, notifications, typing both ways with a web chat visitor, presence, and a change
made by a second gateway process reaching a socket of the first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from gateway.desk.auth import COOKIE
from gateway.keys import AGENTS, PIPELINE, ROUTING
from gateway.model import AgentRole, OwnerState, Presence
from gateway.settings import Settings
from tests.conftest import Gateway, Visitor, running_gateway

PASSWORD = "correct horse battery"
HUMAN = "I want to talk to a human please"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"routing_sweep_seconds": 0.2,
                                       "agent_offline_grace_seconds": 0.5})


class Console:
    """An agent console's socket, as the front end will use it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def until(self, predicate: Callable[[dict[str, Any]], bool],
                    timeout: float = 10.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.01, deadline - loop.time()))
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"socket ended: {msg.type} {msg.data!r}")
            frame = msg.json()
            self.frames.append(frame)
            if predicate(frame):
                return frame

    async def ask(self, frame: dict[str, Any], answer: str | None = None) -> dict[str, Any]:
        ref = f"r{len(self.frames)}-{id(frame)}"
        await self.ws.send_json({**frame, "ref": ref})
        return await self.until(lambda f: f.get("ref") == ref
                                and (answer is None or f["type"] in (answer, "error")))

    async def close(self) -> None:
        await self.ws.close()


async def open_console(gateway: Gateway, headers: dict[str, str]) -> Console:
    ws = await gateway.http.ws_connect(gateway.url + "/api/v1/live", headers=headers)
    console = Console(ws)
    ready = await console.until(lambda f: f["type"] == "ready")
    assert ready["protocol"] == 1 and ready["live"] is True
    return console


async def person(gateway: Gateway, name: str, role: AgentRole = AgentRole.AGENT,
                 capacity: int = 3) -> tuple[str, dict[str, str]]:
    agent, token = await gateway.app[AGENTS].add(
        name, f"{name.lower()}@example.com", role=role, capacity=capacity, password=PASSWORD)
    return agent.id, {"Authorization": f"Bearer {token}"}


async def cookie_of(gateway: Gateway, email: str) -> str:
    async with gateway.http.post(gateway.url + "/api/v1/session",
                                 json={"email": email, "password": PASSWORD}) as response:
        assert response.status == 200
        return response.cookies[COOKIE].value


async def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def consoles() -> AsyncIterator[list[Console]]:
    opened: list[Console] = []
    yield opened
    for console in opened:
        await console.close()


# ------------------------------------------------------------------------ auth


async def test_the_socket_needs_a_session_or_token_and_refuses_other_sites(
    gateway: Gateway,
) -> None:
    await person(gateway, "Alice")
    url = gateway.url + "/api/v1/live"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.http.ws_connect(url)
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.http.ws_connect(url, headers={"Authorization": "Bearer og_nonsense"})
    assert refused.value.status == 401
    cookie = await cookie_of(gateway, "alice@example.com")
    evil = {"Cookie": f"{COOKIE}={cookie}", "Origin": "https://evil.example"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.http.ws_connect(url, headers=evil)
    assert refused.value.status == 403
    # the same cookie from the gateway's own origin is welcome
    own = {"Cookie": f"{COOKIE}={cookie}", "Origin": gateway.url}
    console = await open_console(gateway, own)
    assert (await console.ask({"type": "ping"}))["type"] == "pong"
    # signing out ends the socket at its next frame
    async with gateway.http.get(gateway.url + "/api/v1/session",
                                headers={"Cookie": f"{COOKIE}={cookie}"}) as response:
        csrf = (await response.json())["csrf_token"]
    async with gateway.http.delete(gateway.url + "/api/v1/session", headers={
            "Cookie": f"{COOKIE}={cookie}", "X-CSRF-Token": csrf}) as response:
        assert response.status == 204
    await console.ws.send_json({"type": "ping"})
    error = await console.until(lambda f: f["type"] == "error")
    assert error["code"] == "unauthorized"
    msg = await console.ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4401


async def test_every_frame_is_checked_against_the_role(
    gateway: Gateway, visitor: Visitor, consoles: list[Console]
) -> None:
    await visitor.connect()
    await visitor.say("hello")
    conversation = await gateway.store.find_conversation("webchat", await visitor_id(gateway))
    assert conversation is not None
    _, designer = await person(gateway, "Dee", AgentRole.DESIGNER)
    _, agent = await person(gateway, "Alice")
    dee = await open_console(gateway, designer)
    consoles.append(dee)
    for frame in ({"type": "subscribe", "conversation_id": conversation.id},
                  {"type": "typing", "conversation_id": conversation.id},
                  {"type": "presence", "presence": "online"}):
        refused = await dee.ask(frame)
        assert (refused["type"], refused["code"]) == ("error", "forbidden"), frame
    assert (await dee.ask({"type": "ping"}))["type"] == "pong"
    alice = await open_console(gateway, agent)
    consoles.append(alice)
    subscribed = await alice.ask({"type": "subscribe", "conversation_id": conversation.id})
    assert subscribed["type"] == "subscribed" and subscribed["last_seq"] >= 2
    unknown = await alice.ask({"type": "subscribe", "conversation_id": "nope"})
    assert unknown["code"] == "not_found"
    # the designer's socket never got anything of conversations
    await visitor.say("anyone there?")
    await alice.until(lambda f: f["type"] == "item" and f["item"]["text"] == "anyone there?")
    assert (await dee.ask({"type": "ping"}))["type"] == "pong"
    assert {f["type"] for f in dee.frames} <= {"ready", "error", "pong"}
    # an agent made a designer while connected: refused from the next frame on
    await gateway.app[AGENTS].update(subscribed_agent(alice), {"role": AgentRole.DESIGNER})
    refused = await alice.ask({"type": "unsubscribe", "conversation_id": conversation.id})
    assert refused["code"] == "forbidden"


def subscribed_agent(console: Console) -> str:
    return str(next(f for f in console.frames if f["type"] == "ready")["agent"]["id"])


async def visitor_id(gateway: Gateway) -> str:
    [doc] = await gateway.store.conversations.find({"channel": "webchat"}).to_list()
    return str(doc["thread_key"])


# --------------------------------------------------------------- live updates


async def test_queue_assignment_and_message_notifications_arrive_live(
    gateway: Gateway, visitor: Visitor, consoles: list[Console]
) -> None:
    alice_id, alice_auth = await person(gateway, "Alice", capacity=0)  # nothing assigned yet
    _, bob_auth = await person(gateway, "Bob", capacity=0)
    alice = await open_console(gateway, alice_auth)
    bob = await open_console(gateway, bob_auth)
    consoles += [alice, bob]
    await visitor.connect()
    await visitor.say(HUMAN)
    queued = await bob.until(lambda f: f["type"] == "conversation" and f["in_queue"])
    conversation_id = queued["conversation"]["id"]
    assert queued["conversation"]["owner"] == "queued" and queued["mine"] is False
    assert queued["conversation"]["handoff"]["reason"] == "customer asked for a human"
    # Alice frees capacity: the conversation is assigned to her, and she is told
    await gateway.app[ROUTING].set_capacity(alice_id, 2)
    note = await alice.until(lambda f: f["type"] == "notification" and f["kind"] == "assigned")
    assert note["conversation"]["id"] == conversation_id
    assert note["conversation"]["assignee_id"] == alice_id
    # (the list update comes just before the notification, from the same change)
    mine = next(f for f in alice.frames if f["type"] == "conversation" and f["mine"])
    assert mine["conversation"]["owner"] == "agent"
    gone = await bob.until(lambda f: f["type"] == "conversation" and not f["in_queue"])
    assert gone["mine"] is False and gone["conversation"]["assignee_id"] == alice_id
    # a new customer message: a notification for the assignee only
    await visitor.say("my order 1234 is late")
    message = await alice.until(lambda f: f["type"] == "notification" and f["kind"] == "message")
    assert message["conversation_id"] == conversation_id
    assert message["item"]["text"] == "my order 1234 is late"
    assert (await bob.ask({"type": "ping"}))["type"] == "pong"
    assert not [f for f in bob.frames if f["type"] == "notification"]
    # resolved: every console hears it
    async with gateway.http.post(f"{gateway.url}/api/v1/conversations/{conversation_id}/resolve",
                                 headers=alice_auth) as response:
        assert response.status == 200
    resolved = await bob.until(lambda f: f["type"] == "conversation"
                               and f["conversation"]["owner"] == "resolved")
    assert resolved["in_queue"] is False


async def test_typing_both_ways_with_a_web_chat_visitor(
    gateway: Gateway, visitor: Visitor, consoles: list[Console]
) -> None:
    _, auth = await person(gateway, "Alice")
    alice = await open_console(gateway, auth)
    consoles.append(alice)
    await visitor.connect()
    await visitor.say(HUMAN)
    assigned = await alice.until(lambda f: f["type"] == "notification" and f["kind"] == "assigned")
    conversation_id = assigned["conversation"]["id"]
    await alice.ask({"type": "subscribe", "conversation_id": conversation_id}, "subscribed")
    assert visitor.ws is not None
    await visitor.ws.send_json({"type": "typing", "on": True})
    typing = await alice.until(lambda f: f["type"] == "typing")
    assert (typing["conversation_id"], typing["role"], typing["on"]) == (
        conversation_id, "customer", True)
    await alice.ws.send_json({"type": "typing", "conversation_id": conversation_id, "on": True})
    shown = await visitor.next_frame("typing")
    assert shown == {"type": "typing", "role": "agent", "name": "Alice", "on": True}
    await alice.ws.send_json({"type": "typing", "conversation_id": conversation_id, "on": False})
    assert (await visitor.next_frame("typing"))["on"] is False
    # only the assigned agent's typing reaches the customer
    _, bob_auth = await person(gateway, "Bob")
    bob = await open_console(gateway, bob_auth)
    consoles.append(bob)
    refused = await bob.ask({"type": "typing", "conversation_id": conversation_id})
    assert refused["code"] == "conflict"


async def test_presence_follows_the_sockets_and_offline_requeues_after_grace(
    gateway: Gateway, visitor: Visitor, consoles: list[Console]
) -> None:
    alice_id, auth = await person(gateway, "Alice")
    _, bob_auth = await person(gateway, "Bob", capacity=0)
    bob = await open_console(gateway, bob_auth)
    consoles.append(bob)
    queue = gateway.app[ROUTING].queue
    first = await open_console(gateway, auth)
    second = await open_console(gateway, auth)
    online = await bob.until(lambda f: f["type"] == "presence"
                             and f["agent"]["id"] == alice_id)
    assert online["agent"]["presence"] == "online"
    assert (await queue.get_agent(alice_id)).presence is Presence.ONLINE  # type: ignore[union-attr]
    await visitor.connect()
    await visitor.say(HUMAN)
    await visitor.until(lambda i: i["type"] == "event" and i["name"] == "assigned")
    away = await first.ask({"type": "presence", "presence": "away"}, "presence")
    assert away["agent"]["presence"] == "away"
    await first.close()  # one socket left: still there
    assert (await second.ask({"type": "ping"}))["type"] == "pong"
    agent = await queue.get_agent(alice_id)
    assert agent is not None and agent.presence is Presence.AWAY
    await second.close()  # the last one: offline, and the grace starts
    offline = await bob.until(lambda f: f["type"] == "presence"
                              and f["agent"]["presence"] == "offline")
    assert offline["agent"]["id"] == alice_id
    requeued = await bob.until(lambda f: f["type"] == "conversation" and f["in_queue"])
    assert requeued["conversation"]["assignee_id"] is None
    await visitor.until(lambda i: i["type"] == "event" and i["name"] == "requeued")
    conversation = await gateway.store.get_conversation(requeued["conversation"]["id"])
    assert conversation is not None and conversation.owner is OwnerState.QUEUED


async def test_a_change_in_a_second_gateway_reaches_a_socket_of_the_first(
    gateway: Gateway, settings: Settings, consoles: list[Console]
) -> None:
    _, auth = await person(gateway, "Alice", capacity=0)
    alice = await open_console(gateway, auth)
    consoles.append(alice)
    async with running_gateway(settings) as other:
        conversation = await other.app[PIPELINE].open_conversation(
            "webchat", "v_other", "v_other")
        await other.app[ROUTING].handoff(conversation.id, "asked in process two")
        queued = await alice.until(lambda f: f["type"] == "conversation"
                                   and f["conversation"]["id"] == conversation.id
                                   and f["in_queue"])
        assert queued["conversation"]["handoff"]["reason"] == "asked in process two"
        # an agent of the second process claims it over its own HTTP port
        _, bob_auth = await person(other, "Bob", capacity=0)
        async with other.http.post(
                f"{other.url}/api/v1/conversations/{conversation.id}/claim",
                headers=bob_auth) as response:
            assert response.status == 200
        claimed = await alice.until(lambda f: f["type"] == "conversation"
                                    and f["conversation"]["id"] == conversation.id
                                    and not f["in_queue"])
        assert claimed["conversation"]["owner"] == "agent" and claimed["mine"] is False

