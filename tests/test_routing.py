"""Queue and routing through the real gateway: queue order, skills and teams, capacity,
least busy first, automatic assignment when capacity frees up, transfer, presence and
re-queue after the grace period, load counters repaired."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from bson import ObjectId

from gateway.app import create_app
from gateway.keys import AGENTS, PIPELINE, ROUTING
from gateway.model import AgentRole
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import Gateway

GRACE = 0.5


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"routing_sweep_seconds": 0.2, "agent_offline_grace_seconds": GRACE}
    )


async def call(
    gateway: Gateway, method: str, path: str, headers: dict[str, str], **kwargs: Any
) -> tuple[int, Any]:
    async with gateway.http.request(method, gateway.url + "/api/v1" + path, headers=headers,
                                    **kwargs) as response:
        return response.status, await response.json()


async def presence(gateway: Gateway, headers: dict[str, str], state: str) -> dict[str, Any]:
    status, body = await call(gateway, "PUT", "/me/presence", headers, json={"presence": state})
    assert status == 200, body
    assert body["presence"] == state
    return body  # type: ignore[no-any-return]


async def make_agent(
    gateway: Gateway, name: str, *, skills: tuple[str, ...] = (), teams: tuple[str, ...] = (),
    capacity: int = 3, online: bool = True,
) -> tuple[str, dict[str, str]]:
    agent_id, headers = await gateway.agent(name)
    await gateway.store.agents.update_one(
        {"_id": agent_id},
        {"$set": {"skills": list(skills), "teams": list(teams), "capacity": capacity}},
    )
    if online:
        await presence(gateway, headers, "online")
    return agent_id, headers


async def handoff(
    gateway: Gateway, key: str, *, skill: str | None = None, team: str | None = None,
    priority: str = "normal",
) -> str:
    conversation = await gateway.app[PIPELINE].open_conversation("webchat", key, key)
    assert await gateway.app[ROUTING].handoff(
        conversation.id, f"test {key}", skill=skill, team=team, priority=priority
    )
    return conversation.id


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def owner(gateway: Gateway, conversation_id: str) -> tuple[str, str | None]:
    conversation = await gateway.store.get_conversation(conversation_id)
    assert conversation is not None
    return conversation.owner.value, conversation.assignee_id


async def assigned_to(gateway: Gateway, conversation_id: str, agent_id: str) -> None:
    """Wait until the conversation is the agent's and its "assigned" event is stored."""

    async def check() -> bool:
        if await owner(gateway, conversation_id) != ("agent", agent_id):
            return False
        items, _ = await gateway.store.history(conversation_id, limit=5)
        return [i.name for i in items if i.name][:1] == ["assigned"]

    await eventually(check)


async def queue_ids(gateway: Gateway, headers: dict[str, str], query: str = "") -> list[str]:
    status, body = await call(gateway, "GET", "/conversations" + query, headers)
    assert status == 200, body
    return [c["id"] for c in body["items"]]


async def events(gateway: Gateway, conversation_id: str) -> list[tuple[str, str]]:
    await gateway.settle()
    items, _ = await gateway.store.history(conversation_id, limit=200)
    return [(i.name, i.text or "") for i in reversed(items) if i.name]


async def assert_loads_true(gateway: Gateway) -> None:
    """Every agent's load counter equals the conversations it owns."""
    async for doc in gateway.store.agents.find({}):
        owned = await gateway.store.conversations.count_documents(
            {"assignee_id": doc["_id"], "owner": "agent"})
        assert doc["load"] == owned, doc["name"]


async def load(gateway: Gateway, agent_id: str) -> int:
    doc = await gateway.store.agents.find_one({"_id": agent_id})
    assert doc is not None
    return int(doc["load"])


