"""Email end to end (see test_email.py for the set-up): no mail loops, content (HTML,
quotes, attachments, MIME bombs, header injection), handoff to agents, SMTP delivery
errors, the inbound SMTP server, and TLS to IMAP and SMTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from connectors.base import ConnectorContext
from connectors.email import EmailConnector, EmailOptions, Limits
from gateway.model import OwnerState
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import free_port
from tests.mailservers import (
    ALICE,
    IDLE_ONLY,
    OURS,
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


# ------------------------------------------------------------------ no loops


@pytest.mark.parametrize(("sender", "headers"), [
    pytest.param(ALICE, {"Auto_Submitted": "auto-replied"}, id="auto-submitted"),
    pytest.param("news@shop.test", {"Precedence": "bulk"}, id="precedence-bulk"),
    pytest.param("MAILER-DAEMON@mx.customer.test", {}, id="mailer-daemon"),
])
async def test_automatic_mail_is_stored_for_agents_and_never_answered(
    rig: MailRig, sender: str, headers: dict[str, str],
) -> None:
    message = mail(sender, "I am out of the office until Monday.", name=None, **headers)
    await rig.append(message)
    [item] = await inbound_count(rig.gw.store, 1)
    assert item.channel_data["no_reply"] is True
    assert item.channel_data["automatic"]
    assert item.text == "I am out of the office until Monday."  # readable by agents
    await rig.gw.settle()
    conversation = await conversation_of(rig.gw.store, item)
    assert conversation.owner is OwnerState.QUEUED
    assert conversation.handoff is not None and "not answered by the bot" in \
        conversation.handoff.reason
    # handed off through routing like any other: SLA timers run, the event is there
    assert conversation.sla is not None and conversation.sla.first_response_due is not None
    history, _ = await rig.gw.store.history(conversation.id, limit=20)
    assert "handoff" in [i.name for i in history]
    # a normal mail afterwards is answered: the connector is alive, it just did not answer
    await rig.append(mail(body="what are your opening hours?", subject="Hours"))
    [answer] = await rig.sent(1)
    assert "Monday to Friday" in text_part(answer)
    assert [m.rcpt_tos for m in rig.sink.sink.messages] == [[ALICE]]


async def test_an_out_of_office_reply_in_a_bot_conversation_is_not_answered(
    rig: MailRig,
) -> None:
    await rig.append(mail(body="hello"))
    [menu] = await rig.sent(1)  # the greeting and the menu: one mail
    ooo = reply_to(menu, "I am on holiday.")
    ooo["Auto-Submitted"] = "auto-replied"
    await rig.append(ooo)
    items = await inbound_count(rig.gw.store, 2)
    assert items[1].conversation_id == items[0].conversation_id
    await rig.gw.settle()
    assert len(rig.sink.sink.messages) == 1  # no answer to the auto-reply
    conversation = await conversation_of(rig.gw.store, items[1])
    assert conversation.owner is OwnerState.QUEUED


# ------------------------------------------------------------------ content


async def test_html_only_mail_with_attachment_quotes_and_signature(rig: MailRig) -> None:
    message = EmailMessage()
    message["From"] = f"Alice <{ALICE}>"
    message["To"] = OURS
    message["Subject"] = "Shipping"
    message["Message-ID"] = make_msgid(domain="customer.test")
    message.set_content(
        "<html><head><style>p{color:red}</style><script>steal()</script></head><body>"
        "<p>How much is <b>shipping</b>? <a href='javascript:alert(2)'>my order</a></p>"
        "<img src=x onerror=alert(1)>"
        "<p>--<br>Alice Example<br>ACME Ltd</p>"
        "<blockquote>On Monday you wrote: old stuff</blockquote></body></html>",
        subtype="html")
    pdf = b"%PDF-1.4 fake invoice " + bytes(range(256)) * 10
    message.add_attachment(pdf, maintype="application", subtype="pdf", filename="invoice.pdf")
    await rig.append(message)
    [item] = await inbound_count(rig.gw.store, 1)
    assert item.text == "How much is shipping? my order"
    html = item.channel_data["html"]
    assert "<script" not in html and "onerror" not in html and "javascript:" not in html
    assert "<b>shipping</b>" in html
    assert "Alice Example" in item.channel_data["full_text"]  # signature kept for agents
    assert "old stuff" in item.channel_data["full_text"]
    [attachment] = item.attachments
    assert (attachment.name, attachment.content_type, attachment.size) == (
        "invoice.pdf", "application/pdf", len(pdf))
    [answer] = await rig.sent(1)
    assert "Shipping is free" in text_part(answer)

    # agents read the attachment and the raw message through the agent API
    _, alice = await rig.gw.agent("Alice")
    http, api = rig.gw.http, rig.gw.url + "/api/v1/attachments/"
    raw_url = api + item.channel_data["raw_attachment_id"]
    assert (await http.get(raw_url)).status == 401
    response = await http.get(raw_url, headers=alice)
    assert response.status == 200 and response.content_type == "message/rfc822"
    assert await response.read() == message.as_bytes(policy=policy.SMTP)
    part = await http.get(api + str(attachment.id), headers=alice)
    assert part.status == 200 and await part.read() == pdf
    assert part.headers["Content-Disposition"].startswith('attachment; filename="invoice.pdf"')
    # the bearer-only raw routes are gone
    assert (await http.get(rig.gw.url + f"/email/raw/{item.channel_data['raw_digest']}",
                           headers=alice)).status == 404


def nested(depth: int) -> bytes:
    head = f"From: {ALICE}\r\nTo: {OURS}\r\nSubject: nested\r\nMessage-ID: <deep{depth}@c.test>\r\n"
    body = "Content-Type: text/plain\r\n\r\nhello\r\n"
    for level in range(depth):
        boundary = f"b{level}"
        body = (f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
                f"--{boundary}\r\n{body}\r\n--{boundary}--\r\n")
    return (head + body).encode()


def many_parts(parts: int) -> bytes:
    head = (f"From: {ALICE}\r\nTo: {OURS}\r\nSubject: parts\r\nMessage-ID: <many@c.test>\r\n"
            'Content-Type: multipart/mixed; boundary="xx"\r\n\r\n')
    part = "--xx\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    return (head + part * parts + "--xx--\r\n").encode()


@pytest.mark.parametrize(("raw", "problem"), [
    pytest.param(nested(20), "nesting", id="deep"),
    pytest.param(many_parts(300), "parts", id="many-parts"),
])
async def test_mime_bombs_are_kept_for_agents_with_a_note_and_not_answered(
    rig: MailRig, raw: bytes, problem: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "connectors.email.connector")
    await rig.append(raw)
    [item] = await inbound_count(rig.gw.store, 1)
    assert problem in item.channel_data["problem"]
    assert item.text is not None and "not unpacked" in item.text
    assert "not unpacked" in caplog.text and problem in caplog.text
    await rig.gw.settle()
    assert (await conversation_of(rig.gw.store, item)).owner is OwnerState.QUEUED
    assert rig.sink.sink.messages == []
    assert (await rig.dovecot.aflags(rig.user))[1] >= {"\\Seen"}


async def test_too_large_mail_is_kept_truncated_for_agents(
    settings: Settings, dovecot: Dovecot, sink: SmtpSink,
) -> None:
    small = EmailOptions(limits=Limits(max_bytes=20_000), imap=IDLE_ONLY.imap)
    async with rig_for(settings, dovecot, sink, small) as rig:
        await rig.start()
        big = mail(body="x" * 60_000)
        await rig.append(big)
        [item] = await inbound_count(rig.gw.store, 1)
        assert "over the 20000 byte limit" in item.channel_data["problem"]
        assert item.external_id == big["Message-ID"]  # the headers were still read
        assert item.channel_data["raw_size"] > 60_000
        assert item.channel_data["raw_kept"] <= 20_000
        await rig.gw.settle()
        assert rig.sink.sink.messages == []


async def test_crlf_in_a_decoded_subject_never_reaches_our_headers(rig: MailRig) -> None:
    raw = (f"From: Alice <{ALICE}>\r\nTo: {OURS}\r\nMessage-ID: <crlf@customer.test>\r\n"
           "Subject: =?utf-8?q?Hours=0D=0ABcc:_victim@evil.test?=\r\n\r\nopening hours\r\n")
    await rig.append(raw.encode())
    [answer] = await rig.sent(1)
    assert answer["Bcc"] is None
    assert "\n" not in str(answer["Subject"]) and "\r" not in str(answer["Subject"])
    assert rig.sink.sink.messages[0].rcpt_tos == [ALICE]


# ------------------------------------------------------------------ humans


async def test_handoff_by_mail_and_the_agent_reply_arrives_threaded(rig: MailRig) -> None:
    api = rig.gw.url + "/api/v1"
    http = rig.gw.http
    ask = mail(body="I want to talk to a human please")
    await rig.append(ask)
    [bot] = await rig.sent(1)
    assert "bringing in a human" in text_part(bot)
    await rig.gw.settle()
    _, alice = await rig.gw.agent("Alice Agent")
    queue = await (await http.get(api + "/conversations", headers=alice)).json()
    [conversation] = queue["items"]
    cid = conversation["id"]
    assert (await http.post(f"{api}/conversations/{cid}/claim", headers=alice)).status == 200
    reply = await http.post(f"{api}/conversations/{cid}/messages", headers=alice,
                            json={"text": "Hi, Alice here. <script>x()</script> Can I help?"})
    assert reply.status == 201
    agent_mail = (await rig.sent(2))[1]
    assert agent_mail["From"].addresses[0].display_name == "Alice Agent"
    assert agent_mail["From"].addresses[0].addr_spec == OURS
    assert agent_mail["In-Reply-To"] == ask["Message-ID"]
    assert str(agent_mail["References"]).split()[-1] == ask["Message-ID"]
    assert agent_mail["Auto-Submitted"] is None  # a human wrote it
    assert "<script>" in text_part(agent_mail)  # plain text is plain
    html = html_part(agent_mail)
    assert "<script>" not in html and "&lt;script&gt;" in html
    # the customer's answer to the agent joins the conversation; the bot stays silent
    await rig.append(reply_to(agent_mail, "My order 1234 never arrived."))
    items = await inbound_count(rig.gw.store, 2)
    assert items[1].conversation_id == cid
    await rig.gw.settle()
    assert len(rig.sink.sink.messages) == 2


async def test_header_injection_in_an_agent_name_is_refused_on_output(rig: MailRig) -> None:
    api = rig.gw.url + "/api/v1"
    await rig.append(mail(body="human please"))
    await rig.sent(1)
    await rig.gw.settle()
    eve_id, eve = await rig.gw.agent("Eve")
    # Agents.add refuses control characters; the renderer must refuse them anyway (a name
    # written to the store by anything else must still never inject a header)
    await rig.gw.store.agents.update_one(
        {"_id": eve_id}, {"$set": {"name": "Eve\r\nBcc: victim@evil.test"}})
    [conversation] = (await (await rig.gw.http.get(api + "/conversations", headers=eve)).json()
                      )["items"]
    cid = conversation["id"]
    await rig.gw.http.post(f"{api}/conversations/{cid}/claim", headers=eve)
    response = await rig.gw.http.post(f"{api}/conversations/{cid}/messages", headers=eve,
                                      json={"text": "hi"})
    assert response.status == 201
    item_id = (await response.json())["id"]

    async def failed() -> Any:
        doc = await rig.gw.store.messages.find_one({"_id": item_id})
        return doc if doc and doc["delivery"]["status"] == "failed" else None
    doc = await until(failed, what="the delivery to fail")
    assert "line break" in doc["delivery"]["last_error"]
    assert doc["delivery"]["attempts"] == 1  # permanent: not retried
    assert len(rig.sink.sink.messages) == 1  # only the bot's handoff answer


async def test_smtp_4xx_is_retried_and_5xx_is_permanent(rig: MailRig) -> None:
    store = rig.gw.store
    rig.sink.sink.refuse[ALICE] = "451 4.2.0 mailbox busy, try later"
    await rig.append(mail(body="what are your opening hours?"))

    async def deferred() -> Any:
        return await store.messages.find_one(
            {"direction": "out", "delivery.last_error": {"$regex": "451"}})
    item = await until(deferred, what="a deferred delivery")
    assert item["delivery"]["status"] in ("pending", "sending")
    del rig.sink.sink.refuse[ALICE]
    [answer] = await rig.sent(1)  # the outbox retried
    assert "Monday to Friday" in text_part(answer)

    rig.sink.sink.refuse[ALICE] = "550 5.1.1 no such user"
    await rig.append(mail(body="shipping costs", subject="Other"))

    async def failed() -> Any:
        return await store.messages.find_one(
            {"direction": "out", "delivery.status": "failed"})
    item = await until(failed, what="a failed delivery")
    assert "550" in item["delivery"]["last_error"] and item["delivery"]["attempts"] == 1
    identity = await store.identities.find_one({"_id": f"email:{ALICE}"})
    assert identity is not None and identity["reachable"] is False


# ------------------------------------------------------------------ SMTP in


async def test_inbound_smtp_server_stores_then_answers_250(
    settings: Settings, sink: SmtpSink,
) -> None:
    port = free_port()
    async with rig_for(settings, None, sink, POLLING, listen=port) as rig:
        await rig.start()
        message = mail(body="what are your opening hours?")
        errors, response = await aiosmtplib.send(message, hostname="127.0.0.1", port=port)
        assert errors == {} and response.startswith("2.0.0 OK: stored")
        [item] = await inbound(rig.gw.store)  # stored before the 250 came back
        assert item.external_id == message["Message-ID"]
        assert item.channel_data["source"] == "smtp"
        [answer] = await rig.sent(1)
        assert "Monday to Friday" in text_part(answer)
        assert answer["In-Reply-To"] == message["Message-ID"]
        # the same mail delivered again (a retrying server) is stored once
        await aiosmtplib.send(message, hostname="127.0.0.1", port=port)
        assert len(await inbound(rig.gw.store)) == 1
        # only our own mailbox (plus addresses included) is served: no relay
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await aiosmtplib.send(mail(), hostname="127.0.0.1", port=port,
                                  recipients=["someone@other.test"])
        assert refused.value.recipients[0].code == 550
        plus = mail(body="hello")
        await aiosmtplib.send(plus, hostname="127.0.0.1", port=port,
                              recipients=["Support+abc@omnigate.test"])
        # garbage without a sender: a clear 5xx, nothing stored
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
            await client.mail("")  # a null sender, as bounces have
            await client.rcpt(OURS)
            with pytest.raises(aiosmtplib.SMTPDataError) as bad:
                await client.data(b"\x00\xff garbage\r\n")
        assert bad.value.code == 550 and "sender" in bad.value.message
        assert len(await inbound(rig.gw.store)) == 2


async def test_inbound_smtp_answers_4xx_when_the_store_is_down(tmp_path: Path) -> None:
    """A real pipeline on a store nobody listens on: the mail is refused with 451."""
    from flows.engine import FlowEngine
    from flows.registry import StaticFlows
    from gateway.channel_settings import EmailSettings, MailServer
    from gateway.outbox import Outbox
    from gateway.pipeline import Pipeline
    from gateway.routing import Routing

    dead = Store.connect(f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", "x",
                         timeout_ms=300)
    connector = EmailConnector(EmailSettings(
        OURS, None, MailServer("127.0.0.1", free_port(), None, None, "none"),
        ("127.0.0.1", free_port())))
    outbox = Outbox(dead, {"email": connector})
    pipeline = Pipeline(dead, FlowEngine(StaticFlows.from_dir(Path("examples/flows"))), outbox,
                        Routing(dead, outbox))
    await connector.start(ConnectorContext(pipeline.ingest, dead))
    try:
        assert connector.listener is not None
        port = connector.listener.bound_port
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await aiosmtplib.send(mail(), hostname="127.0.0.1", port=port)
        assert refused.value.code == 451
    finally:
        await connector.stop()
        await dead.close()


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="session")
def dovecot_tls() -> Iterator[Dovecot]:
    with running_dovecot("tls", tls=True) as server:
        yield server


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
async def test_tls_to_imap_and_smtp_with_certificate_checks(
    settings: Settings, dovecot_tls: Dovecot, monkeypatch: pytest.MonkeyPatch, mode: str,
) -> None:
    ca = dovecot_tls.ca_file
    assert ca is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # trust the test's self-signed certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(ca, ca.with_name("key.pem"))
    sink = await start_sink(server_side)
    try:
        async with rig_for(settings, dovecot_tls, sink, IDLE_ONLY) as rig:
            rig.settings = rig.settings.model_copy(update={
                "imap_tls": mode, "smtp_tls": "starttls",
                "imap_port": dovecot_tls.imaps_port if mode == "ssl" else dovecot_tls.port})
            await rig.start()
            message = mail(body="what are your opening hours?")
            await rig.append(message)
            [answer] = await rig.sent(1)
            assert answer["In-Reply-To"] == message["Message-ID"]
            assert rig.sink.sink.messages[0].tls
    finally:
        await stop_sink(sink)


async def test_an_untrusted_imap_certificate_is_refused(
    settings: Settings, dovecot_tls: Dovecot, sink: SmtpSink, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "connectors.email.imap")
    async with rig_for(settings, dovecot_tls, sink, IDLE_ONLY) as rig:
        rig.settings = rig.settings.model_copy(update={
            "imap_tls": "ssl", "imap_port": dovecot_tls.imaps_port})
        app_started = asyncio.create_task(rig.start())

        async def refused() -> bool:
            return "CERTIFICATE_VERIFY_FAILED" in caplog.text
        await until(refused, what="the certificate to be refused")
        app_started.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app_started

