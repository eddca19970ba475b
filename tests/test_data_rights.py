"""Data rights: export one contact, erase one contact, retention. Real gateway, real store.

Ada talks to us on all four channels in one conversation (web chat, then Telegram, Slack
and email by the links each channel offers), sends a photo and a PDF on each and gets
Alice's files back, writes from a second browser that an agent then merges into her, and
writes in a Slack channel thread that Bob began (and Bob in one she began). Bob is a
customer of his own (Telegram, email, that thread). Then:

- the export (an admin's ZIP) holds every message and file of Ada's, and nothing of Bob;
- the erase leaves nothing of Ada in any collection: every document of every collection
  is scanned for her contact ids, her channel ids, her conversations', messages' and
  files' ids, and the words only she wrote (bytes of files and raw mails included); Bob's
  documents are as they were; the audit entry stays, without content;
- designers and agents get 403 for both.

Retention: a dry run counts and changes nothing; the run deletes only conversations
resolved before the cut-off, keeps their analytics anonymised, and runs under a lease.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import zipfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.data_rights import REDACTED
from gateway.keys import AGENTS, FILES, PIPELINE, ROUTING
from gateway.leases import Leases
from gateway.model import AgentRole, InboundMessage, IncomingFile, Party, Role, utcnow
from gateway.retention import RETENTION, Retention
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.email_link import EmailCodes
from gateway.store.mongo import Doc
from gateway.store.personal import CATALOGUE
from tests import test_any_channel
from tests.conftest import Gateway, Visitor, running_gateway
from tests.fakes.slack_api import FakeSlack, mention, new_ts
from tests.fakes.telegram_api import FakeTelegram, People
from tests.mailservers import MailRig, mail
from tests.test_any_channel import ADA_DM, ADA_MAIL, ADA_SLACK, Customer, begin
from tests.test_any_channel_files import customer_receives, customer_sends, files_for
from tests.test_cli import clean_env, omnigate
from tests.test_identity import TelegramUser, call
from tests.test_search import processed
from tests.test_telegram_files import reply
from tests.test_webchat_files import upload

rig, telegram, slack, sink = (test_any_channel.rig, test_any_channel.telegram,
                              test_any_channel.slack, test_any_channel.sink)

ADA_TG, BOB_TG, BOB_SLACK = 735910482, 648203917, "U0000BOB"
ADA_WORD, BOB_WORD, SECOND_WORD = "quixotrel", "brambleworth", "zenthorpe"
BOB_MAIL = "bob@customer.test"
JOURNEY = ["webchat", "telegram", "slack", "email"]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "data-rights.md"


class Ada(Customer):
    """Ada of tests/test_any_channel.py with a Telegram id no other number in the store
    can be mistaken for."""

    def ann(self) -> TelegramUser:
        return TelegramUser(self.gw, self.telegram, self.people, ADA_TG, "Ada")


# ----------------------------------------------------------------- scanning


def values(doc: Any) -> list[Any]:
    """Every key and leaf value of a document (bytes as they are)."""
    found: list[Any] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.append(str(key))
            found += values(value)
    elif isinstance(doc, list | tuple):
        for value in doc:
            found += values(value)
    else:
        found.append(doc)
    return found


def mentions(doc: Any, needles: set[str]) -> set[str]:
    """The needles a document holds: as text anywhere in a string or in bytes (long
    ones), as a whole token or an equal number (short ones, e.g. a Telegram id)."""
    hit: set[str] = set()
    for value in values(doc):
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            hit |= {n for n in needles if n == str(value)}
            continue
        if isinstance(value, bytes):
            text = value.decode("latin-1").lower()
        elif isinstance(value, str):
            text = value.lower()
        else:
            text = str(value).lower()
        tokens = set(re.split(r"[^0-9a-z@._-]+", text))
        hit |= {n for n in needles if (len(n) >= 8 and n.lower() in text) or n.lower() in tokens}
    return hit


async def everything(store: Store) -> AsyncIterator[tuple[str, Doc]]:
    for name in sorted(await store.db.list_collection_names()):
        async for doc in store.db[name].find():
            yield name, doc


async def leftovers(store: Store, needles: set[str], ids: set[str]) -> list[str]:
    """Where ``needles`` (and, but in the audit, ``ids``) are still found."""
    found = []
    async for name, doc in everything(store):
        hit = mentions(doc, needles | (set() if name == "audit" else ids))
        if hit:
            found.append(f"{name} {doc.get('_id')}: {sorted(hit)}")
    return found


async def of(store: Store, needles: set[str], unless: set[str]) -> dict[str, Doc]:
    """Every document that mentions ``needles`` and none of ``unless`` (keyed), but the
    turn state, leases and live signals (they change as the gateway runs)."""
    found = {}
    async for name, doc in everything(store):
        if name in ("turn_state", "leases", "live_signals", "audit"):
            continue
        if mentions(doc, needles) and not mentions(doc, unless):
            found[f"{name}:{doc['_id']}"] = doc
    return found


# --------------------------------------------------------------- the people


async def ada_everywhere(ada: Ada) -> str:
    """Ada's conversation across the four channels, with files both ways; returns it."""
    gw = ada.gw
    conversation = await begin(ada, "webchat")
    for hop, channel in enumerate(JOURNEY):
        if hop:
            await ada.arrive(channel, await ada.offers(JOURNEY[hop - 1], channel), hop)
        await ada.say(channel, f"On {channel}: my order is {ADA_WORD}")
        photo, document = files_for(channel, "customer")
        await customer_sends(ada, channel, photo, document)
        label, invoice = files_for(channel, "agent")
        sent = await reply(gw, ada.alice, conversation.id, "a photo and a PDF for you",
                           (label, "label.png"), (invoice, "invoice.pdf"))
        assert await customer_receives(ada, channel, sent) == [
            ("label.png", label), ("invoice.pdf", invoice)]
        await gw.settle()
    assert ada.visitors[0].token is not None
    status, _ = await upload(gw, ada.visitors[-1].token, ("client_id", "notes", None),
                             ("file", f"my notes: {ADA_WORD}".encode(), "notes.txt"))
    assert status == 200
    return conversation.id


