"""Search: conversations by the words of their messages and by filters, contacts by name,
email, phone or account; on the embedded store (no ``$text``), through the real agent API.

Messages are ingested through the pipeline (as every connector does), the indexer
(gateway/search.py) writes their words in the background, and the API finds them.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from gateway.keys import AGENTS, INDEXER, PIPELINE, ROUTING
from gateway.model import AgentRole, InboundMessage, Party, Role, utcnow
from gateway.store import Store
from gateway.store.search import SearchTerms, query_terms, terms
from tests.conftest import Gateway, unprocessed
from tests.test_identity import call


def test_terms_are_folded_and_emails_and_phones_kept_whole() -> None:
    found = terms("Müller's ORDER #10045 — mail ADA@Customer.test, call +49 30 1234-567!")
    assert found[:2] == ["ada@customer.test", "4930 1234567".replace(" ", "")]
    assert {"muller", "order", "10045", "ada", "customer", "test", "call"} <= set(found)
    assert "s" not in found  # one letter: not a term
    assert terms("Café") == terms("CAFE") == ["cafe"]
    assert query_terms("where is my ord") == (["where", "is", "my", "ord"], "ord")
    assert query_terms("refund 10045") == (["refund", "10045"], None)  # digits: whole
    assert query_terms("  !!  ") == ([], None)


def message(who: str, text: str, *, channel: str = "webchat", n: int = 1,
            name: str | None = None, **data: Any) -> InboundMessage:
    return InboundMessage(
        channel=channel, external_id=f"{who}:{n}:{text[:8]}", thread_key=who,
        sender=Party(role=Role.CUSTOMER, id=who, name=name), sender_external_id=who,
        text=text, channel_data=data)


async def search(gw: Gateway, auth: dict[str, str], **query: str) -> dict[str, Any]:
    status, body = await call(gw, "GET", "/search/conversations", auth, params=query)
    assert status == 200, body
    return body


async def found(gw: Gateway, auth: dict[str, str], **query: str) -> list[str]:
    return [h["conversation"]["id"] for h in (await search(gw, auth, **query))["items"]]


async def processed(gw: Gateway) -> None:
    """Every message processed (the outbox may hold replies for channels without a
    connector here: telegram, email)."""
    for _ in range(200):
        if not await unprocessed(gw.store) and not gw.app[PIPELINE].busy():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the messages were not processed")


async def indexed(gw: Gateway, n: int) -> None:
    """Wait until the indexer has written at least ``n`` messages' words."""
    terms_coll = SearchTerms(gw.store).coll
    for _ in range(200):
        if await terms_coll.count_documents({}) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the indexer did not index the messages")


async def test_words_filters_teams_and_edits(gateway: Gateway) -> None:
    gw = gateway
    ingest = gw.app[PIPELINE].ingest
    agents = gw.app[AGENTS]
    tokens: dict[str, dict[str, str]] = {}
    for name, role, teams in [("Ann", AgentRole.AGENT, ["billing"]),
                              ("Sam", AgentRole.AGENT, ["sales"]),
                              ("Ada", AgentRole.ADMIN, []),
                              ("Dee", AgentRole.DESIGNER, [])]:
        _, token = await agents.add(name, role=role, teams=teams)
        tokens[name] = {"Authorization": f"Bearer {token}"}
    ann, sam, ada = tokens["Ann"], tokens["Sam"], tokens["Ada"]

    refund = await ingest(message("v_jo", "My parcel arrived broken, I want a refund",
                                  name="Jo Müller"))
    other = await ingest(message("v_bo", "Where is my parcel? Order 10045", name="Bo"))
    tg = await ingest(message("77", "Bonjour, la facture est fausse", channel="telegram",
                              name="Zoé", username="zoe_b"))
    await processed(gw)
    assert await gw.app[ROUTING].handoff(refund.conversation.id, "refund", team="billing")
    await indexed(gw, 3)

    # one word, two words in one message, a prefix, accents and case
    assert await found(gw, ada, q="parcel") == [other.conversation.id, refund.conversation.id]
    assert await found(gw, ada, q="parcel broken") == [refund.conversation.id]
    assert await found(gw, ada, q="broken 10045") == []  # not in one message
    assert await found(gw, ada, q="PARCEL arr") == [refund.conversation.id]
    assert await found(gw, ada, q="FACTURE") == [tg.conversation.id]
    # the customer's name and handle as they wrote them
    assert await found(gw, ada, q="muller") == [refund.conversation.id]
    assert await found(gw, ada, q="zoe_b") == [tg.conversation.id]
    hit = (await search(gw, ada, q="10045"))["items"][0]
    assert hit["message"]["text"] == "Where is my parcel? Order 10045"
    assert hit["conversation"]["contact"]["name"] == "Bo"

    # filters, with and without words
    assert await found(gw, ada, q="parcel", owner="queued") == [refund.conversation.id]
    assert await found(gw, ada, channel="telegram") == [tg.conversation.id]
    assert await found(gw, ada, q="parcel", team="billing") == [refund.conversation.id]
    assert await found(gw, ada, contact="müller") == [refund.conversation.id]
    assert await found(gw, ada, contact="zoe_b") == []  # a handle is no account here
    assert set(await found(gw, ada, since=(utcnow() - timedelta(hours=1)).isoformat())) == {
        refund.conversation.id, other.conversation.id, tg.conversation.id}
    assert await found(gw, ada, q="parcel", until=(utcnow() - timedelta(hours=1)).isoformat()
                       ) == []

    # only what the agent may read: a team's conversation is not found by another team
    assert await found(gw, ann, q="parcel") == [other.conversation.id, refund.conversation.id]
    assert await found(gw, sam, q="parcel") == [other.conversation.id]
    status, _ = await call(gw, "GET", "/search/conversations", tokens["Dee"],
                           params={"q": "parcel"})
    assert status == 403  # a designer works on flows, not conversations

    # an edited message is found by its words now, not by the old ones
    edited = await gw.store.edit_inbound("webchat", "v_bo:1:Where is", "Where is my sofa?")
    assert edited is not None
    assert await found(gw, ada, q="sofa") == [other.conversation.id]
    assert await found(gw, ada, q="10045") == []

    # bad input: a clear 400
    for params in ({"limit": "0"}, {"owner": "sleeping"}, {"since": "soon"}):
        status, body = await call(gw, "GET", "/search/conversations", ada, params=params)
        assert status == 400 and body["error"] == "bad_request", (params, body)
    assert (await search(gw, ada, q="!! a"))["items"] == []  # no word that can be found


