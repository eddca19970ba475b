"""Analytics per agent, per recognised intent and per label, and what an agent in no team
sees, over the real API: conversations driven through the real pipeline and bot (the
example flows' NLU recognises the intents), worked by agents over the REST API (claim,
reply, labels, resolve), one abandoned (resolved as idle); clocks injected so the
times are exact."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from gateway.desk.analytics_api import NO_TEAM
from gateway.keys import AGENTS, PIPELINE, ROUTING
from gateway.model import AgentRole, InboundMessage, OwnerState, Party, Role, utcnow
from gateway.settings import Settings
from tests.conftest import Gateway
from tests.test_csat import eventually


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"csat": True})


class Desk:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.routing = gateway.app[ROUTING]
        self.t = utcnow().replace(microsecond=0) - timedelta(hours=1)
        self.now = self.t
        self.routing.levels.clock = lambda: self.now
        self.routing.outcomes.clock = lambda: self.now
        self.tokens: dict[str, dict[str, str]] = {}
        self.ids: dict[str, str] = {}

    def at(self, seconds: float) -> datetime:
        return self.t + timedelta(seconds=seconds)

    async def agent(self, name: str, teams: list[str], role: AgentRole = AgentRole.AGENT
                    ) -> None:
        agent, token = await self.gateway.app[AGENTS].add(name, role=role, teams=teams)
        self.tokens[name], self.ids[name] = {"Authorization": f"Bearer {token}"}, agent.id

    async def call(self, who: str, method: str, path: str, body: Any = None,
                   **params: str) -> tuple[int, Any]:
        async with self.gateway.http.request(
                method, self.gateway.url + "/api/v1" + path, headers=self.tokens[who],
                json=body, params=params or None) as response:
            return response.status, await response.json()

    async def says(self, thread: str, text: str) -> str:
        await self.gateway.app[PIPELINE].ingest(InboundMessage(
            channel="webchat", external_id=f"{thread}:{ObjectId()}", thread_key=thread,
            sender=Party(role=Role.CUSTOMER, id=thread), sender_external_id=thread, text=text))
        await self.gateway.settle()
        found = await self.gateway.store.find_conversation("webchat", thread)
        assert found is not None
        return found.id

    async def handed_off(self, thread: str, *texts: str) -> str:
        """The customer says ``texts`` to the bot, the last asks for a human: queued, with
        the handoff at T."""
        for text in texts:
            cid = await self.says(thread, text)
        conversation = await self.gateway.store.get_conversation(cid)
        assert conversation is not None and conversation.owner is OwnerState.QUEUED
        await self.gateway.store.conversations.update_one(
            {"_id": cid}, {"$set": {"handoff.requested_at": self.t}})
        return cid

    async def works(self, who: str, cid: str, *, reply_at: float | None, labels: list[str],
                    resolve_at: float) -> None:
        self.now = self.t
        assert (await self.call(who, "POST", f"/conversations/{cid}/claim"))[0] == 200
        if reply_at is not None:
            self.now = self.at(reply_at)
            status, _ = await self.call(who, "POST", f"/conversations/{cid}/messages",
                                        {"text": "Let me help."})
            assert status == 201
        if labels:
            status, _ = await self.call(who, "PUT", f"/conversations/{cid}/labels",
                                        {"labels": labels})
            assert status == 200
        self.now = self.at(resolve_at)
        assert (await self.call(who, "POST", f"/conversations/{cid}/resolve"))[0] == 200

    async def report(self, who: str = "Root", **params: str) -> tuple[int, Any]:
        period = {"from": self.at(-60).isoformat(), "to": utcnow().isoformat()}
        return await self.call(who, "GET", "/analytics", **{**period, **params})


@pytest.fixture
async def desk(gateway: Gateway) -> Desk:
    d = Desk(gateway)
    await d.agent("Root", [], AgentRole.ADMIN)
    await d.agent("Alice", ["support"])
    await d.agent("Bob", ["billing"])
    await d.agent("Carol", [])  # in no team
    for name, color in (("VIP", "#aa0000"), ("Billing issue", "#0000aa")):
        status, label = await d.call("Root", "POST", "/labels", {"name": name, "color": color})
        assert status == 201
        d.ids[name] = label["id"]
    vip, billing = d.ids["VIP"], d.ids["Billing issue"]

    a = await d.handed_off("da", "what are your opening hours", "talk to a human")
    await d.works("Alice", a, reply_at=60, labels=[vip], resolve_at=600)
    b = await d.handed_off("db", "I want to return something", "talk to a human")
    await d.works("Bob", b, reply_at=120, labels=[vip, billing], resolve_at=1200)
    c = await d.says("dc", "what are your opening hours")  # then silence
    dd = await d.handed_off("dd", "talk to a human")
    await d.works("Carol", dd, reply_at=None, labels=[], resolve_at=300)
    # the customer of Alice's rates her 5
    await d.says("da", "5")

    async def rated() -> bool:
        return await gateway.store.db["outcomes"].find_one(
            {"conversation_id": a, "csat_score": 5}) is not None

    await eventually(rated)
    # c goes quiet: abandoned (as the idle resolver finds it: tests/test_idle.py)
    d.now = d.at(1800)
    quiet = await gateway.store.get_conversation(c)
    assert quiet is not None
    assert await d.routing.resolve_idle(quiet, "24 hours", None)
    d.ids.update(a=a, b=b, c=c, d=dd)
    return d


def figures(report: dict[str, Any], dimension: str) -> dict[str, tuple[int, int]]:
    """(ended, abandoned) per group."""
    return {k: (v["volume"]["ended"], v["volume"]["abandoned"])
            for k, v in report[f"by_{dimension}"].items()}


async def test_per_agent_intent_and_label(desk: Desk) -> None:
    status, report = await desk.report()
    assert status == 200, report
    ids = desk.ids
    assert report["total"]["volume"]["ended"] == 4
    assert report["total"]["volume"]["abandoned"] == 1

    # intents the bot recognised, each outcome under each of its own
    assert figures(report, "intent") == {"hours": (2, 1), "human": (3, 0),
                                         "start_return": (1, 0)}
    # labels, by id, with their names
    assert figures(report, "label") == {ids["VIP"]: (2, 0), ids["Billing issue"]: (1, 0),
                                        "(none)": (2, 1)}
    assert report["label_names"] == {ids["VIP"]: "VIP", ids["Billing issue"]: "Billing issue"}
    # per agent: handled, first response, resolution, CSAT
    by_agent = report["by_agent"]
    assert figures(report, "agent") == {ids["Alice"]: (1, 0), ids["Bob"]: (1, 0),
                                        ids["Carol"]: (1, 0), "(none)": (1, 1)}
    assert report["agent_names"] == {ids["Alice"]: "Alice", ids["Bob"]: "Bob",
                                     ids["Carol"]: "Carol"}
    alice, bob, carol = (by_agent[ids[n]] for n in ("Alice", "Bob", "Carol"))
    assert alice["times"]["first_response"]["median_seconds"] == 60.0
    assert alice["times"]["resolution"]["median_seconds"] == 600.0
    assert (alice["csat"]["asked"], alice["csat"]["answered"], alice["csat"]["average"]) == (
        1, 1, 5.0)
    assert bob["times"]["first_response"]["median_seconds"] == 120.0
    assert bob["times"]["resolution"]["median_seconds"] == 1200.0
    assert (bob["csat"]["asked"], bob["csat"]["answered"], bob["csat"]["average"]) == (
        1, 0, None)
    assert carol["times"]["first_response"]["count"] == 0  # she never wrote
    assert carol["times"]["resolution"]["median_seconds"] == 300.0
    assert report["total"]["times"]["resolution"]["count"] == 3  # not the abandoned one

    # the same dimensions as filters
    _, hours = await desk.report(intent="hours")
    assert (hours["total"]["volume"]["ended"], hours["total"]["volume"]["abandoned"]) == (2, 1)
    _, vip = await desk.report(label=ids["VIP"])
    assert vip["total"]["volume"]["ended"] == 2
    assert sorted(vip["by_agent"]) == sorted([ids["Alice"], ids["Bob"]])
    _, bobs = await desk.report(agent=ids["Bob"])
    assert bobs["total"]["volume"]["ended"] == 1
    assert list(bobs["by_intent"]) == ["human", "start_return"]
    # and in the one-figure endpoints
    status, times = await desk.call("Root", "GET", "/analytics/response-times",
                                    **{"from": desk.at(-60).isoformat()})
    assert status == 200
    assert times["by_agent"][ids["Alice"]]["first_response"]["median_seconds"] == 60.0


async def test_what_agents_see(desk: Desk) -> None:
    ids = desk.ids
    # Alice (team support): her team's, and of the agents only herself
    status, alice = await desk.report("Alice")
    assert status == 200
    assert (alice["scope"], alice["note"]) == ("teams", None)
    assert alice["total"]["volume"]["ended"] == 1
    assert list(alice["by_agent"]) == [ids["Alice"]]
    assert alice["agent_names"] == {ids["Alice"]: "Alice"}
    assert (await desk.report("Alice", agent=ids["Alice"]))[0] == 200
    status, refused = await desk.report("Alice", agent=ids["Bob"])
    assert status == 403 and "own figures" in refused["message"]

    # Carol (no team): what she had, and why, instead of zeros
    status, carol = await desk.report("Carol")
    assert status == 200
    assert (carol["scope"], carol["note"]) == ("own", NO_TEAM)
    assert carol["total"]["volume"]["ended"] == 1
    assert carol["total"]["times"]["resolution"]["median_seconds"] == 300.0
    assert list(carol["by_agent"]) == [ids["Carol"]]
    assert carol["filters"]["agent"] == ids["Carol"]
    assert carol["started"] == {}
    status, refused = await desk.report("Carol", team="support")
    assert status == 403 and "you have none" in refused["message"]
