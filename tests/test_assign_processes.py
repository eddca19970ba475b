"""Claims and automatic assignment across gateway PROCESSES sharing one database.

Two ``python -m gateway serve`` subprocesses (plus the test's own gateway, which creates
the conversations and runs an assigner too) work on the same store: of concurrent claims
exactly one wins, and assignment racing in three processes never gives an agent more
than its capacity, nor a conversation two agents.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.keys import PIPELINE, ROUTING
from gateway.settings import Settings
from tests.conftest import Gateway
from tests.processes import ServeProcess


class Process(ServeProcess):
    """A gateway subprocess whose sweeps run every 0.1 s: they race too."""

    def __init__(self, settings: Settings, tmp: Path, name: str) -> None:
        super().__init__(settings, tmp, name, {"OMNIGATE_ROUTING_SWEEP_SECONDS": "0.1"})


@pytest.fixture
async def processes(
    gateway: Gateway, settings: Settings, tmp_path: Path
) -> AsyncIterator[list[Process]]:
    started = [Process(settings, tmp_path, f"gw{n}") for n in range(2)]
    try:
        for process in started:
            await process.ready(gateway.http)
        yield started
    finally:
        for process in started:
            process.stop()


async def call(gateway: Gateway, base: str, method: str, path: str, headers: dict[str, str],
               **kwargs: Any) -> tuple[int, Any]:
    async with gateway.http.request(method, base + "/api/v1" + path, headers=headers,
                                    **kwargs) as response:
        return response.status, await response.json()


async def queued(gateway: Gateway, count: int, prefix: str) -> list[str]:
    ids = []
    for n in range(count):
        conversation = await gateway.app[PIPELINE].open_conversation(
            "webchat", f"{prefix}{n}", f"{prefix}{n}")
        assert await gateway.app[ROUTING].handoff(conversation.id, "test")
        ids.append(conversation.id)
    return ids


async def test_concurrent_claims_from_two_processes_have_one_winner(
    gateway: Gateway, processes: list[Process]
) -> None:
    one, two = processes
    alice_id, alice = await gateway.agent("Alice")  # offline: nothing is auto-assigned
    bob_id, bob = await gateway.agent("Bob")
    ids = await queued(gateway, 12, "claim")
    wins = {alice_id: 0, bob_id: 0}
    for n, conversation_id in enumerate(ids):
        path = f"/conversations/{conversation_id}/claim"
        claims = [call(gateway, one.url, "POST", path, alice),
                  call(gateway, two.url, "POST", path, bob)]
        results = await asyncio.gather(*(claims if n % 2 else claims[::-1]))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200, 409], results
        winner = next(body["assignee_id"] for status, body in results if status == 200)
        stored = await gateway.store.get_conversation(conversation_id)
        assert stored is not None and stored.assignee_id == winner
        wins[winner] += 1
    for agent_id, won in wins.items():
        doc = await gateway.store.agents.find_one({"_id": agent_id})
        assert doc is not None and doc["load"] == won  # counted once, in whichever process
    await gateway.settle()
    for conversation_id in ids:
        items, _ = await gateway.store.history(conversation_id, limit=50)
        assert [i.name for i in reversed(items) if i.name] == ["handoff", "assigned"]


async def test_assignment_racing_in_three_processes_never_exceeds_capacity(
    gateway: Gateway, processes: list[Process]
) -> None:
    one, two = processes
    capacity = {"Alice": 3, "Bob": 2}
    agents: dict[str, tuple[str, dict[str, str]]] = {}
    for name, cap in capacity.items():
        agents[name] = await gateway.agent(name)
        await gateway.store.agents.update_one({"_id": agents[name][0]},
                                              {"$set": {"capacity": cap}})
    limit = {agents[name][0]: cap for name, cap in capacity.items()}
    ids = await queued(gateway, 14, "race")
    violations: list[str] = []
    done = asyncio.Event()

    async def watch() -> None:  # checks the invariant all through the race
        while not done.is_set():
            for agent_id, cap in limit.items():
                owned = await gateway.store.conversations.count_documents(
                    {"assignee_id": agent_id, "owner": "agent"})
                doc = await gateway.store.agents.find_one({"_id": agent_id})
                assert doc is not None
                if owned > cap or doc["load"] > cap or doc["load"] < 0:
                    violations.append(f"{agent_id}: {owned} owned, load {doc['load']}")
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    # both online at once, through different processes: both processes' passes race
    await asyncio.gather(
        call(gateway, one.url, "PUT", "/me/presence", agents["Alice"][1],
             json={"presence": "online"}),
        call(gateway, two.url, "PUT", "/me/presence", agents["Bob"][1],
             json={"presence": "online"}),
    )
    resolved: set[str] = set()
    deadline = asyncio.get_running_loop().time() + 60
    while len(resolved) < len(ids):
        assert asyncio.get_running_loop().time() < deadline, "the queue did not drain"
        owned = [c async for c in gateway.store.conversations.find(
            {"owner": "agent"}, {"assignee_id": 1})]
        if len(owned) < min(sum(limit.values()), len(ids) - len(resolved)):
            await asyncio.sleep(0.02)
            continue
        # resolve everything assigned, through both processes at once: freed capacity
        # makes every process run a pass at the same time
        by_name = dict(agents.values())
        results = await asyncio.gather(*(
            call(gateway, (one, two)[n % 2].url, "POST", f"/conversations/{c['_id']}/resolve",
                 by_name[c["assignee_id"]])
            for n, c in enumerate(owned)
        ))
        assert [status for status, _ in results] == [200] * len(owned), results
        resolved |= {c["_id"] for c in owned}
    done.set()
    await watcher
    assert violations == []
    assert resolved == set(ids)
    await gateway.settle()
    for conversation_id in ids:  # each assigned exactly once: no double event
        items, _ = await gateway.store.history(conversation_id, limit=50)
        assert [i.name for i in reversed(items) if i.name] == ["handoff", "assigned", "resolved"]
    for agent_id in limit:
        doc = await gateway.store.agents.find_one({"_id": agent_id})
        assert doc is not None and doc["load"] == 0
