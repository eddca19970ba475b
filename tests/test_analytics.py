"""Analytics over the REST API: a constructed day of conversations, through the real
routing and pipeline, with known times (an injected clock for when they end, handoff and
reply times set in the store), giving exact figures per channel, team and topic."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from gateway.desk.analytics_api import analytics_endpoints
from gateway.keys import AGENTS, PIPELINE, ROUTING
from gateway.model import Agent, AgentRole, InboundMessage, Party, Role, utcnow
from gateway.settings import Settings
from tests.conftest import Gateway
from tests.test_csat import eventually

HUMAN = "customer asked for a human"
REFUND = "refund over limit"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"csat": True})


class Day:
    """The data set: T is two hours ago (CSAT answers must fall in the 24 h window)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.routing = gateway.app[ROUTING]
        self.pipeline = gateway.app[PIPELINE]
        now = utcnow().replace(microsecond=0)
        self.t = now - timedelta(hours=2)
        self.now = self.t  # one clock for the SLA timers and for when outcomes end
        self.routing.levels.clock = lambda: self.now
        self.routing.outcomes.clock = lambda: self.now
        self.tokens: dict[str, dict[str, str]] = {}

    def at(self, **delta: float) -> datetime:
        return self.t + timedelta(**delta)

    async def agent(self, name: str, teams: list[str], role: AgentRole = AgentRole.AGENT
                    ) -> Agent:
        agent, token = await self.gateway.app[AGENTS].add(name, role=role, teams=teams)
        self.tokens[name] = {"Authorization": f"Bearer {token}"}
        return agent

    async def open(self, channel: str, thread: str) -> str:
        conversation = await self.pipeline.open_conversation(channel, thread, thread)
        await self.gateway.store.conversations.update_one(
            {"_id": conversation.id}, {"$set": {"created_at": self.at(minutes=1)}})
        return conversation.id

    async def bot_resolves(self, cid: str, ended: datetime, topic: str) -> None:
        self.now = ended
        assert await self.routing.bot_resolve(cid, f"{cid}:resolve", topic=topic)

    async def agent_resolves(
        self, cid: str, agent: Agent, *, reason: str, team: str | None, topic: str | None,
        reply_after: float | None, ended: datetime, sla: dict[str, Any] | None = None,
    ) -> None:
        self.now = self.t
        assert await self.routing.handoff(cid, reason, team=team, topic=topic)
        await self.gateway.store.conversations.update_one(
            {"_id": cid}, {"$set": {"handoff.requested_at": self.t}})
        await self.routing.claim(cid, agent)
        if reply_after is not None:
            self.now = self.at(seconds=reply_after)
            item = await self.routing.reply(cid, agent, "On it.")
            await self.gateway.store.messages.update_one(
                {"_id": item.id}, {"$set": {"created_at": self.at(seconds=reply_after)}})
        if sla is not None:
            await self.gateway.store.conversations.update_one({"_id": cid}, {"$set": {"sla": sla}})
        self.now = ended
        await self.routing.resolve(cid, agent)

    async def answer(self, cid: str, channel: str, thread: str, text: str) -> None:
        await self.pipeline.ingest(InboundMessage(
            channel=channel, external_id=f"{thread}:{ObjectId()}", thread_key=thread,
            sender=Party(role=Role.CUSTOMER, id=thread), sender_external_id=thread, text=text))

        async def answered() -> bool:  # the outcome is written after the conversation
            outcome = await self.gateway.store.db["outcomes"].find_one(
                {"conversation_id": cid, "csat_score": {"$ne": None}})
            return outcome is not None

        await eventually(answered)

    async def build(self) -> None:
        alice = await self.agent("Alice", ["support"])
        bob = await self.agent("Bob", ["billing"])
        await self.agent("Root", [], AgentRole.ADMIN)
        await self.agent("Dee", [], AgentRole.DESIGNER)
        c1 = await self.open("webchat", "w1")
        await self.bot_resolves(c1, self.t, "faq")  # exactly at the start: inside
        c2 = await self.open("webchat", "w2")
        await self.bot_resolves(c2, self.at(hours=2), "returns")
        c3 = await self.open("telegram", "t3")
        await self.agent_resolves(c3, alice, reason=HUMAN, team="support", topic=None,
                                  reply_after=60, ended=self.at(minutes=10))
        c4 = await self.open("webchat", "w4")
        await self.agent_resolves(  # the SLA's first response wins over the history's
            c4, bob, reason=REFUND, team="billing", topic="returns", reply_after=120,
            ended=self.at(minutes=30),
            sla={"first_response_at": self.at(minutes=3), "first_response_breached": True,
                 "resolution_breached": False})
        c5 = await self.open("webchat", "w5")
        await self.agent_resolves(c5, bob, reason=HUMAN, team=None, topic=None,
                                  reply_after=None, ended=self.at(minutes=20))
        c6 = await self.open("webchat", "w6")  # ends exactly at the end: outside
        await self.bot_resolves(c6, self.at(days=1), "faq")
        await self.gateway.store.conversations.update_one(
            {"_id": c6}, {"$set": {"created_at": self.at(days=2)}})
        await self.answer(c3, "telegram", "t3", "5")
        await self.answer(c4, "webchat", "w4", "3 slow")

    async def get(self, path: str, who: str | None = "Root", **params: str) -> tuple[int, Any]:
        query = {"from": self.t.isoformat(), "to": self.at(days=1).isoformat(), **params}
        headers = self.tokens[who] if who else {}
        async with self.gateway.http.get(self.gateway.url + "/api/v1/analytics" + path,
                                         headers=headers, params=query) as response:
            return response.status, await response.json()


