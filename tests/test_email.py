"""Email end to end: a real Dovecot (IMAP in), a real aiosmtpd sink (SMTP out), the whole
gateway on a real port, and the real store. This module: the road (IDLE and polling),
threading, button choices, reconnecting, and restarts (UIDVALIDITY + last UID).

Mail is APPENDed to the mailbox by the test (imaplib), picked up by the connector (IDLE
wakes it, or polling), answered by the bot, and the answer is read at the SMTP sink.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from connectors.base import ConnectorContext
from connectors.email.threads import token_for
from gateway.settings import Settings
from gateway.store import Store
from tests.mailservers import (
    ALICE,
    IDLE_ONLY,
    MALLORY,
    POLLING,
    Dovecot,
    MailRig,
    SmtpSink,
    conversation_of,
    html_part,
    inbound,
    inbound_count,
    mail,
    reply_to,
    rig_for,
    running_dovecot,
    start_sink,
    stop_sink,
    text_part,
    until,
)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot("idle") as server:
        yield server


@pytest.fixture(scope="session")
def dovecot_no_idle() -> Iterator[Dovecot]:
    """A Dovecot that does not advertise IDLE: clients must poll."""
    with running_dovecot("noidle", "imap_capability = IMAP4rev1 LITERAL+ UIDPLUS") as server:
        yield server


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    server = await start_sink()
    yield server
    await stop_sink(server)


@pytest.fixture
async def rig(settings: Settings, dovecot: Dovecot, sink: SmtpSink) -> AsyncIterator[MailRig]:
    async with rig_for(settings, dovecot, sink, IDLE_ONLY) as r:
        await r.start()
        yield r


# ------------------------------------------------------------------ the road


async def test_mail_in_bot_reply_out_threaded_and_buttons_by_number_or_label(
    rig: MailRig,
) -> None:
    store = rig.gw.store
    first = mail(body="hello")
    await rig.append(first)  # IDLE wakes the connector (polling is 5 minutes away)

    # the greeting and the menu of one bot turn: one mail
    [menu] = await rig.sent(1)
    assert menu["To"].addresses[0].addr_spec == ALICE
    assert str(menu["Message-ID"]).endswith("@omnigate.test>")
    assert menu["In-Reply-To"] == first["Message-ID"]
    assert str(first["Message-ID"]) in str(menu["References"])
    assert menu["Auto-Submitted"] == "auto-replied"
    assert menu.get_content_type() == "multipart/alternative"
    assert menu["Subject"].startswith("Re: A question [#")
    greeting = text_part(menu)
    assert "Omnigate demo bot" in greeting
    assert "1. Opening hours" in greeting and "2. Shipping costs" in greeting
    assert greeting.index("Omnigate demo bot") < greeting.index("1. Opening hours")
    assert "<ol><li>Opening hours</li>" in html_part(menu)
    # stored first, then flagged \Seen
    assert (await rig.dovecot.aflags(rig.user))[1] >= {"\\Seen"}
    [stored] = await inbound(store)
    assert stored.external_id == first["Message-ID"]
    conversation = await conversation_of(store, stored)
    assert conversation.thread_key == token_for(str(first["Message-ID"]))
    assert f"[#{conversation.thread_key}]" in menu["Subject"]

    # the customer answers the menu with a number, quoting our mail: same conversation
    answer = reply_to(menu, "2\n\nOn Mon, 23 Nov 2026, Support <support@omnigate.test> wrote:\n"
                            "> What can I help you with?\n> 1. Opening hours\n")
    await rig.append(answer)
    [shipping] = (await rig.sent(2))[1:]
    assert "Shipping is free over 50 EUR" in text_part(shipping)
    assert shipping["In-Reply-To"] == answer["Message-ID"]
    references = str(shipping["References"]).split()
    assert references[-1] == answer["Message-ID"]
    assert str(menu["Message-ID"]) in references and str(first["Message-ID"]) in references
    items = await inbound_count(store, 2)
    assert items[1].conversation_id == stored.conversation_id
    assert items[1].value == "flow:shipping"
    assert items[1].text == "2"  # the quote is gone for the bot...
    assert "> What can I help you with?" in items[1].channel_data["full_text"]  # ...kept here
    assert items[1].channel_data["threaded_by"] == "in-reply-to"

    # ...or with the button's label
    await rig.append(reply_to(shipping, "opening hours"))
    [hours] = (await rig.sent(3))[2:]
    assert "Monday to Friday" in text_part(hours)
    assert (await inbound_count(store, 3))[2].value == "flow:hours"

    # someone else answering with the same In-Reply-To does NOT join the conversation
    intruder = reply_to(hours, "hello", sender=MALLORY)
    await rig.append(intruder)
    items = await inbound_count(store, 4)
    assert items[3].sender.id == MALLORY
    assert items[3].conversation_id != stored.conversation_id
    assert items[3].channel_data["threaded_by"] == "new"
    to_mallory = [m for m in await rig.sent(4) if m["To"].addresses[0].addr_spec == MALLORY]
    assert to_mallory and all(ALICE not in str(m["To"]) for m in to_mallory)

    # a new mail (no In-Reply-To, no token) opens a new conversation
    await rig.append(mail(body="hello again", subject="Another matter"))
    items = await inbound_count(store, 5)
    assert items[4].conversation_id not in {stored.conversation_id, items[3].conversation_id}
    await rig.gw.settle()
    assert await store.conversations.count_documents({"channel": "email"}) == 3


async def test_reply_found_by_subject_token_when_client_drops_the_headers(rig: MailRig) -> None:
    await rig.append(mail(body="hello"))
    [menu] = await rig.sent(1)
    # a client that lost In-Reply-To/References but kept the subject
    await rig.append(mail(body="3", subject=str(menu["Subject"])))
    items = await inbound_count(rig.gw.store, 2)
    assert items[1].conversation_id == items[0].conversation_id
    assert items[1].channel_data["threaded_by"] == "token"
    assert items[1].value == "flow:returns_policy"


async def test_polling_fallback_when_the_server_has_no_idle(
    settings: Settings, dovecot_no_idle: Dovecot, sink: SmtpSink,
) -> None:
    async with rig_for(settings, dovecot_no_idle, sink, POLLING) as rig:
        await rig.start()
        assert rig.connector.imap is not None
        assert not rig.connector.imap._client.has_capability("IDLE")
        message = mail(body="what are your opening hours?")
        await rig.append(message)
        [answer] = await rig.sent(1)
        assert "Monday to Friday" in text_part(answer)
        assert answer["In-Reply-To"] == message["Message-ID"]
        assert (await rig.dovecot.aflags(rig.user))[1] >= {"\\Seen"}


async def test_a_dropped_connection_is_noticed_during_idle_and_reconnected(
    rig: MailRig, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "connectors.email.imap")
    imap = rig.connector.imap
    assert imap is not None and imap.waiting.is_set()
    # the server drops the IDLEing session (as on a server restart or a NAT timeout)
    kicked = await asyncio.to_thread(
        subprocess.run, ["doveadm", "-c", str(rig.dovecot.directory / "dovecot.conf"),
                         "kick", rig.user], capture_output=True, text=True)
    assert kicked.returncode == 0, kicked.stderr

    async def reconnected() -> bool:
        return "reconnecting" in caplog.text and imap.waiting.is_set()
    await until(reconnected, what="the connector to notice and reconnect")
    message = mail(body="what are your opening hours?")
    await rig.append(message)
    [answer] = await rig.sent(1)
    assert answer["In-Reply-To"] == message["Message-ID"]


# ------------------------------------------------------------------ restart


async def test_restart_in_the_middle_ingests_nothing_twice_and_loses_nothing(
    settings: Settings, dovecot: Dovecot, sink: SmtpSink,
) -> None:
    async with rig_for(settings, dovecot, sink, IDLE_ONLY) as rig:
        await rig.start()
        connector = rig.connector
        real = connector.context
        stored: list[str] = []
        hold = asyncio.Event()

        async def ingest_then_die_after_the_second(message: Any) -> Any:
            result = await real.ingest(message)
            stored.append(message.external_id)
            if len(stored) == 2:
                hold.set()
                await asyncio.Event().wait()  # stopped here: stored, not yet \Seen
            return result

        connector._context = ConnectorContext(ingest_then_die_after_the_second, real.store)
        mails = [mail(body=f"what are your opening hours? ({n})") for n in range(3)]
        for message in mails:
            await rig.append(message)
        await asyncio.wait_for(hold.wait(), 15)
        flags = await rig.dovecot.aflags(rig.user)
        assert "\\Seen" in flags[1]
        assert "\\Seen" not in flags[2]  # durably stored, but the flag comes only after
        assert "\\Seen" not in flags[3]
        state_key = connector.imap.state_key if connector.imap else ""
        state = await rig.gw.store.get_state("email", state_key)
        assert state is not None and state["last_uid"] == 1
        store_items = await inbound(rig.gw.store)
        assert len(store_items) == 2
        await rig.stop()  # the gateway shuts down in the middle

        await rig.start()
        store = rig.gw.store

        async def all_seen() -> bool:
            return all("\\Seen" in f for f in (await rig.dovecot.aflags(rig.user)).values())
        await until(all_seen, what="every mail flagged \\Seen")
        items = await inbound_count(store, 3)
        await rig.gw.settle()
        items = await inbound(store)
        assert sorted(i.external_id or "" for i in items) == sorted(
            str(m["Message-ID"]) for m in mails)
        state = await store.get_state("email", state_key)
        assert state is not None and state["last_uid"] == 3
        answers = await rig.sent(3)
        await asyncio.sleep(0)  # nothing more is on its way: the gateway settled
        assert len(rig.sink.sink.messages) == 3  # one answer per mail, none twice
        assert sorted(str(a["In-Reply-To"]) for a in answers) == sorted(
            str(m["Message-ID"]) for m in mails)


async def test_changed_uidvalidity_resyncs_from_the_unseen_mail(
    settings: Settings, dovecot: Dovecot, sink: SmtpSink, caplog: pytest.LogCaptureFixture,
) -> None:
    async with rig_for(settings, dovecot, sink, IDLE_ONLY) as rig:
        read_by_a_human = mail(body="old, already handled")
        await rig.append(read_by_a_human, flags="\\Seen")
        new = mail(body="what are your opening hours?")
        await rig.append(new)
        # the store remembers another UIDVALIDITY (the mailbox was rebuilt since)
        store = Store.connect(rig.settings.mongodb_uri or "", rig.settings.mongodb_db)
        key = f"imap:{rig.user}@127.0.0.1:{rig.dovecot.port}/INBOX"
        await store.put_state("email", key, {"uidvalidity": 1, "last_uid": 999})
        await store.close()
        caplog.set_level(logging.WARNING, "connectors.email.imap")
        await rig.start()
        [answer] = await rig.sent(1)
        assert answer["In-Reply-To"] == new["Message-ID"]
        assert "UIDVALIDITY" in caplog.text
        items = await inbound(rig.gw.store)
        assert [i.external_id for i in items] == [new["Message-ID"]]  # the seen one skipped
        state = await rig.gw.store.get_state("email", key)
        assert state is not None and state["last_uid"] == 2 and state["uidvalidity"] != 1
        # and new mail after the resync is taken in (last UID is 2, not 999)
        await rig.append(reply_to(answer, "shipping costs"))
        items = await inbound_count(rig.gw.store, 2)
        assert items[1].conversation_id == items[0].conversation_id