async def test_queue_orders_by_priority_then_waiting_time(gateway: Gateway) -> None:
    _, alice = await make_agent(gateway, "Alice", online=False)
    ids = {}
    for key, priority in [("n1", "normal"), ("l1", "low"), ("u1", "urgent"), ("h1", "high"),
                          ("n2", "normal"), ("x1", "whenever"), ("u2", "urgent")]:
        ids[key] = await handoff(gateway, key, priority=priority)
    order = [ids[k] for k in ("u1", "u2", "h1", "n1", "n2", "l1", "x1")]
    assert await queue_ids(gateway, alice) == order
    assert await queue_ids(gateway, alice, "?owner=queued") == order
    assert await queue_ids(gateway, alice, "?limit=3") == order[:3]
    assert await queue_ids(gateway, alice, "?limit=5") == order[:5]
    assert set(await queue_ids(gateway, alice, "?owner=queued,bot")) == set(order)
    # the store serves each priority's part of the queue from an index
    plan = await gateway.store.conversations.find(
        {"owner": "queued", "handoff.priority": "urgent"}
    ).sort("handoff.requested_at", 1).explain()
    assert "queue_order" in str(plan["queryPlanner"]["winningPlan"])
    assert [await owner(gateway, i) for i in order] == [("queued", None)] * len(order)


async def test_skills_and_teams_decide_who_may_take_it(gateway: Gateway) -> None:
    alice_id, _ = await make_agent(gateway, "Alice", skills=("billing",))
    bob_id, _ = await make_agent(gateway, "Bob", teams=("sales",))
    carol_id, _ = await make_agent(gateway, "Carol")
    billing = await handoff(gateway, "billing", skill="billing")
    await assigned_to(gateway, billing, alice_id)
    sales = await handoff(gateway, "sales", team="sales")
    await assigned_to(gateway, sales, bob_id)
    legal = await handoff(gateway, "legal", skill="legal")  # nobody has it
    both = await handoff(gateway, "both", skill="billing", team="sales")  # nobody has both
    plain = await handoff(gateway, "plain")  # anyone: the least busy is Carol
    await assigned_to(gateway, plain, carol_id)
    # the queue was looked at in order, so the two before `plain` were passed over
    assert await owner(gateway, legal) == ("queued", None)
    assert await owner(gateway, both) == ("queued", None)

    # an admin gives Bob the skill through the admin API: the assigner wakes up
    _, root_token = await gateway.app[AGENTS].add("Root", role=AgentRole.ADMIN)
    status, body = await call(gateway, "PATCH", f"/agents/{bob_id}",
                              {"Authorization": f"Bearer {root_token}"},
                              json={"skills": ["billing"]})
    assert status == 200, body
    await assigned_to(gateway, both, bob_id)
    assert await owner(gateway, legal) == ("queued", None)
    assert ("assigned", "Bob joined the conversation.") in await events(gateway, both)
    await assert_loads_true(gateway)


async def test_capacity_is_respected(gateway: Gateway) -> None:
    alice_id, alice = await make_agent(gateway, "Alice", capacity=2, online=False)
    bob_id, bob = await make_agent(gateway, "Bob", capacity=1, online=False)
    ids = [await handoff(gateway, f"c{n}") for n in range(5)]
    await presence(gateway, alice, "online")
    await assigned_to(gateway, ids[1], alice_id)
    assert await owner(gateway, ids[0]) == ("agent", alice_id)
    await presence(gateway, bob, "online")
    await assigned_to(gateway, ids[2], bob_id)
    assert await queue_ids(gateway, alice) == ids[3:]
    assert (await load(gateway, alice_id), await load(gateway, bob_id)) == (2, 1)
    # a claim by hand still works beyond capacity and counts
    assert (await call(gateway, "POST", f"/conversations/{ids[3]}/claim", bob))[0] == 200
    assert await load(gateway, bob_id) == 2
    assert await queue_ids(gateway, alice) == ids[4:]
    await assert_loads_true(gateway)