async def bob_and_the_group(ada: Ada) -> TelegramUser:
    """Bob on Telegram and by email, and a Slack channel thread Bob began, where Ada
    writes too (a group conversation: Bob's, as he wrote first)."""
    gw = ada.gw
    bob = TelegramUser(gw, ada.telegram, ada.people, BOB_TG, "Bob")
    await bob.say(f"Bob here, about {BOB_WORD}")
    await ada.rig.connector.take_in(bytes(mail(BOB_MAIL, f"Bob's mail on {BOB_WORD}",
                                               subject="Bob asks", name="Bob")))
    ada.slack.add_user(BOB_SLACK, "Bob Builder", display_name="bob")
    bobs, adas = new_ts(), new_ts()
    for event in (mention(BOB_SLACK, f"Bob in the thread {BOB_WORD}", ts=bobs),
                  mention(ADA_SLACK, f"Ada in the thread {ADA_WORD}", thread_ts=bobs),
                  mention(ADA_SLACK, f"Ada's own thread {ADA_WORD}", ts=adas),
                  mention(BOB_SLACK, f"Bob answers Ada {BOB_WORD}", thread_ts=adas)):
        status, _ = await ada.slack_in.event(event)
        assert status == 200
        await gw.settle()
    return bob


async def contact_of(store: Store, collection: str, key: str) -> str:
    doc = await store.db[collection].find_one({"_id": key})
    assert doc is not None, key
    return str(doc["contact_id"])


async def exported(gw: Gateway, auth: dict[str, str], contact_id: str
                   ) -> tuple[dict[str, Any], dict[str, bytes]]:
    async with gw.http.get(f"{gw.url}/api/v1/contacts/{contact_id}/export",
                           headers=auth) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/zip"
        assert "attachment" in response.headers["Content-Disposition"]
        body = await response.read()
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    return json.loads(entries.pop("contact.json")), entries


# -------------------------------------------------------------------- tests


async def test_export_and_erase_a_contact_of_every_channel(
    rig: MailRig, telegram: FakeTelegram, slack: FakeSlack
) -> None:
    gw = rig.gw
    ada = Ada(rig, telegram, slack, People(telegram))
    try:
        await erase_scenario(gw, ada)
    finally:
        for visitor in ada.visitors:
            await visitor.close()


