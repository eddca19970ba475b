"""SLA timers through the real gateway: due times per priority, first response and
resolution set by the agent REST API, breaches flagged by the checker and by a late reply
(with the event in the timeline), breach counts, and the closed-hours notice on the
customer's web chat. The SLA clock is injected: time moves, nobody waits for it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.keys import PIPELINE, ROUTING
from gateway.model import Conversation, OwnerState
from gateway.settings import Settings
from tests.conftest import Gateway, Visitor, running_gateway

T0 = datetime(2025, 3, 12, 10, 0, tzinfo=UTC)  # a Wednesday


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sla_check_seconds": 0.1, "routing_sweep_seconds": 0.2})


@pytest.fixture
def clock(gateway: Gateway) -> Clock:
    clock = Clock(T0)
    gateway.app[ROUTING].levels.clock = clock
    return clock


async def call(gateway: Gateway, method: str, path: str, headers: dict[str, str],
               **kwargs: Any) -> tuple[int, Any]:
    async with gateway.http.request(method, gateway.url + "/api/v1" + path, headers=headers,
                                    **kwargs) as response:
        return response.status, await response.json()


async def handoff(gateway: Gateway, key: str, priority: str = "normal",
                  team: str | None = None) -> str:
    conversation = await gateway.app[PIPELINE].open_conversation("webchat", key, key)
    assert await gateway.app[ROUTING].handoff(conversation.id, f"test {key}",
                                              priority=priority, team=team)
    return conversation.id


async def get(gateway: Gateway, conversation_id: str) -> Conversation:
    conversation = await gateway.store.get_conversation(conversation_id)
    assert conversation is not None
    return conversation


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def breach_events(gateway: Gateway, conversation_id: str) -> list[str]:
    items, _ = await gateway.store.history(conversation_id, limit=200)
    return [i.text or "" for i in reversed(items) if i.name == "sla_breached"]


async def test_due_times_per_priority(gateway: Gateway, clock: Clock) -> None:
    expected = {"urgent": (timedelta(minutes=5), timedelta(hours=4)),
                "high": (timedelta(minutes=15), timedelta(hours=8)),
                "normal": (timedelta(hours=1), timedelta(hours=24)),
                "low": (timedelta(hours=4), timedelta(hours=72)),
                "whatever": (timedelta(hours=1), timedelta(hours=24))}  # unknown: normal
    ids = {p: await handoff(gateway, f"due-{p}", p) for p in expected}
    for priority, (first, resolution) in expected.items():
        sla = (await get(gateway, ids[priority])).sla
        assert sla is not None
        assert sla.started_at == T0
        assert sla.first_response_due == T0 + first, priority
        assert sla.resolution_due == T0 + resolution, priority
        assert not sla.first_response_breached and sla.first_response_at is None
    # the console's view: due times and seconds left, computed by the server
    _, headers = await gateway.agent("Ann")
    clock.now = T0 + timedelta(minutes=2)
    status, body = await call(gateway, "GET", f"/conversations/{ids['urgent']}", headers)
    assert status == 200, body
    timer = body["sla"]["first_response"]
    assert timer["state"] == "running"
    assert timer["remaining_seconds"] == 180
    assert timer["overdue_seconds"] is None
    assert body["sla"]["resolution"]["remaining_seconds"] == 4 * 3600 - 120
    status, sub = await call(gateway, "GET", f"/conversations/{ids['urgent']}/sla", headers)
    assert status == 200 and sub["first_response"] == timer
    # a conversation never handed off has no timers
    plain = await gateway.app[PIPELINE].open_conversation("webchat", "plain", "plain")
    status, body = await call(gateway, "GET", f"/conversations/{plain.id}/sla", headers)
    assert status == 404 and "never handed off" in body["message"]


async def test_reply_and_resolve_meet_the_targets(gateway: Gateway, clock: Clock) -> None:
    cid = await handoff(gateway, "met", "high")
    _, headers = await gateway.agent("Ben")
    status, _ = await call(gateway, "POST", f"/conversations/{cid}/claim", headers)
    assert status == 200
    assert (await get(gateway, cid)).sla.first_response_at is None  # type: ignore[union-attr]
    clock.now = T0 + timedelta(minutes=10)
    status, _ = await call(gateway, "POST", f"/conversations/{cid}/messages", headers,
                           json={"text": "Hello, Ben here."})
    assert status == 201
    clock.now = T0 + timedelta(minutes=12)
    status, _ = await call(gateway, "POST", f"/conversations/{cid}/messages", headers,
                           json={"text": "Still here."})
    assert status == 201
    sla = (await get(gateway, cid)).sla
    assert sla is not None
    assert sla.first_response_at == T0 + timedelta(minutes=10)  # the first reply counts
    assert not sla.first_response_breached
    clock.now = T0 + timedelta(hours=2)
    status, body = await call(gateway, "POST", f"/conversations/{cid}/resolve", headers)
    assert status == 200, body
    assert body["sla"]["resolution"]["state"] == "met"
    assert body["sla"]["first_response"]["state"] == "met"
    sla = (await get(gateway, cid)).sla
    assert sla is not None
    assert sla.resolved_at == T0 + timedelta(hours=2)
    assert not sla.resolution_breached
    clock.now = T0 + timedelta(days=30)  # long after: met stays met, the checker agrees
    assert await gateway.app[ROUTING].levels.check_once() == 0
    assert await breach_events(gateway, cid) == []


async def test_checker_flags_a_breach_once_with_an_event(gateway: Gateway, clock: Clock) -> None:
    cid = await handoff(gateway, "late", "normal")
    waiting = await handoff(gateway, "fine", "low")
    await gateway.settle()
    clock.now = T0 + timedelta(minutes=61)  # normal: 1 h first response; low: 4 h

    async def flagged() -> bool:
        return (await get(gateway, cid)).sla.first_response_breached  # type: ignore[union-attr]

    await eventually(flagged)  # the background checker (every 0.1 s) found it
    await eventually(lambda: _has_event(gateway, cid))
    # more checker rounds (in this process or another) flag nothing again
    assert await gateway.app[ROUTING].levels.check_once() == 0
    assert await gateway.app[ROUTING].levels.check_once() == 0
    assert await breach_events(gateway, cid) == ["SLA breached: first response"]
    conversation = await get(gateway, cid)
    assert conversation.sla is not None and not conversation.sla.resolution_breached
    assert not (await get(gateway, waiting)).sla.first_response_breached  # type: ignore[union-attr]
    # the event is for agents: private, no delivery, so no channel is asked to send it
    items, _ = await gateway.store.history(cid, limit=50)
    event = next(i for i in items if i.name == "sla_breached")
    assert event.private and event.delivery is None
    # the console shows it overdue
    _, headers = await gateway.agent("Cy")
    status, body = await call(gateway, "GET", f"/conversations/{cid}/sla", headers)
    assert status == 200
    assert body["first_response"]["state"] == "breached"
    assert body["first_response"]["overdue_seconds"] == 60
    # the resolution target runs out too (24 h)
    clock.now = T0 + timedelta(hours=25)
    await eventually(lambda: _resolution_flagged(gateway, cid))
    await eventually(lambda: _events_are(gateway, cid, 2))
    assert await breach_events(gateway, cid) == ["SLA breached: first response",
                                                 "SLA breached: resolution"]


async def _has_event(gateway: Gateway, cid: str) -> bool:
    return bool(await breach_events(gateway, cid))


async def _events_are(gateway: Gateway, cid: str, n: int) -> bool:
    return len(await breach_events(gateway, cid)) == n


async def _resolution_flagged(gateway: Gateway, cid: str) -> bool:
    return (await get(gateway, cid)).sla.resolution_breached  # type: ignore[union-attr]


async def test_a_late_reply_and_a_late_resolve_are_flagged(settings: Settings) -> None:
    quiet = settings.model_copy(update={"sla_check_seconds": 3600})  # only the first sweep
    async with running_gateway(quiet) as gateway:
        clock = Clock(T0)
        gateway.app[ROUTING].levels.clock = clock
        cid = await handoff(gateway, "slow", "urgent")
        _, headers = await gateway.agent("Dee")
        assert (await call(gateway, "POST", f"/conversations/{cid}/claim", headers))[0] == 200
        clock.now = T0 + timedelta(minutes=7)  # urgent: 5 min
        status, _ = await call(gateway, "POST", f"/conversations/{cid}/messages", headers,
                               json={"text": "Sorry for the wait."})
        assert status == 201
        sla = (await get(gateway, cid)).sla
        assert sla is not None
        assert sla.first_response_at == T0 + timedelta(minutes=7)
        assert sla.first_response_breached
        assert await breach_events(gateway, cid) == ["SLA breached: first response"]
        clock.now = T0 + timedelta(hours=5)  # urgent: 4 h
        status, body = await call(gateway, "POST", f"/conversations/{cid}/resolve", headers)
        assert status == 200
        assert body["sla"]["resolution"]["state"] == "breached"
        assert body["sla"]["resolution"]["overdue_seconds"] == 3600
        assert await breach_events(gateway, cid) == ["SLA breached: first response",
                                                     "SLA breached: resolution"]
        # the checker does not count them again
        assert await gateway.app[ROUTING].levels.check_once() == 0


async def test_breach_counts_by_priority_and_team(gateway: Gateway, clock: Clock) -> None:
    levels = gateway.app[ROUTING].levels
    a = await handoff(gateway, "a", "urgent", team="billing")
    b = await handoff(gateway, "b", "urgent", team="billing")
    c = await handoff(gateway, "c", "high", team="tech")
    await handoff(gateway, "d", "low", team="tech")  # 4 h: not breached at +20 min
    clock.now = T0 + timedelta(minutes=20)
    await eventually(lambda: _flagged_all(gateway, [a, b, c]))
    _, headers = await gateway.agent("Eve")
    status, body = await call(gateway, "GET", "/sla/breaches?by=priority,team", headers)
    assert status == 200, body
    rows = {(r["priority"], r["team"]): r["count"] for r in body["items"]}
    assert rows == {("urgent", "billing"): 2, ("high", "tech"): 1}
    assert body["total"] == 3
    status, body = await call(gateway, "GET", "/sla/breaches?by=kind", headers)
    assert [(r["kind"], r["count"]) for r in body["items"]] == [("first_response", 3)]
    # the period is by due time: urgent was due at +5 min, high at +15 min
    since = (T0 + timedelta(minutes=10)).isoformat().replace("+00:00", "Z")
    status, body = await call(gateway, "GET", "/sla/breaches?by=priority",
                              headers, params={"since": since})
    assert status == 200, body
    assert [(r["priority"], r["count"]) for r in body["items"]] == [("high", 1)]
    # the store query the analytics reuse
    rows2 = await levels.sla.counts(T0, T0 + timedelta(days=1), ("team",))
    assert {(r.team, r.count) for r in rows2} == {("billing", 2), ("tech", 1)}
    for bad in ("by=colour", "since=yesterday", f"since={T0.isoformat()}&until=2025-01-01"):
        status, body = await call(gateway, "GET", "/sla/breaches?" + bad.replace("+", "%2B"),
                                  headers)
        assert status == 400, (bad, body)


async def _flagged_all(gateway: Gateway, ids: list[str]) -> bool:
    for cid in ids:
        sla = (await get(gateway, cid)).sla
        if sla is None or not sla.first_response_breached:
            return False
    return True


@pytest.fixture
def closed_settings(settings: Settings, tmp_path: Path) -> Settings:
    teams = tmp_path / "teams.yaml"
    teams.write_text("default:\n  timezone: Europe/Berlin\n  hours: {mon-fri: \"09:00-17:00\"}\n"
                     "teams:\n  support: always\n")
    return settings.model_copy(update={"teams_file": teams})


async def test_closed_notice_once_on_the_web_chat(closed_settings: Settings) -> None:
    saturday = datetime(2025, 3, 29, 12, 0, tzinfo=UTC)  # 13:00 in Berlin, DST tomorrow
    async with running_gateway(closed_settings) as gateway:
        gateway.app[ROUTING].levels.clock = Clock(saturday)
        agent_id, headers = await gateway.agent("Night")  # offline (as at night)
        visitor = Visitor(gateway)
        try:
            await visitor.connect()
            await visitor.say("I want to talk to a human please")
            await visitor.until(lambda i: i["type"] == "event" and i["name"] == "handoff")
            notice = await visitor.until(lambda i: i.get("role") == "system")
            assert notice["text"] == ("We're closed now; we'll answer from Monday 09:00 "
                                      "(Europe/Berlin).")
            await gateway.settle()
            seen = visitor.watermark
            # the customer keeps writing: no repeated notice, the bot stays silent
            for text in ("hello?", "is anyone there", "human"):
                await visitor.say(text)
                await visitor.until(lambda i, t=text: i.get("text") == t)  # the echo
                await gateway.settle()
            assert seen is not None
            later = [i for i in visitor.items if i["seq"] > seen]
            assert [(i["role"], i["text"]) for i in later] == [
                ("customer", "hello?"), ("customer", "is anyone there"), ("customer", "human")]
            queued = await gateway.store.list_conversations([OwnerState.QUEUED])
            assert len(queued) == 1  # the offline agent got nothing
            conversation = queued[0]
            items, _ = await gateway.store.history(conversation.id, limit=100)
            assert [i.name for i in items].count("closed") == 1
            # due in business hours: Monday 09:00 CEST (07:00 UTC) + 1 h
            assert conversation.sla is not None
            assert conversation.sla.first_response_due == datetime(2025, 3, 31, 8, 0,
                                                                   tzinfo=UTC)
            # presence is respected: online, the agent gets it
            status, _ = await call(gateway, "PUT", "/me/presence", headers,
                                   json={"presence": "online"})
            assert status == 200

            async def assigned() -> bool:
                now = await gateway.store.get_conversation(conversation.id)
                return now is not None and now.assignee_id == agent_id

            await eventually(assigned)
            status, body = await call(gateway, "GET", "/sla/hours", headers)
            assert status == 200
            default = next(t for t in body["teams"] if t["team"] is None)
            assert default["open_now"] is False
            assert default["next_opening"].startswith("2025-03-31T07:00:00")
            support = next(t for t in body["teams"] if t["team"] == "support")
            assert support["open_now"] is True and support["timezone"] is None
        finally:
            await visitor.close()


async def test_an_open_team_sends_no_notice(closed_settings: Settings) -> None:
    async with running_gateway(closed_settings) as gateway:
        gateway.app[ROUTING].levels.clock = Clock(datetime(2025, 3, 29, 12, 0, tzinfo=UTC))
        open_team = await handoff(gateway, "s", team="support")  # always open
        wednesday = datetime(2025, 3, 26, 10, 0, tzinfo=UTC)  # 11:00 in Berlin: open
        gateway.app[ROUTING].levels.clock = Clock(wednesday)
        open_hours = await handoff(gateway, "w")
        await gateway.settle()
        for cid in (open_team, open_hours):
            items, _ = await gateway.store.history(cid, limit=20)
            assert [i.name for i in items if i.name] == ["handoff"]
        sla = (await get(gateway, open_hours)).sla
        assert sla is not None and sla.first_response_due == wednesday + timedelta(hours=1)


async def test_a_breach_event_never_reaches_the_web_chat_visitor(
    gateway: Gateway, clock: Clock,
) -> None:
    visitor = Visitor(gateway)
    try:
        await visitor.connect()
        await visitor.say("I want to talk to a human please")
        await visitor.until(lambda i: i["type"] == "event" and i["name"] == "handoff")
        await gateway.settle()
        [queued] = await gateway.store.list_conversations([OwnerState.QUEUED])
        clock.now = T0 + timedelta(days=3)  # long past every target of a normal handoff
        await eventually(lambda: _events_are(gateway, queued.id, 2))
        items, _ = await gateway.store.history(queued.id, limit=100)
        private = sorted(i.seq for i in items if i.name == "sla_breached")
        assert len(private) == 2
        assert all(i.private for i in items if i.name == "sla_breached")
        # live: the visitor gets content-free skips for them, in seq order
        await visitor.say("hello?")
        await visitor.until(lambda i: i.get("text") == "hello?")
        assert visitor.skipped == private
        # and a fresh replay from the start shows them to nobody either
        again = Visitor(gateway)
        again.token = visitor.token
        try:
            await again.connect(resume=False)  # the replay arrives before "synced"
            assert [i.get("text") for i in again.items][-1] == "hello?"
            assert again.skipped == private
            texts = [i.get("text") or "" for i in visitor.items + again.items]
            assert not any("SLA" in t for t in texts)
        finally:
            await again.close()
    finally:
        await visitor.close()