async def test_least_busy_first_then_idle_longest(gateway: Gateway) -> None:
    alice_id, alice = await make_agent(gateway, "Alice", capacity=5, online=False)
    bob_id, bob = await make_agent(gateway, "Bob", capacity=5, online=False)
    carol_id, carol = await make_agent(gateway, "Carol", capacity=5, online=False)
    for n, headers in enumerate([bob, bob, carol]):  # Bob busiest, then Carol
        conversation_id = await handoff(gateway, f"claimed{n}")
        assert (await call(gateway, "POST", f"/conversations/{conversation_id}/claim",
                           headers))[0] == 200
    for headers in (alice, bob, carol):
        await presence(gateway, headers, "online")
    got = []
    for n in range(6):
        conversation_id = await handoff(gateway, f"new{n}")

        async def taken(conversation_id: str = conversation_id) -> bool:
            return (await owner(gateway, conversation_id))[0] == "agent"

        await eventually(taken)
        got.append((await owner(gateway, conversation_id))[1])
    names = {alice_id: "Alice", bob_id: "Bob", carol_id: "Carol"}
    assert [names[a] for a in got if a] == ["Alice", "Carol", "Alice", "Bob", "Carol", "Alice"]
    await assert_loads_true(gateway)


async def test_freed_capacity_goes_to_the_next_waiting(gateway: Gateway) -> None:
    alice_id, alice = await make_agent(gateway, "Alice", capacity=1)
    first, second, third = [await handoff(gateway, f"c{n}") for n in range(3)]
    await assigned_to(gateway, first, alice_id)
    assert await queue_ids(gateway, alice) == [second, third]
    assert (await call(gateway, "POST", f"/conversations/{first}/resolve", alice))[0] == 200
    await assigned_to(gateway, second, alice_id)
    assert (await call(gateway, "POST", f"/conversations/{second}/handback", alice))[0] == 200
    await assigned_to(gateway, third, alice_id)
    fourth = await handoff(gateway, "c3")
    fifth = await handoff(gateway, "c4")
    assert await queue_ids(gateway, alice) == [fourth, fifth]
    await gateway.app[ROUTING].set_capacity(alice_id, 2)  # raised: one more
    await assigned_to(gateway, fourth, alice_id)
    assert await queue_ids(gateway, alice) == [fifth]
    await presence(gateway, alice, "away")  # away: nothing new, even with room
    await gateway.app[ROUTING].set_capacity(alice_id, 3)
    status, body = await call(gateway, "PUT", "/me/presence", alice,
                              json={"presence": "online"})
    assert (status, body["capacity"]) == (200, 3)
    await assigned_to(gateway, fifth, alice_id)
    assert await load(gateway, alice_id) == 3
    assert await events(gateway, second) == [
        ("handoff", await _text(gateway, second, "handoff")),
        ("assigned", "Alice joined the conversation."),
        ("handback", await _text(gateway, second, "handback")),
    ]
    await assert_loads_true(gateway)


async def _text(gateway: Gateway, conversation_id: str, name: str) -> str:
    items, _ = await gateway.store.history(conversation_id, limit=200)
    return next(i.text or "" for i in items if i.name == name)


