"""The conversation store on a real MongoDB-compatible server: dedupe, sequences, ownership."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from pymongo.errors import DuplicateKeyError

from gateway.model import (
    Direction,
    Identity,
    InboundMessage,
    OutboundDraft,
    OwnerState,
    Party,
    Role,
    utcnow,
)
from gateway.store import NotFound, Store, StoreError
from gateway.store.mongo import to_doc
from gateway.store.turn_records import current as current_turn_state
from tests.conftest import processed

CUSTOMER = Party(role=Role.CUSTOMER, id="u1")
BOT = Party(role=Role.BOT, name="Bot")


def inbound(external_id: str, *, channel: str = "webchat", thread: str = "t1",
            sender: str = "u1", text: str = "hi") -> InboundMessage:
    return InboundMessage(channel=channel, external_id=external_id, thread_key=thread,
                          sender=Party(role=Role.CUSTOMER, id=sender),
                          sender_external_id=sender, text=text)


def outbound(text: str, dedupe_key: str | None = None) -> OutboundDraft:
    return OutboundDraft(sender=BOT, text=text, dedupe_key=dedupe_key)


async def open_conversation(store: Store, channel: str = "webchat", thread: str = "t1",
                            sender: str = "u1"):
    identity = await store.resolve_identity(channel, sender)
    return await store.resolve_conversation(channel, thread, identity.contact_id)


async def all_items(store: Store, conversation_id: str):
    cursor = store.messages.find({"conversation_id": conversation_id}).sort("seq", 1)
    return await cursor.to_list()


# -------------------------------------------------------------------- contacts


async def test_resolve_identity_is_stable(store: Store) -> None:
    first = await store.resolve_identity("webchat", "v1", "Ann")
    again = await store.resolve_identity("webchat", "v1", "Someone else")
    other = await store.resolve_identity("webchat", "v2")
    assert again.contact_id == first.contact_id
    assert again.id == "webchat:v1" and again.display_name == "Ann"  # first writer decided
    assert other.contact_id != first.contact_id
    contact = await store.get_contact(first.contact_id)
    assert contact is not None and contact.name == "Ann"
    assert [i.id for i in contact.identities] == ["webchat:v1"]
    assert await store.get_contact("no-such-contact") is None


async def test_resolve_identity_concurrently_creates_one_contact(store: Store) -> None:
    results = await asyncio.gather(
        *(store.resolve_identity("telegram", "42", "Bob") for _ in range(20))
    )
    assert len({r.contact_id for r in results}) == 1
    assert await store.identities.count_documents({}) == 1
    assert await store.contacts.count_documents({}) == 1
    contact = await store.get_contact(results[0].contact_id)
    assert contact is not None and [i.external_id for i in contact.identities] == ["42"]


async def test_contact_carries_many_identities(store: Store) -> None:
    web = await store.resolve_identity("webchat", "v1", "Ann")
    # Linking a second channel account to the same person (what a merge will do).
    telegram = Identity(id="telegram:77", channel="telegram", external_id="77",
                        contact_id=web.contact_id, created_at=utcnow())
    await store.identities.insert_one(to_doc(telegram))
    assert (await store.resolve_identity("telegram", "77")).contact_id == web.contact_id
    contact = await store.get_contact(web.contact_id)
    assert contact is not None
    assert sorted(i.id for i in contact.identities) == ["telegram:77", "webchat:v1"]
    assert await store.contacts.count_documents({}) == 1


# --------------------------------------------------------------- conversations


async def test_resolve_conversation_is_idempotent_and_race_free(store: Store) -> None:
    identity = await store.resolve_identity("webchat", "v1")
    first = await store.resolve_conversation("webchat", "thread-1", identity.contact_id)
    assert first.owner is OwnerState.BOT and first.seq == 0
    assert (await store.resolve_conversation("webchat", "thread-1", identity.contact_id)).id \
        == first.id
    racing = await asyncio.gather(
        *(store.resolve_conversation("webchat", "thread-2", identity.contact_id)
          for _ in range(20))
    )
    assert len({c.id for c in racing}) == 1
    assert await store.conversations.count_documents({"thread_key": "thread-2"}) == 1
    found = await store.find_conversation("webchat", "thread-2")
    assert found is not None and found.id == racing[0].id
    assert await store.find_conversation("webchat", "nope") is None


async def test_concurrent_first_contact_resolves_everything_once(store: Store) -> None:
    """Many messages of a new customer arrive at once (upserts race with appends)."""
    for round_ in range(8):
        sender, thread = f"u{round_}", f"t{round_}"

        async def first_contact(n: int, sender: str = sender, thread: str = thread):
            identity = await store.resolve_identity("webchat", sender)
            conversation = await store.resolve_conversation("webchat", thread,
                                                            identity.contact_id)
            item, _ = await store.append_inbound(
                conversation, inbound(f"{thread}:{n}", thread=thread, sender=sender))
            return identity.contact_id, conversation.id, item.seq

        results = await asyncio.gather(*(first_contact(n) for n in range(20)))
        assert len({contact for contact, _, _ in results}) == 1
        assert len({conversation for _, conversation, _ in results}) == 1
        assert sorted(seq for _, _, seq in results) == list(range(1, 21))
    assert await store.contacts.count_documents({}) == 8
    assert await store.conversations.count_documents({}) == 8


async def test_a_lost_upsert_race_reads_the_winner(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is absent when read, then a concurrent caller inserts it first."""
    conversations = store.conversations
    real_find_one, real_update_one = conversations.find_one, conversations.update_one
    reads = 0

    async def find_one(*args, **kwargs):
        nonlocal reads
        reads += 1
        return None if reads == 1 else await real_find_one(*args, **kwargs)

    async def update_one(query, update, upsert=False, **kwargs):
        # the winner inserts between our read and our upsert; our upsert then loses
        await real_update_one(query, update, upsert=True)
        raise DuplicateKeyError("E11000 duplicate key")

    identity = await store.resolve_identity("webchat", "v1")
    monkeypatch.setattr(conversations, "find_one", find_one)
    monkeypatch.setattr(conversations, "update_one", update_one)
    conversation = await store.resolve_conversation("webchat", "t1", identity.contact_id)
    monkeypatch.undo()
    assert await store.conversations.count_documents({"thread_key": "t1"}) == 1
    assert (await store.find_conversation("webchat", "t1")).id == conversation.id


