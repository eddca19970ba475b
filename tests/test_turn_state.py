"""The turn state: what a conversation's turns change, in its own small document.

A turn commits to ``turn_state`` (bot memory, processed mark, lease), not to the
conversation; the turn state's copy of the owner keeps a claim and a bot turn exclusive.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from gateway.model import OwnerState, utcnow
from gateway.store import Store
from gateway.store.mongo import FREE, TURN_STATE_MOVED
from gateway.store.turn_records import current as current_turn_state
from gateway.store.writer import HINT_EVERY, item_id
from tests.conftest import processed
from tests.test_pipeline import EchoBot, Rig, bot_replies, build, message, settle


async def started(store: Store, bot: EchoBot) -> Rig:
    rig = build(store, bot)
    rig.outbox.start()
    return rig


async def stopped(rig: Rig) -> None:
    await rig.pipeline.stop()
    await rig.outbox.stop()


async def test_a_claim_while_the_bot_thinks_wins_and_the_bot_says_nothing(store: Store) -> None:
    rig = await started(store, EchoBot(delay=0.5))
    try:
        first = await rig.pipeline.ingest(message("m1", "hello"))
        cid = first.conversation.id
        while not rig.bot.busy:  # the bot is thinking about "hello"
            await asyncio.sleep(0.01)
        # an agent's claim (queue -> agent goes through the same copy) lands first
        assert await store.transition(cid, {OwnerState.BOT}, OwnerState.QUEUED)
        await settle(store, rig.pipeline)
    finally:
        await stopped(rig)
    assert rig.bot.seen == ["hello"]
    assert await bot_replies(store, cid) == []  # the turn's commit lost: nothing said
    assert rig.connector.sent == []
    assert await processed(store, first.item.id)  # and the message is not lost
    state = await current_turn_state(store, cid)
    assert state is not None and state.owner is OwnerState.QUEUED
    assert state.bot_state == {}  # the lost turn's memory was not written either


async def test_bot_turns_leave_the_conversation_document_alone(store: Store) -> None:
    rig = await started(store, EchoBot())
    try:
        first = await rig.pipeline.ingest(message("m1", "one"))
        await settle(store, rig.pipeline)
        cid = first.conversation.id
        before = await store.conversations.find_one({"_id": cid})
        assert before is not None and before["last_activity_at"] is not None
        for n in range(2, 5):
            await rig.pipeline.ingest(message(f"m{n}", f"turn {n}"))
            await settle(store, rig.pipeline)
        after = await store.conversations.find_one({"_id": cid})
        # within ACTIVITY_EVERY: the conversation is not rewritten by the turns ...
        assert after == before
        state = await current_turn_state(store, cid)
        assert state is not None and state.bot_state == {"turns": 4}  # ... their state is
        assert state.processed_seq == await store.top_seq(cid) - 1  # the last reply above

        # an old last activity is brought forward by the next turn
        old = utcnow() - timedelta(minutes=5)
        await store.conversations.update_one({"_id": cid}, {"$set": {"last_activity_at": old}})
        rig.pipeline._held.clear()  # (as after a restart: read the conversation again)
        await rig.pipeline.ingest(message("m5", "later"))
        await settle(store, rig.pipeline)
        latest = await store.get_conversation(cid)
        assert latest is not None and latest.last_activity_at is not None
        assert latest.last_activity_at > old + timedelta(minutes=4)
    finally:
        await stopped(rig)
    assert rig.connector.sent == ["echo: one", "echo: turn 2", "echo: turn 3", "echo: turn 4",
                                  "echo: later"]


async def test_a_conversation_whose_turn_state_was_lost_is_answered(store: Store) -> None:
    rig = await started(store, EchoBot())
    try:
        conversation = await rig.pipeline.open_conversation("test", "chat-1", "cust-1")
        # its creator died between writing the conversation and its turn state
        await store.turn_state.delete_one({"_id": conversation.id})
        item, _ = await store.append_inbound(conversation, message("m1", "anyone?"))
        assert await rig.pipeline.sweep_once(timedelta(0)) == 1  # the sweeper finds it
        await settle(store, rig.pipeline)
        assert await processed(store, item.id)
        assert rig.connector.sent == ["echo: anyone?"]

        # an owner change on a conversation without turn state writes one, with the copy
        other = await rig.pipeline.open_conversation("test", "chat-2", "cust-1")
        await store.turn_state.delete_one({"_id": other.id})
        assert await store.transition(other.id, {OwnerState.BOT}, OwnerState.QUEUED)
        state = await current_turn_state(store, other.id)
        assert state is not None and state.owner is OwnerState.QUEUED
        assert state.processed_seq == 0 and state.lease is not None
        await rig.pipeline.ingest(message("m2", "still here", thread="chat-2"))
        await settle(store, rig.pipeline)
    finally:
        await stopped(rig)
    assert rig.bot.seen == ["anyone?"]  # a human owns the second: the bot stays silent
    assert await processed(store, item_id("in:test:m2"))


async def test_conversations_from_before_the_turn_state_are_moved_at_start(
    store: Store,
) -> None:
    now = utcnow()
    identity = await store.resolve_identity("test", "cust-1")
    # a store written before 2026-12-04 (the fixture's start-up marked this one done) ...
    await store.channel_state.delete_one({"_id": ":".join(TURN_STATE_MOVED)})
    # ... with a conversation as stored then, with a message its turn did not reach
    await store.conversations.insert_one({
        "_id": "old1", "channel": "test", "thread_key": "chat-1",
        "contact_id": identity.contact_id, "owner": "bot", "assignee_id": None,
        "handoff": None, "bot_state": {"turns": 3}, "seq": 6, "processed_seq": 6,
        "delivered_seq": 5, "created_at": now, "updated_at": now, "last_activity_at": now,
        "lease": {"owner": None, "until": FREE}})
    await store.ensure_indexes()
    await store.ensure_indexes()  # again (another process starting): nothing twice
    conversation = await store.get_conversation("old1")  # loads: the old fields are gone
    assert conversation is not None and conversation.owner is OwnerState.BOT
    state = await current_turn_state(store, "old1")
    assert state is not None
    assert (state.bot_state, state.processed_seq, state.delivered_seq) == ({"turns": 3}, 6, 5)
    rig = await started(store, EchoBot())
    try:
        await rig.pipeline.ingest(message("m7", "back again"))
        await settle(store, rig.pipeline)
    finally:
        await stopped(rig)
    state = await current_turn_state(store, "old1")
    assert state is not None and state.bot_state == {"turns": 4}  # the memory went on
    assert rig.connector.sent == ["echo: back again"]


async def test_the_conversations_seq_hint_keeps_up_without_turns(store: Store) -> None:
    identity = await store.resolve_identity("test", "cust-1")
    conversation = await store.resolve_conversation("test", "chat-1", identity.contact_id)
    count = 3 * HINT_EVERY + 5
    for n in range(count):  # inbound only (plain inserts, no update of the conversation)
        await store.append_inbound(conversation, message(f"m{n}"))
    doc = await store.conversations.find_one({"_id": conversation.id}, {"seq": 1})
    assert doc is not None
    assert count - HINT_EVERY <= int(doc["seq"]) <= count  # a probe reads < HINT_EVERY
    assert await store.top_seq(conversation.id) == count