async def erase_scenario(gw: Gateway, ada: Ada) -> None:
    store = gw.store
    conversation_id = await ada_everywhere(ada)
    survivor = await contact_of(store, "conversations", conversation_id)
    # a second browser of Ada's, merged into her by an agent; an email code she asked for
    second = Visitor(gw)
    ada.visitors.append(second)
    await second.connect()
    await second.say(f"second me {SECOND_WORD}")
    await gw.settle()
    second_contact = await contact_of(store, "identities",
                                      f"webchat:{second.frames[0]['visitor_id']}")
    status, _ = await call(gw, "POST", f"/contacts/{survivor}/merge", ada.alice,
                           json={"contact_id": second_contact})
    assert status == 201
    await EmailCodes(store).issue(f"webchat:{second.frames[0]['visitor_id']}", survivor,
                                  ADA_MAIL)
    bob = await bob_and_the_group(ada)
    status, _ = await call(gw, "POST", f"/conversations/{conversation_id}/resolve", ada.alice)
    assert status == 200
    await gw.settle()
    # she writes again from her first browser (the conversation reopens, to the bot): the
    # gateway remembers that web chat thread's conversation now
    for text in ("one more thing", f"and {ADA_WORD} again"):
        await ada.visitors[0].say(text)
        await gw.settle()
    await asyncio.sleep(1.5)  # the search indexer has every word

    # every collection the gateway wrote is named in the catalogue and in the docs
    names = set(await store.db.list_collection_names())
    assert names - set(CATALOGUE) == set()
    assert all(f"`{name}`" in DOCS.read_text() for name in CATALOGUE)

    agents = gw.app[AGENTS]
    _, admin_token = await agents.add("Root", role=AgentRole.ADMIN)
    _, designer_token = await agents.add("Dee", role=AgentRole.DESIGNER)
    root = {"Authorization": f"Bearer {admin_token}"}
    dee = {"Authorization": f"Bearer {designer_token}"}
    for who in (ada.alice, dee):  # an agent, a designer
        async with gw.http.get(f"{gw.url}/api/v1/contacts/{survivor}/export",
                               headers=who) as response:
            assert response.status == 403
        status, _ = await call(gw, "POST", f"/contacts/{survivor}/erase", who,
                               json={"confirm": survivor})
        assert status == 403

    # what is Ada's, and what is Bob's, as stored now
    identities = [d async for d in store.identities.find(
        {"contact_id": {"$in": [survivor, second_contact]}})]
    assert {d["channel"] for d in identities} == {"webchat", "telegram", "slack", "email"}
    ada_items = [d async for d in store.messages.find({"conversation_id": conversation_id})]
    group_item = await store.messages.find_one({"text": f"Ada in the thread {ADA_WORD}"})
    assert group_item is not None and group_item["conversation_id"] != conversation_id
    answers = [d async for d in store.messages.find({"reply_to_id": group_item["_id"]})]
    own = await store.messages.find_one({"text": f"Ada's own thread {ADA_WORD}"})
    assert own is not None
    own_thread = str(own["conversation_id"])
    assert [d["sender"]["role"] for d in answers] == ["bot"]  # in Bob's thread, to her
    ada_files = [d async for d in store.db["attachments"].find(
        {"conversation_id": conversation_id})]
    assert len(ada_files) >= 8 * 2 + 2  # photos and PDFs both ways, raw mails, notes
    bob_contacts = {d["contact_id"] async for d in store.identities.find({"_id": {"$in": [
        f"telegram:{BOB_TG}", f"email:{BOB_MAIL}", f"slack:{BOB_SLACK}"]}})}
    bob_conversations = {str(d["_id"]) async for d in store.conversations.find(
        {"contact_id": {"$in": list(bob_contacts)}})}
    assert len(bob_conversations) == 3  # his chat, his mail, the Slack thread
    ada_words = {ADA_WORD, SECOND_WORD, ADA_MAIL, ADA_SLACK, ADA_DM, str(ADA_TG), "lovelace",
                 *(d["external_id"] for d in identities)}
    ada_ids = {survivor, second_contact, conversation_id, own_thread, str(group_item["_id"]),
               *(str(d["_id"]) for d in answers),
               *(str(d["_id"]) for d in ada_items), *(str(d["_id"]) for d in ada_files)}
    bob_words = {BOB_WORD, BOB_MAIL, BOB_SLACK, str(BOB_TG), *bob_contacts,
                 *bob_conversations}
    bobs = await of(store, bob_words, ada_words | ada_ids)
    assert len(bobs) > 10

    # the export: all of Ada's, nothing of Bob's
    data, files = await exported(gw, root, survivor)
    assert data["contact"]["id"] == survivor
    assert [c["id"] for c in data["merged_contacts"]] == [second_contact]
    assert {i["id"] for i in data["identities"]} == {d["_id"] for d in identities}
    by_id = {c["id"]: c for c in data["conversations"]}
    conversation = by_id.pop(conversation_id)
    thread = by_id.pop(own_thread)  # Bob's answer there: its place, not his words
    assert [m.get("text") or m.get("redacted") for m in thread["messages"]
            if m["sender"]["role"] == "customer"] == [f"Ada's own thread {ADA_WORD}", REDACTED]
    [merged] = by_id.values()  # the second browser's
    assert [m["text"] for m in merged["messages"] if m["sender"]["role"] == "customer"] == [
        f"second me {SECOND_WORD}"]
    assert [m["id"] for m in conversation["messages"]] == [
        str(d["_id"]) for d in sorted(ada_items, key=lambda d: d["seq"])]
    said = [m.get("text") or "" for m in conversation["messages"]]
    assert all(any(f"On {c}: my order is {ADA_WORD}" in s for s in said) for c in JOURNEY)
    # in Bob's Slack thread: what she wrote, and the bot's answer to her (none of Bob's)
    elsewhere, answer = data["messages_elsewhere"]
    assert elsewhere["text"] == f"Ada in the thread {ADA_WORD}"
    assert (answer["sender"]["role"], answer["reply_to_id"]) == ("bot", elsewhere["id"])
    listed = {f["id"]: f["path"] for f in data["files"]}
    assert set(listed) == {d["_id"] for d in ada_files}
    for record in ada_files:
        stored = await gw.app[FILES].load(record["_id"])
        assert stored is not None and files[listed[record["_id"]]] == stored.data
    assert set(files) == set(listed.values())
    sent = files_for("telegram", "customer")[0]
    assert sent in files.values()  # the photo Ada sent on Telegram, byte for byte
    whole = json.dumps(data).encode() + b"".join(files.values())
    assert mentions(whole, bob_words) == set()
    assert mentions(whole, {ADA_WORD}) == {ADA_WORD}
    # asked for the merged contact: the survivor's export, saying so
    merged_data, _ = await exported(gw, root, second_contact)
    assert (merged_data["contact"]["id"], merged_data["asked_for"]) == (survivor,
                                                                        second_contact)

    # the erase: refused without the id, and for the merged contact (its survivor holds it)
    status, body = await call(gw, "POST", f"/contacts/{survivor}/erase", root,
                              json={"confirm": "yes"})
    assert status == 400 and "contact's id" in body["message"]
    status, body = await call(gw, "POST", f"/contacts/{second_contact}/erase", root,
                              json={"confirm": second_contact})
    assert status == 409 and survivor in body["message"]
    assert await leftovers(store, ada_words, ada_ids) != []  # the scan finds her now
    status, erased = await call(gw, "POST", f"/contacts/{survivor}/erase", root,
                                json={"confirm": survivor})
    assert status == 200, erased
    assert erased["contacts"] == [survivor, second_contact]
    counts = erased["counts"]
    assert counts["conversations"] == 3 and counts["contacts"] == 2
    assert counts["files"] >= len(ada_files) and counts["outcomes_anonymised"] >= 1
    await gw.settle()
    assert await leftovers(store, ada_words, ada_ids) == []
    assert await of(store, bob_words, ada_words | ada_ids) == bobs
    status, _ = await call(gw, "POST", f"/contacts/{survivor}/erase", root,
                           json={"confirm": survivor})
    assert status == 404

    # what stays: the audit entry without content, the anonymised outcome
    entries = [d async for d in store.db["audit"].find({"action": {"$in": [
        "contact.erase", "contact.export"]}})]
    [entry] = [e for e in entries if e["action"] == "contact.erase"]
    assert entry["target"] == survivor and entry["who"]["name"] == "Root"
    assert entry["counts"] == counts and str(entry["_id"]) == erased["audit_id"]
    assert len(entries) == 3  # and two exports
    outcome = await store.db["outcomes"].find_one({"anonymised": True})
    assert outcome is not None and outcome["resolved_by"] == "agent"

    # Ada can come back: a new customer, nothing of before
    again = Visitor(gw)
    ada.visitors.append(again)
    again.token = ada.visitors[0].token
    await again.connect()
    await again.say("hello again")
    await ada.ann().say("hello again")
    await bob.say("still here")
    await gw.settle()
    fresh = {d["contact_id"] async for d in store.identities.find(
        {"_id": {"$in": [f"webchat:{again.frames[0]['visitor_id']}", f"telegram:{ADA_TG}"]}})}
    assert len(fresh) == 2 and not fresh & {survivor, second_contact}
    async for doc in store.conversations.find({"contact_id": {"$in": list(fresh)}}):
        assert doc["_id"] != conversation_id


