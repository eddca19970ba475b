"""The outbox on the real store, with a scripted fake connector for a ``test`` channel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest
from aiohttp import web

import gateway.outbox
from connectors.base import Connector, ConnectorContext, DeliveryError, DeliveryResult
from gateway.model import (
    Activity,
    Conversation,
    DeliveryStatus,
    OutboundDraft,
    Party,
    Role,
    utcnow,
)
from gateway.outbox import Outbox
from gateway.store import Store

BOT = Party(role=Role.BOT, name="Bot")


class FakeConnector(Connector):
    """Records every send; ``script[text]`` lists what the next attempts for it raise."""

    channel = "test"

    def __init__(self, log: list[str] | None = None) -> None:
        self.attempts: list[str] = []  # every call, in order
        self.sent: list[str] = log if log is not None else []  # successful sends, in order
        self.script: dict[str, list[BaseException]] = {}
        self.delivered_before: dict[str, list[str]] = {}

    def setup(self, app: web.Application) -> None:
        pass

    async def start(self, context: ConnectorContext) -> None:
        pass

    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        assert conversation.id == item.conversation_id
        text = item.text or ""
        self.attempts.append(text)
        self.delivered_before[text] = list(self.sent)
        outcomes = self.script.get(text)
        if outcomes:
            raise outcomes.pop(0)
        self.sent.append(text)
        return DeliveryResult(DeliveryStatus.DELIVERED, external_id=f"ext-{item.id}")


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def reload(store: Store, item: Activity) -> Activity:
    fresh = await store.get_message(item.id)
    assert fresh is not None and fresh.delivery is not None
    return fresh


async def settled(store: Store, *items: Activity) -> list[Activity]:
    """Wait until every item reached a final delivery status; return them fresh."""
    final = {DeliveryStatus.DELIVERED, DeliveryStatus.STORED, DeliveryStatus.FAILED,
             DeliveryStatus.SKIPPED}

    async def done() -> bool:
        for item in items:
            fresh = await reload(store, item)
            assert fresh.delivery is not None
            if fresh.delivery.status not in final:
                return False
        return True

    await wait_for(done)
    return [await reload(store, item) for item in items]


def drafts(*texts: str) -> list[OutboundDraft]:
    return [OutboundDraft(sender=BOT, text=t) for t in texts]


@pytest.fixture
def fake() -> FakeConnector:
    return FakeConnector()


@pytest.fixture
async def outbox(store: Store, fake: FakeConnector) -> AsyncIterator[Outbox]:
    box = Outbox(store, {"test": fake}, max_attempts=3, sweep_seconds=0.05)
    box.start()
    yield box
    await box.stop()


@pytest.fixture
async def conversation(store: Store) -> Conversation:
    identity = await store.resolve_identity("test", "cust-1")
    return await store.resolve_conversation("test", "chat-1", identity.contact_id)


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exponential backoff starts at 0.5 s; cap it so retries happen within a test."""
    monkeypatch.setattr(gateway.outbox, "MAX_BACKOFF", 0.05)


async def test_delivered_items_record_status_and_external_id(
    store: Store, outbox: Outbox, fake: FakeConnector, conversation: Conversation
) -> None:
    items = await outbox.enqueue(conversation, drafts("one", "two", "three"))
    # stored claimed by this outbox, which sends them itself (no claim round trip)
    assert [i.delivery.status for i in items] == [DeliveryStatus.SENDING] * 3
    assert [i.delivery.attempts for i in items] == [0] * 3
    done = await settled(store, *items)
    for item in done:
        assert item.delivery is not None
        assert item.delivery.status is DeliveryStatus.DELIVERED
        assert item.delivery.external_id == f"ext-{item.id}"
        assert item.delivery.attempts == 1
        assert item.delivery.last_error is None and item.delivery.lease_until is None
    assert fake.sent == fake.attempts == ["one", "two", "three"]