@pytest.fixture
async def day(gateway: Gateway) -> Day:
    built = Day(gateway)
    await built.build()
    return built


def durations(count: int, median: float | None, p90: float | None) -> dict[str, Any]:
    return {"count": count, "median_seconds": median, "p90_seconds": p90}


def volume(ended: int, contained: int) -> dict[str, Any]:
    """The volume of the day's outcomes: the contained ones the bot's, the others agents'."""
    return {"ended": ended, "bot_contained": contained, "handed_off": ended - contained,
            "containment_rate": contained / ended if ended else None,
            "resolved_by_agent": ended - contained, "resolved_by_bot": contained,
            "abandoned": 0, "abandoned_in": {"bot": 0, "queued": 0, "agent": 0}}


async def test_every_figure_exact(day: Day) -> None:
    status, report = await day.get("")
    assert status == 200, report
    total = report["total"]
    assert report["started"] == {"telegram": 1, "webchat": 4}
    assert total["volume"] == volume(5, 2)
    assert total["handoff_reasons"] == {HUMAN: 2, REFUND: 1}
    assert total["times"] == {"first_response": durations(2, 60.0, 180.0),
                              "resolution": durations(3, 1200.0, 1800.0)}
    assert total["sla"] == {"with_sla": 3, "first_response_breaches": 1,
                            "resolution_breaches": 0}
    assert total["csat"] == {"asked": 3, "answered": 2, "average": 4.0,
                             "distribution": {"1": 0, "2": 0, "3": 1, "4": 0, "5": 1}}

    by_channel = report["by_channel"]
    assert sorted(by_channel) == ["telegram", "webchat"]
    assert by_channel["telegram"]["volume"] == volume(1, 0)
    assert by_channel["webchat"]["volume"] == volume(4, 2)
    assert by_channel["webchat"]["handoff_reasons"] == {HUMAN: 1, REFUND: 1}
    assert by_channel["telegram"]["csat"]["average"] == 5.0

    by_team = report["by_team"]
    assert {k: v["volume"]["ended"] for k, v in by_team.items()} == {
        "(none)": 2, "billing": 2, "support": 1}  # c5: the resolving agent's team
    assert by_team["billing"]["times"]["resolution"] == durations(2, 1200.0, 1800.0)
    assert by_team["support"]["times"]["first_response"] == durations(1, 60.0, 60.0)

    by_topic = report["by_topic"]
    assert {k: v["volume"]["ended"] for k, v in by_topic.items()} == {
        "faq": 1, "returns": 2, HUMAN: 2}
    assert by_topic["returns"]["volume"] == volume(2, 1)

    # one figure per endpoint, same numbers
    status, csat = await day.get("/csat")
    assert status == 200 and csat["total"] == total["csat"]
    assert csat["by_team"]["billing"]["distribution"]["3"] == 1
    status, times = await day.get("/response-times")
    assert status == 200 and times["total"] == total["times"]
    status, reasons = await day.get("/handoff-reasons")
    assert status == 200 and reasons["by_channel"]["telegram"] == {HUMAN: 1}
    status, sla = await day.get("/sla")
    assert status == 200 and sla["by_team"]["billing"]["first_response_breaches"] == 1
    status, conversations = await day.get("/conversations")
    assert status == 200 and conversations["total"] == volume(5, 2)
    assert conversations["started"] == {"telegram": 1, "webchat": 4}