# ------------------------------------------------------------------ retention


def webchat(who: str, text: str, *, n: int = 1, files: list[IncomingFile] | None = None
            ) -> InboundMessage:
    return InboundMessage(
        channel="webchat", external_id=f"{who}:{n}", thread_key=who,
        sender=Party(role=Role.CUSTOMER, id=who), sender_external_id=who, text=text,
        files=files or [])


async def resolved(gw: Gateway, who: str, word: str, *, days_ago: float,
                   resolve: bool = True) -> str:
    """A conversation of ``who`` (with a file), handed off, resolved by an agent, its
    last change ``days_ago`` days ago; returns its id."""
    pipeline, routing = gw.app[PIPELINE], gw.app[ROUTING]
    result = await pipeline.ingest(webchat(who, f"{word} please", files=[IncomingFile(
        key="f", name=f"{word}.txt", data=f"file of {word}".encode())]))
    await processed(gw)
    cid = result.conversation.id
    if resolve:
        assert await routing.handoff(cid, "help")
        agent_id, _ = await gw.agent(f"Agent {who}")
        agent = await gw.app[AGENTS].get(agent_id)
        assert agent is not None
        await routing.claim(cid, agent)
        await routing.resolve(cid, agent)
    then = utcnow() - timedelta(days=days_ago)
    await gw.store.conversations.update_one(
        {"_id": cid}, {"$set": {"updated_at": then, "last_activity_at": then}})
    return cid


