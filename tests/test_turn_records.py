"""Turn records: a bot turn that answers writes its replies and nothing else.

The turn's record (the item it answered, the bot's memory after it) rides on its first
reply; the turn state is a checkpoint written later. The writer's fence keeps such a
commit from landing after an owner change (or another process's turn) it did not see.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from pymongo import monitoring

from connectors.base import IngestResult
from gateway.model import (
    ActivityType,
    Conversation,
    DeliveryStatus,
    OutboundDraft,
    OwnerState,
    Party,
    Role,
    utcnow,
)
from gateway.store import Store
from gateway.store.items import delivery, inbound_doc, outbound_doc
from gateway.store.mongo import FREE
from gateway.store.turn_records import current
from gateway.store.writer import Precondition
from tests.test_pipeline import EchoBot, Rig, build, message, settle
from tests.test_turn_state import started, stopped


async def open_conversation(store: Store, thread: str = "chat-1") -> Conversation:
    identity = await store.resolve_identity("test", "cust-1")
    return await store.resolve_conversation("test", thread, identity.contact_id)


def reply(conversation: Conversation, text: str) -> dict[str, Any]:
    now = utcnow()
    return outbound_doc(conversation, OutboundDraft(sender=Party(role=Role.BOT), text=text),
                        now, delivery(DeliveryStatus.STORED, now))


def event(conversation: Conversation, name: str) -> dict[str, Any]:
    now = utcnow()
    return outbound_doc(conversation, OutboundDraft(
        type=ActivityType.EVENT, sender=Party(role=Role.SYSTEM), name=name, text=name),
        now, delivery(DeliveryStatus.SKIPPED, now))


async def texts(store: Store, conversation_id: str) -> list[str]:
    return [d.get("text") or "" async for d in store.messages.find(
        {"conversation_id": conversation_id}).sort("seq", 1)]


async def test_a_fenced_unit_passes_customers_messages_and_stops_at_anything_else(
    store: Store,
) -> None:
    conversation = await open_conversation(store)
    await store.append_inbound(conversation, message("m1", "hello"))
    fence = await store.writer.known_top(conversation.id)
    # the customer writes again: a bot reply decided on "hello" still goes
    await store.append_inbound(conversation, message("m2", "are you there?"))
    await store.append(conversation.id, [reply(conversation, "hi")], fence=fence)
    fence = await store.writer.known_top(conversation.id)
    # an event (an owner change, an agent's message...) after the fence: not written
    await store.append(conversation.id, [event(conversation, "assigned")])
    with pytest.raises(Precondition):
        await store.append(conversation.id, [reply(conversation, "too late")], fence=fence)
    assert await texts(store, conversation.id) == [
        "hello", "are you there?", "hi", "assigned"]
    # decided after it: written
    fence = await store.writer.known_top(conversation.id)
    await store.append(conversation.id, [reply(conversation, "in time")], fence=fence)
    assert (await texts(store, conversation.id))[-1] == "in time"


async def test_a_fence_holds_against_what_another_process_appended(
    store: Store, mongo_uri: str, db_name: str,
) -> None:
    """The other process's item is not known here until the insert meets it on the seq
    index: the writer reads what it missed, and only then decides."""
    other = Store.connect(mongo_uri, db_name)
    try:
        conversation = await open_conversation(store)
        await store.append_inbound(conversation, message("m1", "hello"))
        fence = await store.writer.known_top(conversation.id)
        await other.append(conversation.id, [inbound_doc(message("m2", "again"), utcnow())])
        await store.append(conversation.id, [reply(conversation, "hi")], fence=fence)
        fence = await store.writer.known_top(conversation.id)
        await other.append(conversation.id, [event(conversation, "assigned")])
        with pytest.raises(Precondition):
            await store.append(conversation.id, [reply(conversation, "too late")],
                               fence=fence)
        assert await texts(store, conversation.id) == ["hello", "again", "hi", "assigned"]
        # not cached (another process, a restart): what is below the hint is not read,
        # so a fence below it is refused too; one at the top read now passes
        store.writer.forget(conversation.id)
        await store.conversations.update_one({"_id": conversation.id},
                                             {"$set": {"seq": 4}})
        with pytest.raises(Precondition):
            await store.append(conversation.id, [reply(conversation, "stale")], fence=3)
        fence = await store.writer.known_top(conversation.id)
        await store.append(conversation.id, [reply(conversation, "fresh")], fence=fence)
        assert (await texts(store, conversation.id))[-1] == "fresh"
    finally:
        await other.close()


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        target = event.command.get(event.command_name)
        self.seen[(event.command_name, target if isinstance(target, str) else "")] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_turn_that_answers_writes_its_reply_and_nothing_else(
    store: Store, mongo_uri: str, db_name: str,
) -> None:
    commands = Commands()
    own = Store.connect(mongo_uri, db_name, event_listeners=[commands])
    rig = build(own, EchoBot())  # (network channel "test": its delivery is recorded)
    rig.outbox.start()
    try:
        await rig.pipeline.ingest(message("m1", "one"))
        await settle(store, rig.pipeline)
        commands.seen.clear()
        result = await rig.pipeline.ingest(message("m2", "two"))
        await settle(store, rig.pipeline)
        assert rig.connector.sent == ["echo: one", "echo: two"]
        writes = {k: v for k, v in commands.seen.items()
                  if k[0] in ("insert", "update", "commitTransaction")}
        # the message, then the reply with the turn's record, each one insert; the
        # delivery's outcome (a network channel); no turn state, no transaction
        assert writes == {("insert", "messages"): 2, ("update", "messages"): 1}, writes
        state = await current(store, result.conversation.id)
        assert state is not None and state.bot_state == {"turns": 2}
        assert state.processed_seq == result.item.seq
        checkpoint = await store.get_turn_checkpoint(result.conversation.id)
        assert checkpoint is not None and checkpoint.processed_seq < result.item.seq
    finally:
        await rig.pipeline.stop()
        await rig.outbox.stop()
        await own.close()


async def turns(rig: Rig, count: int) -> IngestResult:
    """``count`` bot turns, one after the other; the last message's result."""
    for n in range(count):
        result = await rig.pipeline.ingest(message(f"m{n}", f"turn {n}"))
        await settle(rig.store, rig.pipeline)
    return result