async def test_contacts_by_name_email_phone_or_account(gateway: Gateway) -> None:
    gw = gateway
    ingest = gw.app[PIPELINE].ingest
    _, ada = await gw.agent("Ada")
    jo = await ingest(message("v_jo", "hi", name="Jo Müller"))
    mail = await ingest(message("jo.m@example.org", "hello", channel="email",
                                name="Jo M"))
    phone = await ingest(message("491701234567", "hey", channel="telegram", name="Kim"))
    await processed(gw)
    await gw.store.update_profile(jo.conversation.contact_id, {"phone": "+33 6 12 34 56 78"})

    async def contacts(q: str) -> list[str]:
        status, body = await call(gw, "GET", "/search/contacts", ada, params={"q": q})
        assert status == 200, body
        return [c["id"] for c in body["items"]]

    assert await contacts("müller") == [jo.conversation.contact_id]
    assert await contacts("JO.M@EXAMPLE") == [mail.conversation.contact_id]
    assert await contacts("+49 170 1234567") == [phone.conversation.contact_id]  # digits
    assert await contacts("6 12 34 56") == [jo.conversation.contact_id]  # in the profile
    assert set(await contacts("jo")) == {jo.conversation.contact_id,
                                         mail.conversation.contact_id}
    status, body = await call(gw, "GET", "/search/contacts", ada, params={"q": " "})
    assert status == 200 and {c["id"] for c in body["items"]} == {  # without q: all, newest
        jo.conversation.contact_id, mail.conversation.contact_id, phone.conversation.contact_id}


async def test_what_was_stored_while_no_indexer_ran_is_caught_up(gateway: Gateway) -> None:
    gw = gateway
    indexer = gw.app[INDEXER]
    await indexer.stop()  # as if the indexing process had died
    ingest = gw.app[PIPELINE].ingest
    _, ada = await gw.agent("Ada")
    missed = await ingest(message("v_lost", "the umbrella I ordered is missing"))
    await processed(gw)
    assert await found(gw, ada, q="umbrella") == []
    assert await indexer.catch_up() >= 1  # on the next start (or lease take-over)
    assert await found(gw, ada, q="umbrella") == [missed.conversation.id]
    assert await indexer.catch_up() == 0  # nothing twice


async def test_newest_first_across_years_and_common_words(store: Store) -> None:
    """The walk back in windows of hours: a common word returns its newest matches,
    a rare one is found years back, every word must be in one message, a prefix is
    checked on the words, and since/until bound the time."""
    terms_store = SearchTerms(store)
    await terms_store.ensure_indexes()
    now = utcnow()
    docs = []
    for n in range(300):  # "order" in every one, an hour apart, newest n=0
        docs.append({"_id": f"m{n}", "type": "message", "conversation_id": f"c{n}",
                     "created_at": now - timedelta(hours=n), "text": f"order number {n}",
                     "sender": {"role": "customer"}})
    docs.append({"_id": "old", "type": "message", "conversation_id": "c_old",
                 "created_at": now - timedelta(days=5 * 365), "text": "my zeppelin order",
                 "sender": {"role": "customer"}})
    assert await terms_store.add(docs) == 301
    assert await terms_store.add(docs[:5]) == 0  # known: nothing twice

    hits = await terms_store.find(["order"], None, limit=5)
    assert hits.conversations == [(f"c{n}", f"m{n}") for n in range(5)]
    hits = await terms_store.find(["zeppelin"], None, limit=5)
    assert hits.conversations == [("c_old", "old")]
    hits = await terms_store.find(["zeppelin", "order"], None, limit=5)
    assert hits.conversations == [("c_old", "old")]
    hits = await terms_store.find(["number", "zeppelin"], None, limit=5)
    assert hits.conversations == []  # never in one message
    hits = await terms_store.find(["order", "zep"], "zep", limit=5)
    assert hits.conversations == [("c_old", "old")]
    hits = await terms_store.find(["zepp"], "zepp", limit=5)  # no word: the words it begins
    assert hits.conversations == [("c_old", "old")]
    hits = await terms_store.find(["order"], None, limit=3, since=now - timedelta(hours=250),
                                  until=now - timedelta(hours=100, minutes=30))
    assert hits.conversations == [(f"c{n}", f"m{n}") for n in (101, 102, 103)]
