"""Email files both ways and one mail per bot turn, end to end (set-up: test_email.py).

Inbound, a mail's attachment parts reach the agent API byte for byte, typed by their
content; the raw mail is an attachment of its conversation (``message.eml``) read with the
agent API's access rules. Outbound, an agent's reply with files is one mail with them
attached, and a bot turn's replies (greeting and menu) are one mail, also after a retry
and after a crash between the send and the write of its outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from email import policy
from email.message import EmailMessage

import aiohttp
import aiosmtplib
import pytest

from connectors.base import DeliveryError
from gateway.keys import AGENTS, OUTBOX, ROUTING
from gateway.model import (
    Activity,
    AgentRole,
    Attachment,
    AttachmentState,
    DeliveryStatus,
    Party,
    Role,
    utcnow,
)
from gateway.outbox import Outbox
from gateway.settings import Settings
from gateway.store.mongo import from_doc
from tests.conftest import free_port
from tests.mailservers import (
    ALICE,
    IDLE_ONLY,
    POLLING,
    Dovecot,
    MailRig,
    SmtpSink,
    html_part,
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
from tests.test_attachments import PDF, png


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot("files") as server:
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


async def fetch(rig: MailRig, attachment_id: str,
                headers: dict[str, str]) -> tuple[int, bytes, str]:
    url = f"{rig.gw.url}/api/v1/attachments/{attachment_id}"
    async with rig.gw.http.get(url, headers=headers) as response:
        return response.status, await response.read(), response.headers.get("Content-Type", "")


async def outbound(rig: MailRig) -> list[Activity]:
    docs = await rig.gw.store.messages.find({"channel": "email", "direction": "out"}).sort(
        "seq", 1).to_list()
    return [from_doc(Activity, d) for d in docs]


def attachments_of(message: EmailMessage) -> list[tuple[str | None, str, bytes]]:
    found = []
    for part in message.iter_attachments():
        content = part.get_content()
        assert isinstance(content, bytes), part.get_content_type()
        found.append((part.get_filename(), part.get_content_type(), content))
    return found


# ------------------------------------------------------------------ inbound


def with_files(body: str = "what are your opening hours?") -> tuple[EmailMessage, bytes]:
    message = mail(body=body)
    photo = png(4, 3)
    message.add_attachment(photo, maintype="image", subtype="png", filename="photo.png")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
    # a PNG that calls itself a PDF, by name and by declared type
    message.add_attachment(png(2, 2), maintype="application", subtype="pdf",
                           filename="report.pdf")
    message.add_attachment(b"", maintype="text", subtype="plain", filename="empty.txt")
    return message, photo


@pytest.mark.parametrize("road", ["imap", "smtp"])
async def test_attached_files_reach_the_agent_api_byte_for_byte_typed_by_content(
    settings: Settings, dovecot: Dovecot, sink: SmtpSink, road: str,
) -> None:
    port = free_port() if road == "smtp" else None
    async with rig_for(settings, dovecot if road == "imap" else None, sink,
                       IDLE_ONLY if road == "imap" else POLLING, listen=port) as rig:
        await rig.start()
        message, photo = with_files()
        if port is None:
            await rig.append(message)
        else:
            await aiosmtplib.send(message, hostname="127.0.0.1", port=port)
        [item] = await inbound_count(rig.gw.store, 1)
        [answer] = await rig.sent(1)  # the mail's text is answered as before
        assert "Monday to Friday" in text_part(answer)

        # as the agent API lists them
        _, alice = await rig.gw.agent("Alice")
        async with rig.gw.http.get(
                f"{rig.gw.url}/api/v1/conversations/{item.conversation_id}/messages",
                headers=alice) as response:
            assert response.status == 200
            page = await response.json()
        [listed] = [i for i in page["items"] if i["direction"] == "in"]
        assert [(a["name"], a["content_type"], a["size"], a["state"])
                for a in listed["attachments"]] == [
            ("photo.png", "image/png", len(photo), "stored"),
            ("invoice.pdf", "application/pdf", len(PDF), "stored"),
            ("report.pdf", "image/png", len(png(2, 2)), "stored"),  # its real type
            ("empty.txt", "application/octet-stream", 0, "stored"),  # an empty file
        ]
        for attachment, data in zip(listed["attachments"],
                                    (photo, PDF, png(2, 2), b""), strict=True):
            status, body, content_type = await fetch(rig, attachment["id"], alice)
            assert (status, body) == (200, data)
            assert content_type.startswith(attachment["content_type"])
        assert "raw_url" not in item.channel_data  # the /email/raw routes are gone


async def test_the_raw_mail_is_read_with_the_attachment_access_rules(rig: MailRig) -> None:
    agents = rig.gw.app[AGENTS]
    tokens = {}
    for name, role, teams in [("Ann", AgentRole.AGENT, ["billing"]),
                              ("Sam", AgentRole.AGENT, ["sales"]),
                              ("Dee", AgentRole.DESIGNER, [])]:
        _, token = await agents.add(name, role=role, teams=teams)
        tokens[name] = {"Authorization": f"Bearer {token}"}
    message, _ = with_files()
    await rig.append(message)
    [item] = await inbound_count(rig.gw.store, 1)
    await rig.gw.settle()
    assert await rig.gw.app[ROUTING].handoff(item.conversation_id, "billing question",
                                             team="billing")
    raw_id = item.channel_data["raw_attachment_id"]
    status, body, content_type = await fetch(rig, raw_id, tokens["Ann"])
    assert status == 200 and content_type.startswith("message/rfc822")
    assert body == message.as_bytes(policy=policy.SMTP)  # as received (APPENDed)
    assert raw_id not in [a.id for a in item.attachments]  # not one of the customer's files
    assert (await fetch(rig, raw_id, tokens["Dee"]))[0] == 403  # a designer
    assert (await fetch(rig, raw_id, tokens["Sam"]))[0] == 403  # another team's agent
    assert (await fetch(rig, raw_id, {}))[0] == 401
    async with rig.gw.http.get(f"{rig.gw.url}/email/raw/{item.channel_data['raw_digest']}",
                               headers=tokens["Ann"]) as gone:
        assert gone.status == 404


async def test_a_redelivered_mail_mends_a_missing_raw_copy(rig: MailRig) -> None:
    """A crash between storing the item and its raw copy: the mail comes again (IMAP had
    not flagged it, SMTP had not answered 250) and the copy is made then, once."""
    message = mail(body="what are your opening hours?")
    raw = message.as_bytes(policy=policy.SMTP)
    await rig.connector.take_in(raw, source="smtp")
    [item] = await inbound_count(rig.gw.store, 1)
    raw_id = item.channel_data["raw_attachment_id"]
    records = rig.gw.store.db["attachments"]
    _, alice = await rig.gw.agent("Alice")
    assert (await fetch(rig, raw_id, alice))[:2] == (200, raw)
    await records.delete_one({"_id": raw_id})  # as if the process died before the copy
    assert (await fetch(rig, raw_id, alice))[0] == 404
    await rig.connector.take_in(raw, source="smtp")  # the redelivery
    assert (await fetch(rig, raw_id, alice))[:2] == (200, raw)
    assert await records.count_documents({"_id": raw_id}) == 1
    assert len(await inbound_count(rig.gw.store, 1)) == 1


# ------------------------------------------------------------------ outbound


async def handed_off(rig: MailRig) -> tuple[str, dict[str, str], EmailMessage]:
    """A mail conversation handed to an agent who claimed it: (id, agent auth, the mail)."""
    ask = mail(body="I want to talk to a human please")
    await rig.append(ask)
    await rig.sent(1)
    await rig.gw.settle()
    [item] = await inbound_count(rig.gw.store, 1)
    _, alice = await rig.gw.agent("Alice Agent")
    cid = item.conversation_id
    async with rig.gw.http.post(f"{rig.gw.url}/api/v1/conversations/{cid}/claim",
                                headers=alice) as response:
        assert response.status == 200
    return cid, alice, ask


async def test_an_agent_reply_with_files_is_one_mail_with_them_attached(
    rig: MailRig,
) -> None:
    cid, alice, ask = await handed_off(rig)
    photo = png(6, 6)
    form = aiohttp.FormData(quote_fields=False)  # the file name as browsers send it
    form.add_field("text", "Here are the label and the invoice.")
    form.add_field("file", photo, filename="label.png")
    form.add_field("file", PDF, filename="Rechnung März.pdf")
    async with rig.gw.http.post(f"{rig.gw.url}/api/v1/conversations/{cid}/messages",
                                data=form, headers=alice) as response:
        assert response.status == 201
        reply = await response.json()
    sent = (await rig.sent(2))[1]
    assert sent.get_content_type() == "multipart/mixed"
    assert sent["In-Reply-To"] == ask["Message-ID"]
    assert str(sent["References"]).split()[-1] == ask["Message-ID"]
    assert sent["Message-ID"] == f"<omnigate.{reply['id']}@omnigate.test>"
    assert "Here are the label and the invoice." in text_part(sent)
    assert "Here are the label and the invoice." in html_part(sent)
    assert attachments_of(sent) == [("label.png", "image/png", photo),
                                    ("Rechnung März.pdf", "application/pdf", PDF)]
    # a file without text is a mail too
    form = aiohttp.FormData()
    form.add_field("file", PDF, filename="only.pdf")
    async with rig.gw.http.post(f"{rig.gw.url}/api/v1/conversations/{cid}/messages",
                                data=form, headers=alice) as response:
        assert response.status == 201
    only = (await rig.sent(3))[2]
    assert attachments_of(only) == [("only.pdf", "application/pdf", PDF)]
    await rig.gw.settle()
    assert len(rig.sink.sink.messages) == 3
    delivered = [i.delivery.status for i in await outbound(rig) if i.delivery]
    assert DeliveryStatus.FAILED not in delivered


async def test_a_file_missing_from_the_store_refuses_the_mail_clearly(rig: MailRig) -> None:
    cid, _, _ = await handed_off(rig)
    conversation = await rig.gw.store.get_conversation(cid)
    assert conversation is not None
    [bot] = [i for i in await outbound(rig) if i.text and i.sender.role is Role.BOT]
    lost = bot.model_copy(update={
        "id": "lost-file", "sender": Party(role=Role.AGENT, id="a1", name="Alice"),
        "text": "see attached", "buttons": [],
        "attachments": [Attachment(id="nowhere", name="gone.pdf", content_type="x/y",
                                   state=AttachmentState.STORED)]})
    with pytest.raises(DeliveryError) as refused:
        await rig.connector.send(conversation, lost)
    assert refused.value.permanent and "gone.pdf" in str(refused.value)
    assert len(rig.sink.sink.messages) == 1  # nothing sent


# ------------------------------------------------------------------ one mail per turn


async def turn_items(rig: MailRig, n: int) -> list[Activity]:
    async def stored() -> list[Activity] | None:
        items = await outbound(rig)
        return items if len(items) >= n else None
    return await until(stored, what=f"{n} outbound item(s)")


async def test_the_greeting_and_the_menu_of_one_turn_are_one_mail(rig: MailRig) -> None:
    first = mail(body="hello")
    await rig.append(first)
    [sent] = await rig.sent(1)
    await rig.gw.settle()
    assert len(rig.sink.sink.messages) == 1  # exactly one mail for the turn
    greeting, menu = await outbound(rig)
    assert greeting.reply_to_id == menu.reply_to_id and menu.seq == greeting.seq + 1
    assert greeting.text is not None and menu.text is not None and menu.buttons
    body = text_part(sent).replace("\r\n", "\n")
    # the texts in order, then the numbered choices
    assert body.index(greeting.text.split("\n")[0]) < body.index(menu.text.split("\n")[0])
    choices = "\n".join(f"{n}. {b.title}" for n, b in enumerate(menu.buttons, 1))
    assert choices in body and body.index(menu.text.split("\n")[0]) < body.index(choices)
    for item in (greeting, menu):  # both delivered as that mail
        assert item.delivery is not None
        assert item.delivery.status is DeliveryStatus.DELIVERED
        assert item.delivery.external_id == sent["Message-ID"]
        assert item.delivery.attempts == 1
    assert sent["Message-ID"] == f"<omnigate.{greeting.id}@omnigate.test>"
    assert sent["In-Reply-To"] == first["Message-ID"]
    # the customer answers the combined mail with a number: the menu's choice
    await rig.append(reply_to(sent, "2"))
    [shipping] = (await rig.sent(2))[1:]
    assert "Shipping is free over 50 EUR" in text_part(shipping)
    items = await inbound_count(rig.gw.store, 2)
    assert items[1].value == "flow:shipping"
    assert items[1].conversation_id == items[0].conversation_id


async def test_a_turn_retried_after_an_smtp_failure_is_still_one_mail(rig: MailRig) -> None:
    rig.sink.sink.refuse[ALICE] = "451 4.2.0 mailbox busy, try later"
    await rig.append(mail(body="hello"))

    async def deferred() -> list[Activity] | None:
        items = await turn_items(rig, 2)
        return items if all(i.delivery and i.delivery.last_error for i in items) else None
    for item in await until(deferred, what="the turn's delivery to fail once"):
        assert item.delivery is not None and "451" in (item.delivery.last_error or "")
        assert item.delivery.status in (DeliveryStatus.PENDING, DeliveryStatus.SENDING)
    del rig.sink.sink.refuse[ALICE]
    [sent] = await rig.sent(1)
    await rig.gw.settle()
    assert len(rig.sink.sink.messages) == 1
    assert "Omnigate demo bot" in text_part(sent) and "1. Opening hours" in text_part(sent)
    greeting, menu = await outbound(rig)
    for item in (greeting, menu):
        assert item.delivery is not None
        assert item.delivery.status is DeliveryStatus.DELIVERED
        assert item.delivery.external_id == sent["Message-ID"]
        assert item.delivery.attempts >= 2 and item.delivery.last_error is None
    assert greeting.delivery is not None and menu.delivery is not None
    assert greeting.delivery.attempts == menu.delivery.attempts


async def test_a_permanent_failure_fails_the_whole_turn_together(rig: MailRig) -> None:
    rig.sink.sink.refuse[ALICE] = "550 5.1.1 no such user"
    await rig.append(mail(body="hello"))

    async def failed() -> list[Activity] | None:
        items = await turn_items(rig, 2)
        return items if all(i.delivery and i.delivery.status is DeliveryStatus.FAILED
                            for i in items) else None
    for item in await until(failed, what="the turn to fail"):
        assert item.delivery is not None and item.delivery.attempts == 1
        assert "550" in (item.delivery.last_error or "")
    assert rig.sink.sink.messages == []


async def test_a_crash_after_the_send_resends_the_same_single_mail(rig: MailRig) -> None:
    """The duplicate window (docs/delivery.md): the turn was sent, the process died before
    writing that; when the claim expires it is sent again as the same one mail (the same
    Message-ID, so mail clients show it once), not as one mail per reply."""
    await rig.append(mail(body="hello"))
    [first] = await rig.sent(1)
    await rig.gw.settle()
    items = await outbound(rig)
    # as if a process had claimed them, sent, and died: claims that ran out
    await rig.gw.store.messages.update_many(
        {"_id": {"$in": [i.id for i in items]}},
        {"$set": {"delivery.status": "sending", "delivery.owner": "dead:1:0",
                  "delivery.lease_until": utcnow() - timedelta(seconds=1),
                  "delivery.external_id": None}})
    await rig.gw.app[OUTBOX].sweep_once()
    again = (await rig.sent(2, timeout=20))[1]
    await rig.gw.settle()
    assert len(rig.sink.sink.messages) == 2
    assert again["Message-ID"] == first["Message-ID"]
    assert text_part(again) == text_part(first)
    for item in await outbound(rig):
        assert item.delivery is not None
        assert item.delivery.status is DeliveryStatus.DELIVERED
        assert item.delivery.external_id == first["Message-ID"]


async def test_turns_waiting_behind_a_failure_go_out_in_order_one_mail_each(
    rig: MailRig,
) -> None:
    """Two turns pile up while SMTP defers: each turn is one mail, the first turn's
    first; a turn ends where the next inbound message's replies begin."""
    rig.sink.sink.refuse[ALICE] = "451 4.2.0 mailbox busy, try later"
    first = mail(body="hello")
    await rig.append(first)
    await turn_items(rig, 2)
    second = mail(body="what are your opening hours?", subject="Re: A question",
                  in_reply_to=str(first["Message-ID"]))
    await rig.append(second)
    items = await turn_items(rig, 3)
    assert items[2].reply_to_id != items[0].reply_to_id
    del rig.sink.sink.refuse[ALICE]
    welcome, hours = await rig.sent(2)
    await rig.gw.settle()
    assert len(rig.sink.sink.messages) == 2
    assert welcome["In-Reply-To"] == first["Message-ID"]
    assert "Omnigate demo bot" in text_part(welcome) and "1. Opening hours" in text_part(welcome)
    assert hours["In-Reply-To"] == second["Message-ID"]
    assert "Monday to Friday" in text_part(hours) and "Omnigate" not in text_part(hours)
    ids = [i.delivery.external_id for i in await outbound(rig) if i.delivery]
    assert ids == [welcome["Message-ID"], welcome["Message-ID"], hours["Message-ID"]]