async def test_transfer_to_an_agent_and_to_a_team(gateway: Gateway) -> None:
    alice_id, alice = await make_agent(gateway, "Alice")
    bob_id, bob = await make_agent(gateway, "Bob", online=False)
    carol_id, carol = await make_agent(gateway, "Carol", teams=("sales",), online=False)
    conversation_id = await handoff(gateway, "c0", skill="billing", priority="high")
    await gateway.store.agents.update_one({"_id": alice_id}, {"$set": {"skills": ["billing"]}})
    await gateway.app[ROUTING].set_capacity(alice_id, 3)
    await assigned_to(gateway, conversation_id, alice_id)
    path = f"/conversations/{conversation_id}/transfer"

    status, body = await call(gateway, "POST", path, alice, json={"agent_id": bob_id})
    assert (status, body["owner"], body["assignee_id"]) == (200, "agent", bob_id)
    assert (await load(gateway, alice_id), await load(gateway, bob_id)) == (0, 1)
    status, error = await call(gateway, "POST", path, alice, json={"agent_id": carol_id})
    assert (status, error["error"], error["owner"]) == (409, "conflict", "agent")
    for body_in, code in [({}, 400), ({"agent_id": carol_id, "team": "sales"}, 400),
                          ({"team": "sales", "note": "x"}, 400), ({"team": ""}, 400),
                          ({"agent_id": str(ObjectId())}, 404), ({"team": "legal"}, 404)]:
        status, error = await call(gateway, "POST", path, bob, json=body_in)
        assert status == code, (body_in, error)
    status, error = await call(gateway, "POST", f"/conversations/{ObjectId()}/transfer", bob,
                               json={"team": "sales"})
    assert status == 404

    status, body = await call(gateway, "POST", path, bob, json={"team": "sales"})
    assert (status, body["owner"], body["assignee_id"]) == (200, "queued", None)
    assert body["handoff"]["team"] == "sales" and body["handoff"]["skill"] is None
    assert body["handoff"]["priority"] == "high"
    assert await load(gateway, bob_id) == 0
    assert await queue_ids(gateway, alice) == [conversation_id]  # Alice is not in sales
    await presence(gateway, carol, "online")
    await assigned_to(gateway, conversation_id, carol_id)
    names = [name for name, _ in await events(gateway, conversation_id)]
    assert names == ["handoff", "assigned", "transferred", "transferred", "assigned"]
    texts = [text for _, text in await events(gateway, conversation_id)]
    assert texts[2] == "Alice transferred the conversation to Bob."
    assert texts[3].startswith("Bob transferred the conversation to the sales team.")
    await assert_loads_true(gateway)


async def test_offline_agent_conversations_are_requeued_after_the_grace(
    gateway: Gateway,
) -> None:
    dave_id, dave = await make_agent(gateway, "Dave", online=False)  # never online
    kept = await handoff(gateway, "kept")
    assert (await call(gateway, "POST", f"/conversations/{kept}/claim", dave))[0] == 200
    alice_id, alice = await make_agent(gateway, "Alice")
    first, second = [await handoff(gateway, f"c{n}") for n in range(2)]
    await assigned_to(gateway, second, alice_id)
    assert (await presence(gateway, alice, "away"))["requeue_at"] is None
    went = await presence(gateway, alice, "offline")
    presence_at = datetime.fromisoformat(went["presence_at"])
    assert datetime.fromisoformat(went["requeue_at"]) == presence_at + timedelta(seconds=GRACE)
    again = await presence(gateway, alice, "offline")  # still offline: the time stays
    assert again["requeue_at"] == went["requeue_at"]

    async def requeued() -> bool:
        return [await owner(gateway, c) for c in (first, second)] == [("queued", None)] * 2

    await eventually(requeued)
    assert await load(gateway, alice_id) == 0
    assert await owner(gateway, kept) == ("agent", dave_id)  # Dave never went offline
    assert ("requeued" in [n for n, _ in await events(gateway, first)])
    assert await queue_ids(gateway, dave) == [first, second]  # keeping their place
    bob_id, _ = await make_agent(gateway, "Bob")
    await assigned_to(gateway, second, bob_id)
    assert await owner(gateway, first) == ("agent", bob_id)
    # back online before the grace is over: nothing is re-queued
    assert (await presence(gateway, alice, "online"))["requeue_at"] is None
    await assert_loads_true(gateway)


async def test_a_deactivated_agent_hands_their_conversations_back_at_once(
    gateway: Gateway,
) -> None:
    erin_id, erin = await make_agent(gateway, "Erin", online=False)
    mine = await handoff(gateway, "erin's")
    assert (await call(gateway, "POST", f"/conversations/{mine}/claim", erin))[0] == 200
    _, root_token = await gateway.app[AGENTS].add("Root", role=AgentRole.ADMIN)
    status, body = await call(gateway, "PATCH", f"/agents/{erin_id}",
                              {"Authorization": f"Bearer {root_token}"}, json={"active": False})
    assert status == 200, body
    assert await owner(gateway, mine) == ("queued", None)  # no grace: not coming back
    assert await load(gateway, erin_id) == 0
    assert "requeued" in [n for n, _ in await events(gateway, mine)]
    frank_id, _ = await make_agent(gateway, "Frank")
    await assigned_to(gateway, mine, frank_id)
    await assert_loads_true(gateway)