async def snapshot(store: Store) -> dict[str, list[Doc]]:
    return {name: await store.db[name].find().sort("_id").to_list()
            for name in sorted(await store.db.list_collection_names())
            if name not in ("leases", "turn_state", "live_signals", "search_state")}


async def test_retention_dry_run_changes_nothing_the_run_deletes_only_old_resolved(
    gateway: Gateway, settings: Settings, mongo_uri: str, db_name: str
) -> None:
    gw = gateway
    old = await resolved(gw, "v_old", "oldword", days_ago=40)
    recent = await resolved(gw, "v_recent", "recentword", days_ago=10)
    open_old = await resolved(gw, "v_open", "openword", days_ago=40, resolve=False)
    await gw.store.db["outcomes"].update_many({"conversation_id": old}, {"$set": {
        "csat_score": 2, "csat_comment": "oldword was slow"}})
    await gw.store.db["sla_breaches"].insert_one({
        "_id": f"{old}:x:resolution", "conversation_id": old, "kind": "resolution",
        "channel": "webchat", "due": utcnow() - timedelta(days=39)})
    await asyncio.sleep(1.5)  # indexed
    env = clean_env(OMNIGATE_MONGODB_URI=mongo_uri, OMNIGATE_MONGODB_DB=db_name)

    # without the setting: says what to set
    done = await asyncio.to_thread(omnigate, "retention", "--dry-run", env=env)
    assert done.returncode == 2 and "OMNIGATE_RETENTION_DAYS" in done.stderr
    env["OMNIGATE_RETENTION_DAYS"] = "30"
    before = await snapshot(gw.store)
    done = await asyncio.to_thread(omnigate, "retention", "--dry-run", env=env)
    assert done.returncode == 0, done.stderr
    assert "1 would be deleted" in done.stdout and "files: 1" in done.stdout
    assert re.search(r"messages: [1-9]", done.stdout), done.stdout
    assert await snapshot(gw.store) == before  # nothing changed

    done = await asyncio.to_thread(omnigate, "retention", env=env)
    assert done.returncode == 0, done.stderr
    assert "1 were deleted" in done.stdout
    store = gw.store
    assert await store.conversations.find_one({"_id": old}) is None
    assert await store.messages.count_documents({"conversation_id": old}) == 0
    assert await store.db["attachments"].count_documents({"conversation_id": old}) == 0
    assert await store.db["search_terms"].count_documents({"c": old}) == 0
    assert await leftovers(store, {"oldword"}, {old}) == []
    for kept in (recent, open_old):
        assert await store.conversations.find_one({"_id": kept}) is not None
        assert await store.messages.count_documents({"conversation_id": kept}) > 0
        assert await store.db["attachments"].count_documents({"conversation_id": kept}) == 1
    # the contact stays; its analytics figures too, anonymised
    assert await store.identities.find_one({"_id": "webchat:v_old"}) is not None
    [outcome] = await store.db["outcomes"].find({"anonymised": True}).to_list()
    assert (outcome["csat_score"], outcome["csat_comment"], outcome["contact_id"]) == (
        2, None, None)
    assert await store.db["sla_breaches"].count_documents({"conversation_id": None}) == 1
    [entry] = await store.db["audit"].find({"action": "retention.run"}).to_list()
    assert entry["who"] == {"id": None, "name": "omnigate retention"}
    assert entry["counts"]["conversations"] == 1
    done = await asyncio.to_thread(omnigate, "retention", env=env)  # nothing more
    assert "0 were deleted" in done.stdout