async def test_an_upsert_that_never_shows_a_document_is_an_error(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acknowledged but never readable: a StoreError, not a bogus document or a loop."""

    async def nothing(*args, **kwargs):
        return None

    async def acknowledged(*args, **kwargs):
        class Result:
            upserted_id = None

        return Result()

    monkeypatch.setattr(store.conversations, "find_one", nothing)
    monkeypatch.setattr(store.conversations, "update_one", acknowledged)
    with pytest.raises(StoreError):
        await store.resolve_conversation("webchat", "t2", "c1")


async def test_concurrent_new_identity_leaves_no_orphan_contact(store: Store) -> None:
    identities = await asyncio.gather(*(store.resolve_identity("webchat", "v9")
                                        for _ in range(10)))
    assert len({i.contact_id for i in identities}) == 1
    assert await store.contacts.count_documents({}) == 1


# -------------------------------------------------------------------- messages


async def test_append_inbound_is_idempotent(store: Store) -> None:
    conversation = await open_conversation(store)
    item, duplicate = await store.append_inbound(conversation, inbound("m1"))
    again, duplicate_again = await store.append_inbound(conversation, inbound("m1"))
    assert (duplicate, duplicate_again) == (False, True)
    assert again.id == item.id and again.seq == item.seq == 1
    assert item.direction is Direction.INBOUND
    assert await processed(store, item.id) is False  # its turn is still to run

    racing = await asyncio.gather(
        *(store.append_inbound(conversation, inbound("m2")) for _ in range(10))
    )
    assert sorted(dup for _, dup in racing) == [False] + [True] * 9
    assert len({stored.id for stored, _ in racing}) == 1
    assert await store.messages.count_documents({"external_id": "m2"}) == 1
    # the losers did not burn sequence numbers
    assert [d["seq"] for d in await all_items(store, conversation.id)] == [1, 2]
    assert await store.top_seq(conversation.id) == 2  # (the conversation's seq is a hint)
    # the same external id on another channel is another message
    other = await open_conversation(store, channel="telegram")
    _, dup = await store.append_inbound(other, inbound("m1", channel="telegram"))
    assert dup is False


async def test_reply_to_external_id_is_resolved(store: Store) -> None:
    conversation = await open_conversation(store)
    parent, _ = await store.append_inbound(conversation, inbound("m1"))
    message = inbound("m2").model_copy(update={"reply_to_external_id": "m1"})
    child, _ = await store.append_inbound(conversation, message)
    assert child.reply_to_id == parent.id


async def test_append_to_missing_conversation_fails(store: Store) -> None:
    conversation = await open_conversation(store)
    ghost = conversation.model_copy(update={"id": "missing"})
    with pytest.raises(NotFound):
        await store.append_inbound(ghost, inbound("m1"))
    assert await store.messages.count_documents({}) == 0


async def test_seq_is_contiguous_under_concurrent_appends(store: Store) -> None:
    conversation = await open_conversation(store)
    appends = []
    for n in range(25):
        appends.append(store.append_inbound(conversation, inbound(f"in{n}")))
        appends.append(store.append_outbound(conversation, outbound(f"out{n}")))
    results = await asyncio.gather(*appends)
    assert not any(dup for _, dup in results)
    assert sorted(item.seq for item, _ in results) == list(range(1, 51))
    stored = await all_items(store, conversation.id)
    assert [d["seq"] for d in stored] == list(range(1, 51))
    assert sorted(d["contact_seq"] for d in stored) == list(range(1, 51))
    assert await store.top_seq(conversation.id) == 50


async def test_seq_is_contiguous_across_two_store_clients(
    store: Store, mongo_uri: str, db_name: str
) -> None:
    """Two processes append to one conversation: the transaction serialises them."""
    other = Store.connect(mongo_uri, db_name)
    try:
        conversation = await open_conversation(store)
        results = await asyncio.gather(
            *(s.append_inbound(conversation, inbound(f"m{n}"))
              for n in range(15) for s in (store, other))
        )
    finally:
        await other.close()
    assert Counter(dup for _, dup in results) == {False: 15, True: 15}
    stored = await all_items(store, conversation.id)
    assert [d["seq"] for d in stored] == list(range(1, 16))
    assert len({d["external_id"] for d in stored}) == 15


async def test_contact_seq_spans_conversations(store: Store) -> None:
    identity = await store.resolve_identity("webchat", "u1")
    first = await store.resolve_conversation("webchat", "a", identity.contact_id)
    second = await store.resolve_conversation("webchat", "b", identity.contact_id)
    results = await asyncio.gather(
        *(store.append_inbound(conv, inbound(f"{conv.thread_key}{n}", thread=conv.thread_key))
          for n in range(15) for conv in (first, second))
    )
    assert sorted(item.contact_seq for item, _ in results) == list(range(1, 31))
    for conv in (first, second):
        assert [d["seq"] for d in await all_items(store, conv.id)] == list(range(1, 16))
    assert await store.contact_top(identity.contact_id) == 30


async def test_append_outbound_dedupe_key(store: Store) -> None:
    conversation = await open_conversation(store)
    item, duplicate = await store.append_outbound(conversation, outbound("a", "k1"))
    again, duplicate_again = await store.append_outbound(conversation, outbound("b", "k1"))
    assert (duplicate, duplicate_again) == (False, True)
    assert again.id == item.id and again.text == "a"
    racing = await asyncio.gather(
        *(store.append_outbound(conversation, outbound("c", "k2")) for _ in range(10))
    )
    assert sorted(dup for _, dup in racing) == [False] + [True] * 9
    assert await store.messages.count_documents({"dedupe_key": "k2"}) == 1
    # without a key, every append is a new item
    await store.append_outbound(conversation, outbound("d"))
    await store.append_outbound(conversation, outbound("d"))
    assert [d["seq"] for d in await all_items(store, conversation.id)] == [1, 2, 3, 4]
    assert item.delivery is not None and item.delivery.status.value == "pending"
    assert item.direction is Direction.OUTBOUND


# --------------------------------------------------------------------- history


async def fill(store: Store, conversation, count: int) -> None:
    for n in range(count):
        await store.append_inbound(conversation, inbound(f"{conversation.id}:{n}",
                                                         text=f"#{n + 1}"))


async def test_history_of_an_empty_conversation(store: Store) -> None:
    conversation = await open_conversation(store)
    assert await store.history(conversation.id) == ([], False)
    assert await store.items_after(conversation.id, 0) == []
    with pytest.raises(NotFound):
        await store.history("missing")


@pytest.mark.parametrize(("count", "has_more"), [(1, False), (5, False), (6, True)])
async def test_history_has_more_at_the_edges(store: Store, count: int, has_more: bool) -> None:
    conversation = await open_conversation(store)
    await fill(store, conversation, count)
    items, more = await store.history(conversation.id, limit=5)
    assert [i.seq for i in items] == list(range(count, max(0, count - 5), -1))
    assert more is has_more


async def test_history_pages_newest_first(store: Store) -> None:
    conversation = await open_conversation(store)
    await fill(store, conversation, 12)
    page, more = await store.history(conversation.id, limit=5)
    assert [i.text for i in page] == ["#12", "#11", "#10", "#9", "#8"] and more
    page, more = await store.history(conversation.id, before=page[-1].seq, limit=5)
    assert [i.seq for i in page] == [7, 6, 5, 4, 3] and more
    page, more = await store.history(conversation.id, before=page[-1].seq, limit=5)
    assert [i.seq for i in page] == [2, 1] and not more
    assert await store.history(conversation.id, before=1) == ([], False)


async def test_items_after_is_oldest_first(store: Store) -> None:
    conversation = await open_conversation(store)
    await fill(store, conversation, 8)
    assert [i.seq for i in await store.items_after(conversation.id, 3)] == [4, 5, 6, 7, 8]
    assert [i.seq for i in await store.items_after(conversation.id, 3, limit=2)] == [4, 5]
    assert await store.items_after(conversation.id, 8) == []


async def test_contact_timeline_merges_channels(store: Store) -> None:
    web = await store.resolve_identity("webchat", "v1")
    await store.identities.insert_one(to_doc(Identity(
        id="telegram:9", channel="telegram", external_id="9", contact_id=web.contact_id,
        created_at=utcnow())))
    tg = await store.resolve_identity("telegram", "9")
    web_conv = await store.resolve_conversation("webchat", "v1", web.contact_id)
    tg_conv = await store.resolve_conversation("telegram", "chat-9", tg.contact_id)
    said = []
    for n in range(6):
        conv, channel = (web_conv, "webchat") if n % 2 == 0 else (tg_conv, "telegram")
        await store.append_inbound(conv, inbound(f"x{n}", channel=channel,
                                                 thread=conv.thread_key, text=f"{channel}{n}"))
        said.append(f"{channel}{n}")
    await store.append_outbound(tg_conv, outbound("reply on telegram"))
    said.append("reply on telegram")

    items, more = await store.contact_timeline(web.contact_id, limit=100)
    assert [i.text for i in items] == list(reversed(said)) and not more
    assert {i.channel for i in items} == {"webchat", "telegram"}
    assert [i.contact_seq for i in items] == list(range(7, 0, -1))
    page, more = await store.contact_timeline(web.contact_id, before=5, limit=2)
    assert [i.contact_seq for i in page] == [4, 3] and more
    with pytest.raises(NotFound):
        await store.contact_timeline("missing")


# ------------------------------------------------------------------- ownership


async def test_exactly_one_of_concurrent_claims_wins(store: Store) -> None:
    conversation = await open_conversation(store)
    assert await store.transition(conversation.id, {OwnerState.BOT}, OwnerState.QUEUED)
    results = await asyncio.gather(
        *(store.transition(conversation.id, {OwnerState.QUEUED}, OwnerState.AGENT,
                           also={"assignee_id": f"agent{n}"}) for n in range(10))
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    current = await store.get_conversation(conversation.id)
    assert current is not None and current.owner is OwnerState.AGENT
    assert current.assignee_id == winners[0].assignee_id


async def test_transition_from_the_wrong_state(store: Store) -> None:
    conversation = await open_conversation(store)
    assert await store.transition(conversation.id, {OwnerState.AGENT}, OwnerState.RESOLVED) \
        is None
    assert await store.transition("missing", {OwnerState.BOT}, OwnerState.QUEUED) is None
    # ``where`` narrows it further: only the assignee resolves
    await store.transition(conversation.id, {OwnerState.BOT}, OwnerState.AGENT,
                           also={"assignee_id": "alice"})
    assert await store.transition(conversation.id, {OwnerState.AGENT}, OwnerState.RESOLVED,
                                  where={"assignee_id": "bob"}) is None
    done = await store.transition(conversation.id, {OwnerState.AGENT}, OwnerState.RESOLVED,
                                  where={"assignee_id": "alice"})
    assert done is not None and done.owner is OwnerState.RESOLVED


async def test_bot_state_is_saved_only_while_the_bot_owns(store: Store) -> None:
    conversation = await open_conversation(store)
    assert await store.set_bot_state(conversation.id, {"misses": 1})
    await store.transition(conversation.id, {OwnerState.BOT}, OwnerState.QUEUED)
    assert not await store.set_bot_state(conversation.id, {"misses": 2})
    current = await current_turn_state(store, conversation.id)
    assert current is not None and current.bot_state == {"misses": 1}
    assert current.owner is OwnerState.QUEUED  # the copy, written with the change


# --------------------------------------------------------------------- indexes


async def test_ensure_indexes_is_idempotent(store: Store) -> None:
    await store.ensure_indexes()
    await store.ensure_indexes()
    messages = await store.messages.index_information()
    unique = {name for name, spec in messages.items() if spec.get("unique")}
    assert {"conversation_id_1_seq_1", "contact_id_1_contact_seq_1"} <= unique
    # an item's _id comes from its idempotency key: no index of its own to maintain
    assert "idempotency" not in messages
    # no partial indexes: SecantusDB 0.7 does not use them (they would be scans)
    assert not any("partialFilterExpression" in spec for spec in messages.values())
    conversations = await store.conversations.index_information()
    assert conversations["channel_1_thread_key_1"].get("unique") is True
    agents = await store.agents.index_information()
    assert agents["agent_token"].get("unique") is True
