"""The contact timeline: every conversation on every channel, merged contacts included
(and excluded again after an undo), paged back with an exact cursor — against the real
store, and through the agent API on a real gateway."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.model import Conversation, InboundMessage, OutboundDraft, Party, Role
from gateway.store import NotFound, Store
from gateway.store.contacts import ContactStore
from gateway.timeline import BadCursor, Timeline, add_source, encode_cursor
from tests.conftest import Gateway, Visitor
from tests.test_identity import call

BOT = Party(role=Role.BOT, name="Bot")


async def conversation(store: Store, channel: str, who: str) -> Conversation:
    identity = await store.resolve_identity(channel, who)
    return await store.resolve_conversation(channel, who, identity.contact_id)


async def say(store: Store, conv: Conversation, text: str) -> str:
    item, _ = await store.append_inbound(conv, InboundMessage(
        channel=conv.channel, external_id=f"{conv.id}:{text}", thread_key=conv.thread_key,
        sender=Party(role=Role.CUSTOMER, id=conv.thread_key),
        sender_external_id=conv.thread_key, text=text))
    return item.id


async def answer(store: Store, conv: Conversation, text: str) -> str:
    item, _ = await store.append_outbound(conv, OutboundDraft(sender=BOT, text=text))
    return item.id


async def every_page(timeline: Timeline, contact_id: str, limit: int,
                     between: Any = None) -> list[list[Any]]:
    pages, cursor = [], None
    while True:
        page = await timeline.page(contact_id, cursor, limit)
        pages.append(page.items)
        assert len(page.items) <= limit
        if not page.has_more:
            assert page.next_cursor is None
            return pages
        assert len(page.items) == limit and page.next_cursor
        cursor = page.next_cursor
        if between is not None:
            await between()


async def test_two_channels_and_a_merge_then_undo(store: Store) -> None:
    web = await conversation(store, "webchat", "v1")
    tg = await conversation(store, "telegram", "9")
    said: list[tuple[str, str]] = []  # (id, channel), oldest first
    for n in range(4):
        said.append((await say(store, web, f"web {n}"), "webchat"))
        said.append((await say(store, tg, f"tg {n}"), "telegram"))
        said.append((await answer(store, tg, f"tg answer {n}"), "telegram"))
    timeline = Timeline(store)
    before = await timeline.page(web.contact_id, limit=200)
    assert {i.channel for i in before.items} == {"webchat"} and len(before.items) == 4

    record = await ContactStore(store).merge(web.contact_id, tg.contact_id, "agent-1")
    merged = await timeline.page(web.contact_id, limit=200)
    assert [(i.id, i.channel) for i in merged.items] == list(reversed(said))
    assert not merged.has_more and merged.contact_id == web.contact_id
    # asking for the merged contact shows the survivor's timeline
    assert (await timeline.page(tg.contact_id, limit=200)).contact_id == web.contact_id
    # small pages: the same list, nothing twice, nothing skipped
    pages = await every_page(timeline, web.contact_id, 5)
    assert [i.id for p in pages for i in p] == [i for i, _ in reversed(said)]

    await ContactStore(store).undo(record.id, "agent-1")
    after = await timeline.page(web.contact_id, limit=200)
    assert [i.id for i in after.items] == [i for i, c in reversed(said) if c == "webchat"]
    theirs = await timeline.page(tg.contact_id, limit=200)
    assert theirs.contact_id == tg.contact_id
    assert [i.id for i in theirs.items] == [i for i, c in reversed(said) if c == "telegram"]


async def test_a_link_that_moved_conversations_shows_their_history(store: Store) -> None:
    web = await conversation(store, "webchat", "v2")
    tg = await conversation(store, "telegram", "77")
    old = await say(store, tg, "before the link")
    await store.link_identity("telegram", "77", web.contact_id)  # what a deep link does
    assert (await timeline_ids(store, web.contact_id)) == []  # not recorded: not shown
    await add_source(store, web.contact_id, tg.contact_id)  # Identity.redeem records it
    new = await say(store, tg, "after the link")
    assert await timeline_ids(store, web.contact_id) == [new, old]
    # the old contact keeps nothing of it: its conversations moved
    assert await timeline_ids(store, tg.contact_id) == []


async def timeline_ids(store: Store, contact_id: str) -> list[str]:
    return [i.id for i in (await Timeline(store).page(contact_id, limit=200)).items]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_paging_is_exact_under_concurrent_appends(store: Store, seed: int) -> None:
    """Property-style: random items over three contacts (two merged into the first),
    random page sizes, new items appended between pages: the pages hold exactly the items
    that existed at the first page, each once, newest first within each source."""
    rng = random.Random(seed)
    convs = [await conversation(store, ch, f"p{seed}-{n}")
             for n, ch in enumerate(["webchat", "telegram", "email", "webchat"])]
    # conversations 0 and 3 are one contact's (two web chat threads of one visitor)
    convs[3] = await store.resolve_conversation("webchat", f"p{seed}-3b", convs[0].contact_id)
    count = rng.randint(40, 90)
    for n in range(count):
        conv = rng.choice(convs)
        await (say if rng.random() < 0.6 else answer)(store, conv, f"item {n}")
    me = convs[0].contact_id
    await ContactStore(store).merge(me, convs[1].contact_id)
    await ContactStore(store).merge(me, convs[2].contact_id)
    snapshot = {d["_id"] async for d in store.messages.find({}, {"_id": 1})}
    extra = 0

    async def append_more() -> None:
        nonlocal extra
        for _ in range(rng.randint(0, 3)):
            extra += 1
            await say(store, rng.choice(convs), f"late {extra}")

    limit = rng.randint(1, 12)
    pages = await every_page(Timeline(store), me, limit, append_more)
    ids = [i.id for p in pages for i in p]
    assert len(ids) == len(set(ids)), "an item came twice"
    assert set(ids) == snapshot, "items skipped, or appended later ones shown"
    assert extra > 0 or limit >= count
    items = [i for p in pages for i in p]
    for source in {i.contact_id for i in items}:
        seqs = [i.contact_seq for i in items if i.contact_id == source]
        assert seqs == sorted(seqs, reverse=True)
    # a fresh read shows the late ones too, on top
    fresh = [i.id for p in await every_page(Timeline(store), me, 200) for i in p]
    assert len(fresh) == count + extra and set(fresh) > snapshot


async def test_bad_cursors_and_unknown_contacts(store: Store) -> None:
    conv = await conversation(store, "webchat", "v3")
    await say(store, conv, "hi")
    timeline = Timeline(store)
    for bad in ["x", "!!!", encode_cursor({"a": 0}), "eyJ2IjoyfQ", "a" * 9000]:
        with pytest.raises(BadCursor):
            await timeline.page(conv.contact_id, bad)
    with pytest.raises(NotFound):
        await timeline.page("missing")


async def test_timeline_api_pages_with_a_cursor(gateway: Gateway, visitor: Visitor) -> None:
    _, alice = await gateway.agent("Alice")
    await visitor.connect()
    for text in ("hello", "opening hours", "shipping costs"):
        await visitor.say(text)
        await gateway.settle()
    [doc] = await gateway.store.conversations.find({}).to_list()
    conv = await gateway.store.get_conversation(str(doc["_id"]))
    assert conv is not None
    path = f"/contacts/{conv.contact_id}/timeline"
    status, whole = await call(gateway, "GET", path + "?limit=200", alice)
    assert status == 200 and whole["has_more"] is False and whole["next_cursor"] is None
    assert len(whole["items"]) == await gateway.store.top_seq(conv.id)
    assert whole["contact_id"] == conv.contact_id
    paged, query = [], "?limit=2"
    while True:
        status, page = await call(gateway, "GET", path + query, alice)
        assert status == 200
        paged += [i["id"] for i in page["items"]]
        if not page["has_more"]:
            break
        query = f"?limit=2&cursor={page['next_cursor']}"
    assert paged == [i["id"] for i in whole["items"]]
    status, error = await call(gateway, "GET", path + "?cursor=nonsense", alice)
    assert status == 400 and "cursor" in error["message"]