async def test_enqueue_is_idempotent_per_dedupe_key(
    store: Store, outbox: Outbox, fake: FakeConnector, conversation: Conversation
) -> None:
    draft = OutboundDraft(sender=BOT, text="once", dedupe_key="turn-1:reply:0")
    [first] = await outbox.enqueue(conversation, [draft])
    [again] = await outbox.enqueue(conversation, [draft])
    assert again.id == first.id
    await settled(store, first)
    [marker] = await outbox.enqueue(conversation, drafts("marker"))
    await settled(store, marker)
    assert fake.sent == ["once", "marker"]


async def test_transient_failure_is_retried_in_order(
    store: Store, outbox: Outbox, fake: FakeConnector, conversation: Conversation
) -> None:
    fake.script["one"] = [DeliveryError("429", retry_after=0.05),
                          DeliveryError("503", retry_after=0.05)]
    one, two = await outbox.enqueue(conversation, drafts("one", "two"))
    one, two = await settled(store, one, two)
    assert one.delivery is not None and two.delivery is not None
    assert one.delivery.status is DeliveryStatus.DELIVERED and one.delivery.attempts == 3
    assert one.delivery.last_error is None
    assert two.delivery.status is DeliveryStatus.DELIVERED and two.delivery.attempts == 1
    assert fake.attempts == ["one", "one", "one", "two"]
    assert fake.delivered_before["two"] == ["one"]  # never sent before one was delivered


async def test_backoff_state_is_recorded(
    store: Store, fake: FakeConnector, conversation: Conversation
) -> None:
    box = Outbox(store, {"test": fake}, max_attempts=3)  # not started: no sweeper
    fake.script["slow"] = [DeliveryError("rate limited", retry_after=60)]
    [item] = await box.enqueue(conversation, drafts("slow"))
    await wait_for(lambda: _attempts_equal(store, item, 1))
    await wait_for(lambda: _status_is(store, item, DeliveryStatus.PENDING))
    fresh = await reload(store, item)
    assert fresh.delivery is not None
    assert fresh.delivery.last_error == "rate limited"
    assert fresh.delivery.next_attempt_at is not None
    assert fresh.delivery.next_attempt_at > utcnow() + timedelta(seconds=50)
    await box.deliver_conversation(conversation.id)  # not due yet: left alone
    assert fake.attempts == ["slow"]
    await box.stop()


async def _attempts_equal(store: Store, item: Activity, n: int) -> bool:
    fresh = await reload(store, item)
    return fresh.delivery is not None and fresh.delivery.attempts == n


async def _status_is(store: Store, item: Activity, status: DeliveryStatus) -> bool:
    fresh = await reload(store, item)
    return fresh.delivery is not None and fresh.delivery.status is status


async def test_permanent_failure_is_not_retried(
    store: Store, outbox: Outbox, fake: FakeConnector, conversation: Conversation
) -> None:
    fake.script["bad"] = [DeliveryError("chat not found", permanent=True)]
    bad, good = await outbox.enqueue(conversation, drafts("bad", "good"))
    bad, good = await settled(store, bad, good)
    assert bad.delivery is not None and good.delivery is not None
    assert bad.delivery.status is DeliveryStatus.FAILED
    assert bad.delivery.last_error == "chat not found"
    assert bad.delivery.attempts == 1 and bad.delivery.next_attempt_at is None
    assert good.delivery.status is DeliveryStatus.DELIVERED  # a failed item unblocks the rest
    await outbox.sweep_once()
    await outbox.deliver_conversation(conversation.id)
    assert fake.attempts == ["bad", "good"]


async def test_retries_exhausted_marks_failed(
    store: Store, outbox: Outbox, fake: FakeConnector, conversation: Conversation
) -> None:
    fake.script["doomed"] = [DeliveryError(f"timeout {n}", retry_after=0.01) for n in range(5)]
    [item] = await outbox.enqueue(conversation, drafts("doomed"))
    [item] = await settled(store, item)
    assert item.delivery is not None
    assert item.delivery.status is DeliveryStatus.FAILED
    assert item.delivery.attempts == 3
    assert item.delivery.last_error == "timeout 2"
    assert fake.attempts == ["doomed"] * 3