async def test_two_processes_racing_for_a_turn_send_it_once(rig: MailRig) -> None:
    """Another gateway process's outbox (same store, its own claims) and this one's both
    go for a turn that is due again: the claims decide, the turn is one mail, once."""
    store = rig.gw.store
    other = Outbox(store, {"email": rig.connector}, instance="other-process")
    rig.sink.sink.refuse[ALICE] = "451 4.2.0 mailbox busy, try later"
    await rig.append(mail(body="hello"))

    async def deferred() -> list[Activity] | None:
        items = await turn_items(rig, 2)
        return items if all(i.delivery and i.delivery.status is DeliveryStatus.PENDING
                            for i in items) else None
    items = await until(deferred, what="the turn waiting for a retry")
    del rig.sink.sink.refuse[ALICE]
    await store.messages.update_many(  # due now, for both
        {"_id": {"$in": [i.id for i in items]}},
        {"$set": {"delivery.next_attempt_at": utcnow()}})
    await asyncio.gather(other.deliver_conversation(items[0].conversation_id),
                         rig.gw.app[OUTBOX].deliver_conversation(items[0].conversation_id))
    await rig.gw.settle()
    await other.stop()
    [sent] = rig.sink.sink.messages
    assert "Omnigate demo bot" in text_part(sent.message)
    assert "1. Opening hours" in text_part(sent.message)
    owners = set()
    for item in await outbound(rig):
        assert item.delivery is not None
        assert item.delivery.status is DeliveryStatus.DELIVERED
        assert item.delivery.external_id == sent.message["Message-ID"]
        owners.add(item.delivery.owner)
    assert len(owners) == 1  # one process sent the whole turn


async def test_an_agent_reply_after_the_bot_is_its_own_mail(rig: MailRig) -> None:
    """Only the bot's replies of one turn are combined: an agent's reply that follows
    the bot's answer is a mail of its own."""
    cid, alice, _ = await handed_off(rig)
    async with rig.gw.http.post(f"{rig.gw.url}/api/v1/conversations/{cid}/messages",
                                json={"text": "Alice here."}, headers=alice) as response:
        assert response.status == 201
    bot, agent = await rig.sent(2)
    assert "Alice here." in text_part(agent) and "Alice here." not in text_part(bot)
    assert bot["Message-ID"] != agent["Message-ID"]
    assert agent["Auto-Submitted"] is None