async def test_agent_actions_are_logged_with_the_agents_names(
    gateway: Gateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.routing")
    alice_id, alice = await make_agent(gateway, "Alice", online=False)
    bob_id, bob = await make_agent(gateway, "Bob", online=False)
    first, second, third = [await handoff(gateway, f"log{n}") for n in range(3)]
    base = "/conversations/"
    assert (await call(gateway, "POST", f"{base}{first}/claim", alice))[0] == 200
    assert (await call(gateway, "POST", f"{base}{first}/transfer", alice,
                       json={"agent_id": bob_id}))[0] == 200
    assert (await call(gateway, "POST", f"{base}{first}/resolve", bob))[0] == 200
    assert (await call(gateway, "POST", f"{base}{second}/claim", bob))[0] == 200
    assert (await call(gateway, "POST", f"{base}{second}/handback", bob))[0] == 200
    await presence(gateway, alice, "online")  # the third is hers automatically
    await assigned_to(gateway, third, alice_id)
    await presence(gateway, alice, "offline")  # and back in the queue after the grace
    await eventually(lambda: _is(owner(gateway, third), ("queued", None)))
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.routing"]
    alice_is, bob_is = f"Alice ({alice_id})", f"Bob ({bob_id})"
    for line in (f"conversation {first} claimed by {alice_is}",
                 f"conversation {first} transferred by {alice_is} to {bob_is}",
                 f"conversation {first} resolved by {bob_is}",
                 f"conversation {second} claimed by {bob_is}",
                 f"conversation {second} handed back to the bot by {bob_is}",
                 f"conversation {third} assigned to {alice_is}",
                 f"1 conversation(s) of {alice_is} re-queued (offline past the grace period, "
                 "or deactivated)"):
        assert line in lines, (line, lines)


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


async def test_colleagues_lists_active_agents_for_the_transfer_picker(
    gateway: Gateway,
) -> None:
    bob_id, bob = await make_agent(gateway, "bob", teams=("sales",), online=False)
    ann_id, _ = await make_agent(gateway, "Ann", skills=("billing",))
    gone_id, _ = await make_agent(gateway, "Gone", online=False)
    await gateway.store.agents.update_one({"_id": gone_id}, {"$set": {"active": False}})
    status, body = await call(gateway, "GET", "/colleagues", bob)
    assert status == 200, body
    assert [(a["id"], a["presence"], a["teams"], a["skills"]) for a in body["items"]] == [
        (ann_id, "online", [], ["billing"]), (bob_id, "offline", ["sales"], [])]
    assert all("email" not in a for a in body["items"])
    _, designer_token = await gateway.app[AGENTS].add("Dee", role=AgentRole.DESIGNER)
    status, _ = await call(gateway, "GET", "/colleagues",
                           {"Authorization": f"Bearer {designer_token}"})
    assert status == 403


async def test_presence_body_is_validated(gateway: Gateway) -> None:
    _, alice = await make_agent(gateway, "Alice", online=False)
    for body in [{"presence": "busy"}, {}, {"presence": "online", "x": 1}, ["online"]]:
        status, error = await call(gateway, "PUT", "/me/presence", alice, json=body)
        assert (status, error["error"]) == (400, "bad_request"), body
    status, _ = await call(gateway, "PUT", "/me/presence", {}, json={"presence": "online"})
    assert status == 401


@pytest.fixture
async def slow_sweep(settings: Settings) -> AsyncIterator[Settings]:
    """Settings whose sweeper runs only at start (the next sweep is minutes away)."""
    yield settings.model_copy(update={"routing_sweep_seconds": 300.0})
    assert settings.mongodb_uri is not None
    cleanup = Store.connect(settings.mongodb_uri, settings.mongodb_db)
    await cleanup.client.drop_database(settings.mongodb_db)
    await cleanup.close()


async def test_drifted_loads_are_repaired_at_start(slow_sweep: Settings) -> None:
    first = await _start(slow_sweep)
    try:
        alice_id, alice = await make_agent(first, "Alice", online=False)
        bob_id, _ = await make_agent(first, "Bob", online=False)
        conversation_id = await handoff(first, "c0")
        assert (await call(first, "POST", f"/conversations/{conversation_id}/claim",
                           alice))[0] == 200
        # a crashed process left the counters wrong
        await first.store.agents.update_one({"_id": alice_id}, {"$set": {"load": 3}})
        await first.store.agents.update_one({"_id": bob_id}, {"$set": {"load": 2}})
        second = await _start(slow_sweep)
        try:
            async def repaired() -> bool:
                return (await load(first, alice_id), await load(first, bob_id)) == (1, 0)

            await eventually(repaired)
        finally:
            await _stop(second)
        await assert_loads_true(first)
    finally:
        await _stop(first)


async def _start(settings: Settings) -> Gateway:
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return Gateway(server, app)


async def _stop(gateway: Gateway) -> None:
    await gateway.close()
    await gateway.server.close()


def test_candidates_are_the_able_least_busy_then_idle_longest() -> None:
    from gateway.assign import candidates
    from gateway.model import Agent, Handoff, Presence, utcnow

    now = utcnow()

    def agent(name: str, **fields: Any) -> Agent:
        base: dict[str, Any] = {"id": name, "name": name, "created_at": now,
                                "presence": Presence.ONLINE, "capacity": 2}
        return Agent.model_validate({**base, **fields})

    agents = [
        agent("away", presence=Presence.AWAY),
        agent("offline", presence=Presence.OFFLINE),
        agent("inactive", active=False),
        agent("full", load=2),
        agent("zero", capacity=0),
        agent("busy", load=1, last_assigned_at=now - timedelta(hours=1)),
        agent("recent", last_assigned_at=now),
        agent("earlier", last_assigned_at=now - timedelta(minutes=1)),
        agent("never"),
        agent("billing", skills=["billing"], teams=["sales"], load=1),
    ]
    plain = Handoff(reason="r", requested_at=now)
    assert [a.id for a in candidates(agents, plain)] == [
        "never", "earlier", "recent", "billing", "busy"]
    assert [a.id for a in candidates(agents, None)][:1] == ["never"]
    skilled = plain.model_copy(update={"skill": "billing"})
    assert [a.id for a in candidates(agents, skilled)] == ["billing"]
    teamed = plain.model_copy(update={"team": "sales", "skill": "billing"})
    assert [a.id for a in candidates(agents, teamed)] == ["billing"]
    assert candidates(agents, plain.model_copy(update={"team": "support"})) == []


async def test_an_owner_change_is_never_visible_without_its_event(gateway: Gateway) -> None:
    """The change and its event are written together: whoever sees the agent own the
    conversation sees the "assigned" event too, and an agent who resolves it the moment
    they see it gets the events in the order of the changes."""
    alice_id, alice = await make_agent(gateway, "Alice", capacity=12, online=False)
    ids = [await handoff(gateway, f"v{n}") for n in range(12)]
    await presence(gateway, alice, "online")  # the assigner hands all out as we look
    without: list[str] = []
    resolved: set[str] = set()
    deadline = asyncio.get_running_loop().time() + 30
    while len(resolved) < len(ids):
        assert asyncio.get_running_loop().time() < deadline, "not all were assigned"
        for conversation_id in set(ids) - resolved:
            if await owner(gateway, conversation_id) != ("agent", alice_id):
                continue
            items, _ = await gateway.store.history(conversation_id, limit=10)
            if "assigned" not in [i.name for i in items]:
                without.append(conversation_id)
            status, body = await call(
                gateway, "POST", f"/conversations/{conversation_id}/resolve", alice)
            assert status == 200, body
            resolved.add(conversation_id)
    assert without == []
    for conversation_id in ids:
        assert [name for name, _ in await events(gateway, conversation_id)] == [
            "handoff", "assigned", "resolved"]
    await assert_loads_true(gateway)