async def test_unknown_channel_fails_after_retries(
    store: Store, outbox: Outbox, fake: FakeConnector
) -> None:
    identity = await store.resolve_identity("fax", "1")
    conversation = await store.resolve_conversation("fax", "1", identity.contact_id)
    [item] = await outbox.enqueue(conversation, drafts("hello fax"))
    [item] = await settled(store, item)
    assert item.delivery is not None and item.delivery.status is DeliveryStatus.FAILED
    assert "not enabled" in (item.delivery.last_error or "")
    assert fake.attempts == []


async def test_connector_crash_is_transient(
    store: Store, outbox: Outbox, fake: FakeConnector, conversation: Conversation,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="gateway.outbox")
    fake.script["one"] = [RuntimeError("socket exploded")]
    one, two = await outbox.enqueue(conversation, drafts("one", "two"))
    one, two = await settled(store, one, two)
    assert one.delivery is not None and two.delivery is not None
    assert one.delivery.status is DeliveryStatus.DELIVERED and one.delivery.attempts == 2
    assert two.delivery.status is DeliveryStatus.DELIVERED
    assert fake.attempts == ["one", "one", "two"]
    crashed = [r for r in caplog.records if "connector crashed" in r.getMessage()]
    assert len(crashed) == 1 and crashed[0].exc_info is not None


async def test_expired_lease_is_recovered_once(
    store: Store, fake: FakeConnector, conversation: Conversation
) -> None:
    box = Outbox(store, {"test": fake}, max_attempts=3)  # not started: we sweep by hand
    stuck, _ = await store.append_outbound(conversation, drafts("stuck")[0])
    held, _ = await store.append_outbound(conversation, drafts("held")[0])
    now = utcnow()
    # a worker claimed "stuck" and died; its lease ran out a minute ago
    await store.messages.update_one({"_id": stuck.id}, {"$set": {
        "delivery.status": "sending", "delivery.attempts": 1,
        "delivery.lease_until": now - timedelta(minutes=1)}})
    await box.sweep_once()
    [stuck, held] = await settled(store, stuck, held)
    assert stuck.delivery is not None and stuck.delivery.status is DeliveryStatus.DELIVERED
    assert stuck.delivery.attempts == 2
    assert fake.attempts == ["stuck", "held"]
    await box.sweep_once()
    await box.deliver_conversation(conversation.id)
    assert fake.attempts == ["stuck", "held"]  # exactly once
    await box.stop()


async def test_live_lease_is_left_alone(
    store: Store, fake: FakeConnector, conversation: Conversation
) -> None:
    box = Outbox(store, {"test": fake}, max_attempts=3)
    busy, _ = await store.append_outbound(conversation, drafts("busy")[0])
    after, _ = await store.append_outbound(conversation, drafts("after")[0])
    await store.messages.update_one({"_id": busy.id}, {"$set": {
        "delivery.status": "sending", "delivery.attempts": 1,
        "delivery.lease_until": utcnow() + timedelta(minutes=1)}})
    await box.sweep_once()
    await box.deliver_conversation(conversation.id)
    await box.stop()  # waits for anything the sweep kicked
    assert fake.attempts == []  # another worker holds "busy"; "after" waits behind it
    assert (await reload(store, after)).delivery.status is DeliveryStatus.PENDING


async def test_two_outboxes_deliver_each_item_once(
    store: Store, conversation: Conversation
) -> None:
    log: list[str] = []
    fakes = [FakeConnector(log), FakeConnector(log)]
    boxes = [Outbox(store, {"test": f}, max_attempts=3, sweep_seconds=0.05) for f in fakes]
    for box in boxes:
        box.start()
    fakes[0].script["m3"] = [DeliveryError("flaky", retry_after=0.02)]
    fakes[1].script["m3"] = [DeliveryError("flaky", retry_after=0.02)]
    try:
        items = []
        for n in range(20):
            box = boxes[n % 2]
            items += await box.enqueue(conversation, drafts(f"m{n}"))
            boxes[1 - n % 2].kick(conversation.id)  # both race for every item
        done = await settled(store, *items)
    finally:
        for box in boxes:
            await box.stop()
    assert [i.delivery.status for i in done] == [DeliveryStatus.DELIVERED] * 20
    assert log == [f"m{n}" for n in range(20)]  # each once, in order
    assert sum(len(f.attempts) for f in fakes) in (21, 22)  # plus m3's failure(s)