async def test_filters_and_period_boundaries(day: Day) -> None:
    status, webchat = await day.get("", channel="webchat")
    assert status == 200
    assert webchat["total"]["volume"] == volume(4, 2)
    assert list(webchat["by_channel"]) == ["webchat"]
    assert webchat["started"] == {"webchat": 4}
    _, billing = await day.get("/conversations", team="billing")
    assert billing["total"] == volume(2, 0)
    _, returns = await day.get("/conversations", topic="returns")
    assert returns["total"] == volume(2, 1)

    _, first_hour = await day.get("/conversations", to=day.at(hours=1).isoformat())
    assert first_hour["total"]["ended"] == 4  # c1 (at the start), c3, c4, c5; not c2
    _, later = await day.get("/conversations", **{
        "from": day.at(hours=1).isoformat(), "to": day.at(days=1, milliseconds=1).isoformat()})
    assert later["total"] == volume(2, 2)  # c2 and c6 (ended exactly at T + 1 day)
    _, empty = await day.get("", **{"from": day.at(days=3).isoformat(),
                                    "to": day.at(days=4).isoformat()})
    assert empty["total"]["volume"] == volume(0, 0)
    assert empty["total"]["times"]["first_response"] == durations(0, None, None)
    assert empty["total"]["csat"]["average"] is None


async def test_roles(day: Day) -> None:
    paths = [ep.path.removeprefix("/v1/analytics") for ep in analytics_endpoints()]
    assert len(paths) == 6
    for path in paths:
        assert (await day.get(path, who=None))[0] == 401
        status, body = await day.get(path, who="Dee")
        assert (status, body["error"]) == (403, "forbidden")
        assert (await day.get(path, who="Alice", team="billing"))[0] == 403
        assert (await day.get(path, who="Root", team="billing"))[0] == 200
    # an agent sees their own teams only, with or without team=
    status, alice = await day.get("", who="Alice")
    assert status == 200
    assert alice["total"]["volume"] == volume(1, 0)
    assert list(alice["by_team"]) == ["support"] and alice["started"] == {}
    assert (alice["scope"], alice["note"]) == ("teams", None)
    alice_id = next(k for k, v in alice["agent_names"].items() if v == "Alice")
    assert list(alice["by_agent"]) == [alice_id]  # her own row only
    status, root = await day.get("", who="Root")
    assert (root["scope"], root["note"]) == ("all", None)
    assert sorted(root["agent_names"].values()) == ["Alice", "Bob"]
    assert sorted(root["by_agent"]) == sorted([*root["agent_names"], "(none)"])
    status, same = await day.get("", who="Alice", team="support")
    assert status == 200 and same["total"] == alice["total"]


@pytest.mark.parametrize("query", [
    {"from": "yesterday"},
    {"from": "2025-01-02T00:00:00+00:00", "to": "2025-01-01T00:00:00+00:00"},
    {"from": "2020-01-01T00:00:00+00:00", "to": "2025-01-01T00:00:00+00:00"},
    {"channel": "x" * 201},
])
async def test_bad_queries(gateway: Gateway, query: dict[str, str]) -> None:
    _, admin = await gateway.agent("Root")
    await gateway.store.agents.update_one({}, {"$set": {"role": "admin"}})
    async with gateway.http.get(gateway.url + "/api/v1/analytics", headers=admin,
                                params=query) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "bad_request"


async def test_a_reopened_conversation_counts_each_resolve(gateway: Gateway) -> None:
    """The handoff is cleared when a conversation reopens; its outcome keeps it."""
    routing = gateway.app[ROUTING]
    agent, _ = await gateway.app[AGENTS].add("Ann", teams=["support"])
    conversation = await gateway.app[PIPELINE].open_conversation("webchat", "w_re", "w_re")
    await routing.handoff(conversation.id, HUMAN)
    await routing.claim(conversation.id, agent)
    await routing.resolve(conversation.id, agent)
    assert await routing.reopen(conversation.id, "re")
    assert await routing.bot_resolve(conversation.id, "again", topic="faq")
    outcomes = await routing.outcomes.db.outcomes.find({}).sort("ended_at", 1).to_list()
    assert [(o["resolved_by"], o["handed_off"], o["reason"], o["team"], o["topic"])
            for o in outcomes] == [("agent", True, HUMAN, "support", HUMAN),
                                   ("bot", False, None, None, "faq")]


async def test_first_response_from_the_history_without_sla(gateway: Gateway) -> None:
    routing = gateway.app[ROUTING]
    agent, _ = await gateway.app[AGENTS].add("Ann")
    conversation = await gateway.app[PIPELINE].open_conversation("webchat", "w_h", "w_h")
    await routing.handoff(conversation.id, HUMAN)
    start = utcnow() - timedelta(minutes=5)
    await routing.claim(conversation.id, agent)
    item = await routing.reply(conversation.id, agent, "Hello")
    await gateway.store.conversations.update_one(  # data from before SLA timers existed
        {"_id": conversation.id}, {"$set": {"handoff.requested_at": start, "sla": None}})
    await gateway.store.messages.update_one(
        {"_id": item.id}, {"$set": {"created_at": start + timedelta(seconds=42)}})
    await routing.resolve(conversation.id, agent)
    [outcome] = await routing.outcomes.db.outcomes.find({}).to_list()
    assert outcome["first_response_seconds"] == 42.0 and outcome["has_sla"] is False