async def test_periodic_retention_runs_in_one_process(settings: Settings) -> None:
    every = settings.model_copy(update={"retention_days": 30})
    async with running_gateway(every) as gw:
        # the gateway runs it, an hour apart: it ran at start (nothing to do) and holds
        # the lease; here it gives way to two runners a second apart (two processes)
        for _ in range(100):
            if await gw.store.channel_state.find_one({"_id": "retention:last_run"}):
                break
            await asyncio.sleep(0.05)
        assert await Leases(gw.store).holder("retention") is not None
        await gw.app[RETENTION].stop()
        old = await resolved(gw, "v_old", "oldword", days_ago=31)
        keep = await resolved(gw, "v_new", "newword", days_ago=29)
        runners = [Retention(gw.store, 30, leases=Leases(gw.store, f"p{n}"),
                             every=timedelta(seconds=1)) for n in range(2)]
        for runner in runners:
            runner.start()
        try:
            for _ in range(100):
                if await gw.store.conversations.find_one({"_id": old}) is None:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the old conversation was not deleted")
            await asyncio.sleep(2.5)  # more runs: nothing more to delete
        finally:
            for runner in runners:
                await runner.stop()
        assert await gw.store.conversations.find_one({"_id": keep}) is not None
        held = [await Leases(gw.store).holder("retention")]
        assert held == [None]  # released on stop
        runs = await gw.store.db["audit"].count_documents({"action": "retention.run"})
        assert runs == 1  # one process ran it; later runs found nothing


@pytest.mark.parametrize("days", ["0", "-1", "x"])
def test_a_bad_retention_setting_is_named(days: str) -> None:
    env = clean_env(OMNIGATE_RETENTION_DAYS=days)
    env.pop("OMNIGATE_MONGODB_URI", None)
    done = omnigate("retention", "--dry-run", env=env)
    assert done.returncode == 2 and "OMNIGATE_RETENTION_DAYS" in done.stderr
    assert os.environ.get("OMNIGATE_RETENTION_DAYS") is None
