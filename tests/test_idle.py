"""Idle conversations resolve themselves (gateway/idle.py): through the real pipeline,
routing and outbox, on two gateways sharing one store whose sweeps race; time moves by
setting ``last_activity_at`` back in the store (what a day of silence leaves there)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

from gateway.idle import DEFAULT_IDLE_TEXT, IDLE, spoken
from gateway.keys import AGENTS, PIPELINE, ROUTING
from gateway.model import Activity, AgentRole, InboundMessage, OwnerState, Party, Role, utcnow
from gateway.settings import Settings
from tests.conftest import Gateway, Visitor, running_gateway
from tests.test_csat import eventually

DAY = timedelta(hours=24)


@pytest.fixture
async def second(settings: Settings) -> AsyncIterator[Gateway]:
    """Another whole gateway on the same store: its own client, writer, routing and idle
    resolver, as another process has."""
    async with running_gateway(settings) as gw:
        yield gw


async def history(gateway: Gateway, conversation_id: str) -> list[Activity]:
    items, _ = await gateway.store.history(conversation_id, limit=200)
    return list(reversed(items))


async def idle_since(gateway: Gateway, conversation_id: str, ago: timedelta) -> None:
    await gateway.store.conversations.update_one(
        {"_id": conversation_id}, {"$set": {"last_activity_at": utcnow() - ago}})


async def say(gateway: Gateway, thread: str, text: str) -> None:
    await gateway.app[PIPELINE].ingest(InboundMessage(
        channel="webchat", external_id=f"{thread}:{ObjectId()}", thread_key=thread,
        sender=Party(role=Role.CUSTOMER, id=thread), sender_external_id=thread, text=text))


async def owner(gateway: Gateway, conversation_id: str) -> OwnerState:
    found = await gateway.store.get_conversation(conversation_id)
    assert found is not None
    return found.owner


def idle_events(items: list[Activity]) -> list[Activity]:
    return [i for i in items if i.type.value == "event" and i.name == "resolved"
            and (i.text or "").startswith("Resolved automatically")]


def notices(items: list[Activity]) -> list[Activity]:
    return [i for i in items if i.text == DEFAULT_IDLE_TEXT]


async def test_idle_conversations_resolve_once_with_two_processes_racing(
    gateway: Gateway, second: Gateway, visitor: Visitor
) -> None:
    routing = gateway.app[ROUTING]
    # the bot's: a web chat visitor in the returns flow, then silent
    await visitor.connect()
    await visitor.say("I want to return something")
    await visitor.until(lambda f: "order" in (f.get("text") or "").lower())
    await gateway.settle()
    [in_bot] = [d["_id"] async for d in gateway.store.conversations.find({}, {"_id": 1})]
    # the queue's, an agent's, and one quiet for a little less than the setting
    pipeline = gateway.app[PIPELINE]
    queued = (await pipeline.open_conversation("webchat", "q1", "q1")).id
    assert await routing.handoff(queued, "customer asked for a human", team="support")
    with_agent = (await pipeline.open_conversation("webchat", "a1", "a1")).id
    assert await routing.handoff(with_agent, "customer asked for a human")
    alice, _ = await gateway.app[AGENTS].add("Alice", teams=["support"])
    await routing.claim(with_agent, alice)
    await routing.reply(with_agent, alice, "Looking into it.")
    fresh = (await pipeline.open_conversation("webchat", "f1", "f1")).id
    assert await routing.handoff(fresh, "customer asked for a human")
    for cid in (in_bot, queued, with_agent):
        await idle_since(gateway, cid, DAY + timedelta(minutes=1))
    await idle_since(gateway, fresh, DAY - timedelta(minutes=1))

    # the sweep every minute runs in one of the two (a lease) ...
    one, two = gateway.app[IDLE], second.app[IDLE]

    async def one_holds() -> bool:
        held = [r._lease is not None and r._lease.holding.is_set() for r in (one, two)]
        return held.count(True) == 1

    await eventually(one_holds)
    # ... and is safe in both at once: both sweep, twice each, at once
    done = await asyncio.gather(one.sweep_once(), two.sweep_once(), one.sweep_once(),
                                two.sweep_once())
    assert sum(done) <= 3  # (a sweep started by either on its own may have done some)

    for cid in (in_bot, queued, with_agent):
        assert await owner(gateway, cid) is OwnerState.RESOLVED
        items = await history(gateway, cid)
        [event] = idle_events(items)
        assert event.private and event.text == "Resolved automatically: no activity for 24 hours."
        [notice] = notices(items)
        assert notice.delivery is not None and notice.sender.role is Role.BOT
    assert await owner(gateway, fresh) is OwnerState.QUEUED
    assert idle_events(await history(gateway, fresh)) == []
    agent = await routing.queue.get_agent(alice.id)
    assert agent is not None and agent.load == 0  # her slot is free again

    outcomes = {o["conversation_id"]: o async for o in gateway.store.db["outcomes"].find({})}
    assert sorted(outcomes) == sorted([in_bot, queued, with_agent])  # one each
    assert {cid: (o["resolved_by"], o["abandoned_in"]) for cid, o in outcomes.items()} == {
        in_bot: ("idle", "bot"), queued: ("idle", "queued"), with_agent: ("idle", "agent")}
    assert outcomes[with_agent]["agent_id"] == alice.id
    assert outcomes[with_agent]["resolution_seconds"] is None  # nobody resolved it
    assert outcomes[with_agent]["first_response_seconds"] is not None  # Alice did answer
    assert outcomes[in_bot]["topic"] == "start_return"  # where the customer left the bot
    assert outcomes[in_bot]["intents"] == ["start_return"]
    assert outcomes[queued]["team"] == "support"
    assert outcomes[in_bot]["handed_off"] is False and outcomes[queued]["handed_off"] is True

    # the visitor is told once, on their channel; nothing else about it reaches them
    await visitor.until(lambda f: f.get("text") == DEFAULT_IDLE_TEXT)
    await gateway.settle()
    await asyncio.sleep(0.3)
    assert [f.get("text") for f in visitor.items].count(DEFAULT_IDLE_TEXT) == 1
    assert not any((f.get("text") or "").startswith("Resolved automatically")
                   for f in visitor.items)
    # more sweeps change nothing
    assert await one.sweep_once() == 0 and await two.sweep_once() == 0

    # the customer writes again: reopened to the bot, which answers
    await visitor.say("opening hours")
    await visitor.until(lambda f: f.get("role") == "bot" and "open" in (f.get("text") or ""))
    assert await owner(gateway, in_bot) is OwnerState.BOT
    names = [i.name for i in await history(gateway, in_bot) if i.type.value == "event"]
    assert names[-2:] == ["resolved", "reopened"]
    await eventually(lambda: _intents(gateway, in_bot, ["hours"]))  # afresh after reopen

    # analytics: three abandoned, by who had them
    admin, token = await gateway.app[AGENTS].add("Root", role=AgentRole.ADMIN)
    async with gateway.http.get(gateway.url + "/api/v1/analytics",
                                headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
        report: dict[str, Any] = await response.json()
    volume = report["total"]["volume"]
    assert (volume["ended"], volume["abandoned"], volume["resolved_by_agent"],
            volume["resolved_by_bot"], volume["bot_contained"]) == (3, 3, 0, 0, 0)
    assert volume["abandoned_in"] == {"bot": 1, "queued": 1, "agent": 1}
    assert report["by_agent"][alice.id]["volume"]["abandoned"] == 1
    assert report["agent_names"] == {alice.id: "Alice"}
    assert report["total"]["times"]["resolution"]["count"] == 0
    del admin


async def _intents(gateway: Gateway, conversation_id: str, expected: list[str]) -> bool:
    found = await gateway.store.get_conversation(conversation_id)
    return found is not None and found.intents == expected


async def test_activity_after_the_read_keeps_it_open(gateway: Gateway) -> None:
    routing = gateway.app[ROUTING]
    cid = (await gateway.app[PIPELINE].open_conversation("webchat", "k1", "k1")).id
    assert await routing.handoff(cid, "customer asked for a human")
    await idle_since(gateway, cid, DAY * 2)
    [read] = await gateway.app[IDLE].db.idle(OwnerState.QUEUED, utcnow() - DAY, 10)
    await say(gateway, "k1", "hello? anyone there?")  # a message comes in meanwhile
    await gateway.settle()
    assert await routing.resolve_idle(read, "24 hours", DEFAULT_IDLE_TEXT) is None
    assert await owner(gateway, cid) is OwnerState.QUEUED
    items = await history(gateway, cid)
    assert idle_events(items) == [] and notices(items) == []
    assert await gateway.store.db["outcomes"].count_documents({}) == 0


@pytest.fixture
def quiet_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"idle_resolve_notice": False,
                                       "idle_resolve_hours": 2.5})


async def test_no_notice_and_the_hours_setting(quiet_settings: Settings) -> None:
    async with running_gateway(quiet_settings) as gateway:
        routing = gateway.app[ROUTING]
        cid = (await gateway.app[PIPELINE].open_conversation("webchat", "n1", "n1")).id
        assert await routing.handoff(cid, "customer asked for a human")
        await idle_since(gateway, cid, timedelta(hours=2, minutes=29))
        assert await gateway.app[IDLE].sweep_once() == 0  # not yet
        await idle_since(gateway, cid, timedelta(hours=2, minutes=31))
        assert await gateway.app[IDLE].sweep_once() == 1
        items = await history(gateway, cid)
        [event] = idle_events(items)
        assert event.text == "Resolved automatically: no activity for 150 minutes."
        assert notices(items) == []  # the customer is not told
        assert not [i for i in items if i.seq > event.seq]


async def test_off(settings: Settings) -> None:
    off = settings.model_copy(update={"idle_resolve_hours": 0})
    async with running_gateway(off) as gateway:
        cid = (await gateway.app[PIPELINE].open_conversation("webchat", "o1", "o1")).id
        await idle_since(gateway, cid, DAY * 30)
        assert await gateway.app[IDLE].sweep_once() == 0
        assert await owner(gateway, cid) is OwnerState.BOT


def test_the_default_text_is_the_settings_default(settings: Settings) -> None:
    assert Settings.model_fields["idle_resolve_text"].default == DEFAULT_IDLE_TEXT


def test_spoken() -> None:
    assert spoken(timedelta(hours=24)) == "24 hours"
    assert spoken(timedelta(hours=1)) == "1 hour"
    assert spoken(timedelta(hours=48)) == "2 days"
    assert spoken(timedelta(minutes=90)) == "90 minutes"
    assert spoken(timedelta(seconds=45)) == "45 seconds"