async def test_the_checkpoint_catches_up_when_the_conversation_is_idle(store: Store) -> None:
    rig = await started(store, EchoBot())
    try:
        result = await turns(rig, 3)
        cid = result.conversation.id
        lagging = await store.get_turn_checkpoint(cid)
        assert lagging is not None and lagging.bot_state != {"turns": 3}
        rig.pipeline._checkpoint_idle()  # not idle long enough yet: nothing
        assert not rig.pipeline.busy()
        rig.pipeline._held[cid].active_at = time.monotonic() - 60
        rig.pipeline._checkpoint_idle()
        await settle(store, rig.pipeline)
        checkpoint = await store.get_turn_checkpoint(cid)
        assert checkpoint is not None and checkpoint.bot_state == {"turns": 3}
        assert checkpoint.processed_seq == result.item.seq
        assert await current(store, cid) == checkpoint
    finally:
        await stopped(rig)


async def test_a_restart_goes_on_from_the_records(store: Store) -> None:
    """A process that stops without writing its checkpoint (killed): the next one reads
    the bot's memory and what is answered from the records."""
    first = await started(store, EchoBot())
    cid = (await turns(first, 3)).conversation.id
    first.pipeline._held.clear()  # killed: nothing written on the way out
    await first.outbox.stop()
    await store.turn_state.update_one({"_id": cid},
                                      {"$set": {"lease": {"owner": None, "until": FREE}}})
    second = await started(store, EchoBot())
    try:
        # every message of the last hour looked at: nothing left unanswered
        assert await second.pipeline.sweep_once(timedelta(0)) == 0
        await second.pipeline.ingest(message("m3", "after the restart"))
        await settle(store, second.pipeline)
        state = await current(store, cid)
        assert state is not None and state.bot_state == {"turns": 4}
        assert second.bot.seen == ["after the restart"]
    finally:
        await stopped(second)


async def test_a_cleared_memory_outranks_the_records_before_it(store: Store) -> None:
    rig = await started(store, EchoBot())
    try:
        cid = (await turns(rig, 2)).conversation.id
        assert (await current(store, cid)).bot_state == {"turns": 2}  # type: ignore[union-attr]
        # the bot resolves (its memory is cleared: a new epoch); the records stay
        assert await rig.routing.bot_resolve(cid, "resolve-1")
        state = await current(store, cid)
        assert state is not None and state.bot_state == {} and state.epoch == 1
        assert state.owner is OwnerState.RESOLVED
        await rig.pipeline.ingest(message("m2", "one more thing"))  # reopens it
        await settle(store, rig.pipeline)
        state = await current(store, cid)
        assert state is not None and state.bot_state == {"turns": 1}
    finally:
        await stopped(rig)


async def test_a_claim_in_another_process_while_the_bot_thinks_wins(
    store: Store, mongo_uri: str, db_name: str,
) -> None:
    """The claim's event is appended by another process's writer: this one learns of it
    only when its reply meets it on the seq index, and then stores nothing."""
    other = Store.connect(mongo_uri, db_name)
    rig = await started(store, EchoBot(delay=0.5))
    try:
        await rig.pipeline.ingest(message("m0", "first"))  # a turn before: tops cached
        await settle(store, rig.pipeline)
        rig.bot.delay = 0.5
        result = await rig.pipeline.ingest(message("m1", "hello"))
        cid = result.conversation.id
        while not rig.bot.busy:  # the bot is thinking about "hello"
            await asyncio.sleep(0.01)
        assert await other.transition(cid, {OwnerState.BOT}, OwnerState.QUEUED)
        await settle(store, rig.pipeline)
    finally:
        await stopped(rig)
        await other.close()
    assert rig.bot.seen == ["first", "hello"]
    assert await texts(store, cid) == ["first", "echo: first", "hello", "queued"]
    assert rig.connector.sent == ["echo: first"]
    state = await current(store, cid)
    assert state is not None and state.owner is OwnerState.QUEUED
    assert state.processed_seq == result.item.seq  # the message is not lost
