"""The pipeline: inbound dedupe, per-conversation order, crash recovery, owners, bot errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web

import gateway.bot_turn
from connectors.base import Connector, ConnectorContext, DeliveryResult
from flows.bot import BotTurn, HandoffRequest, Reply, TurnContext
from gateway.feed import Feed
from gateway.keys import PIPELINE
from gateway.model import (
    Activity,
    Conversation,
    DeliveryStatus,
    InboundMessage,
    OwnerState,
    Party,
    Role,
)
from gateway.outbox import Outbox
from gateway.pipeline import Pipeline
from gateway.routing import Routing
from gateway.store import Store
from gateway.store.turn_records import current as current_turn_state
from tests.conftest import Gateway, processed, unprocessed


class FakeConnector(Connector):
    channel = "test"

    def __init__(self) -> None:
        self.sent: list[str] = []

    def setup(self, app: web.Application) -> None:
        pass

    async def start(self, context: ConnectorContext) -> None:
        pass

    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        self.sent.append(item.text or "")
        return DeliveryResult(DeliveryStatus.DELIVERED, external_id=item.id)


class EchoBot:
    """Echoes, counts turns in its state, hands off on "human", raises on ``fail_on``."""

    def __init__(self, *, delay: float = 0.0, fail_on: tuple[str, ...] = ()) -> None:
        self.seen: list[str] = []
        self.delay = delay  # simulated thinking time, so turns overlap if unserialised
        self.fail_on = fail_on
        self.busy = 0
        self.max_busy = 0

    async def respond(self, turn: TurnContext) -> BotTurn:
        text = turn.message.text or ""
        self.seen.append(text)
        self.busy += 1
        self.max_busy = max(self.max_busy, self.busy)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.busy -= 1
        if text in self.fail_on:
            raise RuntimeError(f"bot bug on {text!r}")
        state = {"turns": int(turn.state.get("turns", 0)) + 1}
        if text == "human":
            return BotTurn([Reply("Getting a human.")], state, HandoffRequest("asked for one"))
        return BotTurn([Reply(f"echo: {text}")], state)


@dataclass
class Rig:
    store: Store
    bot: EchoBot
    connector: FakeConnector
    outbox: Outbox
    routing: Routing
    pipeline: Pipeline


def build(store: Store, bot: EchoBot, connector: FakeConnector | None = None) -> Rig:
    connector = connector or FakeConnector()
    outbox = Outbox(store, {"test": connector}, max_attempts=3, sweep_seconds=0.05)
    routing = Routing(store, outbox)
    return Rig(store, bot, connector, outbox, routing,
               Pipeline(store, bot, outbox, routing, sweep_seconds=3600))


@pytest.fixture
def bot() -> EchoBot:
    return EchoBot()


@pytest.fixture
async def rig(store: Store, bot: EchoBot) -> AsyncIterator[Rig]:
    rig = build(store, bot)
    rig.outbox.start()
    yield rig
    await rig.pipeline.stop()
    await rig.outbox.stop()


def message(external_id: str, text: str | None = None, *, thread: str = "chat-1",
            channel: str = "test") -> InboundMessage:
    return InboundMessage(channel=channel, external_id=external_id, thread_key=thread,
                          sender=Party(role=Role.CUSTOMER, id="cust-1"),
                          sender_external_id="cust-1", text=text or external_id)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def settle(store: Store, *pipelines: Pipeline) -> None:
    """Every inbound processed, every outbound delivered, no turn running."""

    async def idle() -> bool:
        busy = await unprocessed(store) + await store.messages.count_documents(
            {"delivery.status": {"$in": ["pending", "sending"]}})
        return busy == 0 and not any(p.busy() for p in pipelines)

    await wait_for(idle)


async def bot_replies(store: Store, conversation_id: str) -> list[dict]:
    cursor = store.messages.find({"conversation_id": conversation_id, "sender.role": "bot"})
    return await cursor.sort("seq", 1).to_list()


async def inbound_items(store: Store, conversation_id: str) -> list[dict]:
    cursor = store.messages.find({"conversation_id": conversation_id, "direction": "in"})
    return await cursor.sort("seq", 1).to_list()


# ---------------------------------------------------------------------- dedupe


async def test_same_message_twice_is_stored_and_answered_once(gateway: Gateway) -> None:
    pipeline = gateway.app[PIPELINE]
    hello = InboundMessage(channel="webchat", external_id="v1:c1", thread_key="v1",
                           sender=Party(role=Role.CUSTOMER, id="v1"), sender_external_id="v1",
                           text="hello")
    first = await pipeline.ingest(hello)
    again = await pipeline.ingest(hello)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.item.id == first.item.id and again.conversation.id == first.conversation.id

    hours = hello.model_copy(update={"external_id": "v1:c2",
                                     "text": "what are your opening hours?"})
    racing = await asyncio.gather(*(pipeline.ingest(hours) for _ in range(8)))
    assert Counter(r.duplicate for r in racing) == {False: 1, True: 7}
    assert len({r.item.id for r in racing}) == 1
    await gateway.settle()

    cid = first.conversation.id
    assert [d["text"] for d in await inbound_items(gateway.store, cid)] == [
        "hello", "what are your opening hours?"]
    replies = await bot_replies(gateway.store, cid)
    per_message = Counter(d["reply_to_id"] for d in replies)
    assert per_message == {first.item.id: 2, racing[0].item.id: 1}  # greeting + menu; answer
    assert "Monday to Friday" in replies[-1]["text"]


async def test_concurrent_duplicates_reach_the_bot_once(rig: Rig) -> None:
    racing = await asyncio.gather(*(rig.pipeline.ingest(message("m1")) for _ in range(10)))
    assert sum(not r.duplicate for r in racing) == 1
    await settle(rig.store, rig.pipeline)
    assert rig.bot.seen == ["m1"]
    assert rig.connector.sent == ["echo: m1"]


# ----------------------------------------------------------------------- order


async def test_turns_run_in_order_and_exactly_once(store: Store) -> None:
    rig = build(store, EchoBot(delay=0.005))
    rig.outbox.start()
    try:
        texts = [f"msg {n}" for n in range(20)]
        results = await asyncio.gather(
            *(rig.pipeline.ingest(message(f"m{n}", t)) for n, t in enumerate(texts)))
        assert not any(r.duplicate for r in results)
        await settle(store, rig.pipeline)
    finally:
        await rig.pipeline.stop()
        await rig.outbox.stop()
    cid = results[0].conversation.id
    in_store = [d["text"] for d in await inbound_items(store, cid)]
    assert sorted(in_store) == sorted(texts)
    assert rig.bot.seen == in_store  # in seq order, each once
    assert rig.bot.max_busy == 1  # never two turns of one conversation at once
    assert rig.connector.sent == [f"echo: {t}" for t in in_store]
    state = await current_turn_state(store, cid)
    assert state is not None and state.bot_state == {"turns": 20}
    assert state.lease is not None
    assert state.lease.owner is None  # released


# --------------------------------------------------------------- crash recovery


async def test_sweep_answers_a_message_left_unprocessed(rig: Rig) -> None:
    conversation = await rig.pipeline.open_conversation("test", "chat-1", "cust-1")
    # stored by a process that crashed before scheduling the turn
    item, _ = await rig.store.append_inbound(conversation, message("m1", "still there?"))
    assert await rig.pipeline.sweep_once() == 0  # not stale yet by the default
    assert await rig.pipeline.sweep_once(timedelta(0)) == 1
    await settle(rig.store, rig.pipeline)
    assert rig.bot.seen == ["still there?"]
    assert await processed(rig.store, item.id)
    assert await rig.pipeline.sweep_once(timedelta(0)) == 0

    # the turn's replies and its record (the processed mark) commit together, so a
    # crash cannot leave one without the other; if a turn runs again anyway (an operator
    # resets the mark, the record and the sweep's window), what it says is stored once
    await rig.store.turn_state.update_one({"_id": conversation.id},
                                          {"$set": {"processed_seq": item.seq - 1}})
    await rig.store.messages.update_many({"conversation_id": conversation.id},
                                         {"$unset": {"turn": ""}})
    rig.pipeline._mark = item.created_at - timedelta(seconds=1)
    rig.pipeline._held.clear()
    assert await rig.pipeline.sweep_once(timedelta(0)) == 1
    await settle(rig.store, rig.pipeline)
    assert rig.bot.seen == ["still there?"] * 2  # the turn ran again...
    replies = await bot_replies(rig.store, conversation.id)
    assert [d["dedupe_key"] for d in replies] == [f"{item.id}:reply:0"]  # ...said once
    assert rig.connector.sent == ["echo: still there?"]


# ---------------------------------------------------------------------- owners


async def test_bot_is_silent_while_a_human_owns_the_conversation(rig: Rig) -> None:
    store, pipeline = rig.store, rig.pipeline
    first = await pipeline.ingest(message("m1", "human"))
    await settle(store, pipeline)
    cid = first.conversation.id
    conversation = await store.get_conversation(cid)
    assert conversation is not None and conversation.owner is OwnerState.QUEUED
    assert conversation.handoff is not None and conversation.handoff.reason == "asked for one"
    assert rig.connector.sent == ["Getting a human.",
                                  "You are in the queue for a human agent. They will see "
                                  "everything you have written so far."]

    await pipeline.ingest(message("m2", "anyone?"))
    await settle(store, pipeline)
    assert await store.transition(cid, {OwnerState.QUEUED}, OwnerState.AGENT,
                                  also={"assignee_id": "alice"})
    await pipeline.ingest(message("m3", "hello alice"))
    await settle(store, pipeline)
    assert rig.bot.seen == ["human"]
    assert all([await processed(store, d["_id"]) for d in await inbound_items(store, cid)])
    assert len(await bot_replies(store, cid)) == 1

    assert await store.transition(cid, {OwnerState.AGENT}, OwnerState.RESOLVED)
    reopened = await pipeline.ingest(message("m4", "one more thing"))
    await settle(store, pipeline)
    conversation = await store.get_conversation(cid)
    assert conversation is not None and conversation.owner is OwnerState.BOT
    assert conversation.assignee_id is None and conversation.handoff is None
    assert rig.bot.seen == ["human", "one more thing"]
    event = await store.find_by_dedupe_key(f"{reopened.item.id}:reopen")
    assert event is not None and event.name == "reopened"
    assert rig.connector.sent[-2:] == ["Conversation reopened.", "echo: one more thing"]
    state = await current_turn_state(store, conversation.id)
    assert state is not None and state.bot_state == {"turns": 1}  # reopening: afresh


# ------------------------------------------------------------------ bot errors


async def test_a_failing_bot_does_not_wedge_the_conversation(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="gateway.bot_turn")
    rig = build(store, EchoBot(fail_on=("boom",)))
    rig.outbox.start()
    try:
        first = await rig.pipeline.ingest(message("m1", "before"))
        await settle(store, rig.pipeline)
        broken = await rig.pipeline.ingest(message("m2", "boom"))
        await settle(store, rig.pipeline)
        after = await rig.pipeline.ingest(message("m3", "after"))
        await settle(store, rig.pipeline)
    finally:
        await rig.pipeline.stop()
        await rig.outbox.stop()
    assert rig.bot.seen == ["before", "boom", "after"]  # the failed turn was not retried
    assert await processed(store, broken.item.id)
    replies = await bot_replies(store, first.conversation.id)
    assert [d["reply_to_id"] for d in replies] == [first.item.id, broken.item.id,
                                                    after.item.id]
    fallback = replies[1]["text"]
    assert fallback == gateway.bot_turn.BOT_ERROR_TEXT
    assert rig.connector.sent == ["echo: before", fallback, "echo: after"]
    conversation = await store.get_conversation(first.conversation.id)
    assert conversation is not None and conversation.owner is OwnerState.BOT
    state = await current_turn_state(store, conversation.id)
    assert state is not None
    assert state.bot_state == {"turns": 2}  # the failed turn kept the old memory
    failures = [r for r in caplog.records if "bot failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


class HangingBot(EchoBot):
    async def respond(self, turn: TurnContext) -> BotTurn:
        if turn.message.text == "hang":
            self.seen.append("hang")
            await asyncio.Event().wait()
        return await super().respond(turn)


async def test_a_hanging_bot_times_out(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.bot_turn, "BOT_TIMEOUT", 0.2)
    rig = build(store, HangingBot())
    rig.outbox.start()
    try:
        await rig.pipeline.ingest(message("m1", "hang"))
        await rig.pipeline.ingest(message("m2", "then this"))
        await settle(store, rig.pipeline)
    finally:
        await rig.pipeline.stop()
        await rig.outbox.stop()
    assert rig.connector.sent == [gateway.bot_turn.BOT_ERROR_TEXT, "echo: then this"]


# ------------------------------------------------------------ two processes


@contextlib.asynccontextmanager
async def two_processes(
    store: Store, mongo_uri: str, db_name: str, bot: EchoBot, connector: FakeConnector
) -> AsyncIterator[tuple[list[Rig], list[Feed]]]:
    """Two gateway processes as the app builds them: each its own store client (and so
    its own writer) and change feed; nothing shared but the database."""
    other = Store.connect(mongo_uri, db_name)
    rigs = [build(store, bot, connector), build(other, bot, connector)]
    feeds = [Feed(r.store, max_await_ms=100) for r in rigs]
    for rig, feed in zip(rigs, feeds, strict=True):
        feed.subscribe(rig.pipeline.on_change)
        feed.start()
        rig.outbox.start()
    try:
        for feed in feeds:
            assert await feed.ready()
        yield rigs, feeds
    finally:
        for rig, feed in zip(rigs, feeds, strict=True):
            await rig.pipeline.stop()
            await rig.outbox.stop()
            await feed.stop()
        await other.close()


async def test_two_pipelines_answer_each_message_once(
    store: Store, mongo_uri: str, db_name: str
) -> None:
    bot = EchoBot(delay=0.002)
    connector = FakeConnector()
    async with two_processes(store, mongo_uri, db_name, bot, connector) as (rigs, _):
        assert rigs[0].pipeline.instance != rigs[1].pipeline.instance
        pipelines = [r.pipeline for r in rigs]
        results = []
        for batch in range(4):  # bursts that arrive on both processes at once
            results += await asyncio.gather(
                *(pipelines[n % 2].ingest(message(f"m{batch}-{n}")) for n in range(5)))
        # No sweeper runs here: a message must not wait for one to be answered.
        await settle(store, *pipelines)
    cid = results[0].conversation.id
    in_store = [d["text"] for d in await inbound_items(store, cid)]
    assert len(in_store) == 20
    assert bot.seen == in_store  # once each, in the conversation's order
    assert bot.max_busy == 1
    replies = await bot_replies(store, cid)
    assert [d["text"] for d in replies] == [f"echo: {t}" for t in in_store]
    assert sorted(connector.sent) == sorted(f"echo: {t}" for t in in_store)


async def test_a_dead_holders_conversation_is_taken_over(
    store: Store, mongo_uri: str, db_name: str
) -> None:
    """A holds the conversation's lease and dies (its feed and pipeline stop without
    releasing it): B's message waits for the lease to end, then B answers it."""
    bot = EchoBot()
    connector = FakeConnector()
    async with two_processes(store, mongo_uri, db_name, bot, connector) as ((a, b), feeds):
        first = await a.pipeline.ingest(message("m1", "early"))
        await settle(store, a.pipeline)
        cid = first.conversation.id
        state = await store.turn_state.find_one({"_id": cid})
        assert state is not None
        assert state["lease"]["owner"] == a.pipeline.instance
        await feeds[0].stop()  # A is gone: it hears and answers nothing more ...
        a.pipeline._held.clear()
        await a.pipeline._background.stop(0)
        # ... and its lease runs out a second from now
        soon = datetime.now(UTC) + timedelta(seconds=1)
        await store.turn_state.update_one({"_id": cid}, {"$set": {"lease.until": soon}})
        await b.pipeline.ingest(message("m2", "late"))
        await settle(store, b.pipeline)
        state = await store.turn_state.find_one({"_id": cid})
        assert state is not None
        assert state["lease"]["owner"] == b.pipeline.instance
    assert bot.seen == ["early", "late"]
    assert connector.sent == ["echo: early", "echo: late"]


async def test_a_customer_who_writes_again_is_reachable_again(store: Store) -> None:
    rig = build(store, EchoBot())
    try:
        await rig.pipeline.ingest(message("m1", "hi"))
        await store.set_identity_reachable("test", "cust-1", False, "bot was blocked")
        identity = await store.resolve_identity("test", "cust-1")
        assert identity.reachable is False
        await rig.pipeline.ingest(message("m2", "I unblocked you"))
        identity = await store.resolve_identity("test", "cust-1")
        assert identity.reachable is True
    finally:
        await rig.pipeline.stop()
        await rig.outbox.stop()
