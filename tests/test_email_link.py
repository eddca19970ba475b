"""Linking an email address by a mailed code, end to end: the web chat visitor asks
(a socket frame), the code arrives at a real SMTP server (aiosmtpd sink), the visitor
sends it back, and the address joins their contact; a later mail from it continues their
open conversation, and the reply goes out by mail. The real gateway, the real store.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import pytest

from gateway.settings import Settings
from gateway.store.email_link import MAX_ATTEMPTS, PER_ADDRESS_PER_HOUR, PER_REQUESTER_PER_HOUR
from tests.conftest import Gateway, Visitor, free_port
from tests.mailservers import (
    OURS,
    POLLING,
    MailRig,
    SmtpSink,
    html_part,
    mail,
    rig_for,
    start_sink,
    stop_sink,
    text_part,
    until,
)
from tests.test_identity import call

ADA = "ada@customer.test"


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    server = await start_sink()
    yield server
    await stop_sink(server)


@pytest.fixture
async def rig(settings: Settings, sink: SmtpSink) -> AsyncIterator[MailRig]:
    # SMTP out to the sink; mail in by the connector's own road (take_in), as its
    # SMTP listener and IMAP inbox hand it over
    async with rig_for(settings, None, sink, POLLING, listen=free_port()) as r:
        await r.start()
        yield r


async def ask(visitor: Visitor, address: str) -> dict[str, Any]:
    assert visitor.ws is not None
    await visitor.ws.send_json({"type": "email_link", "address": address})
    return await answer(visitor)


async def confirm(visitor: Visitor, code: str) -> dict[str, Any]:
    assert visitor.ws is not None
    await visitor.ws.send_json({"type": "email_verify", "code": code})
    return await answer(visitor)


async def answer(visitor: Visitor) -> dict[str, Any]:
    while True:
        frame = await visitor.recv()
        if frame["type"] in ("email_code_sent", "email_linked", "error"):
            return frame


def codes_mailed(rig: MailRig) -> list[EmailMessage]:
    return [r.message for r in rig.sink.sink.messages
            if "verification code" in str(r.message["Subject"])]


async def code_in(rig: MailRig, n: int, to: str) -> str:
    """The code of the n-th verification mail (other mails, the bot's, may come between)."""
    async def arrived() -> list[EmailMessage] | None:
        found = codes_mailed(rig)
        return found if len(found) >= n else None

    message = (await until(arrived, what=f"verification mail {n}"))[n - 1]
    assert message["To"].addresses[0].addr_spec == to and OURS in str(message["From"])
    assert message["Auto-Submitted"] == "auto-generated"
    found = re.search(r"\b(\d{6})\b", text_part(message))
    assert found is not None, text_part(message)
    assert found.group(1) in html_part(message) and found.group(1) in str(message["Subject"])
    return found.group(1)


def other(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


async def email_owner(gw: Gateway, address: str) -> str | None:
    doc = await gw.store.identities.find_one({"_id": f"email:{address}"})
    return None if doc is None else str(doc["contact_id"])


async def test_link_by_code_then_mail_continues_the_conversation(rig: MailRig) -> None:
    gw = rig.gw
    visitor = Visitor(gw)
    try:
        await visitor.connect()
        await visitor.say("hello")
        await gw.settle()
        web = await gw.store.find_conversation("webchat", str(
            (await gw.store.conversations.find_one({}) or {})["thread_key"]))
        assert web is not None

        sent = await ask(visitor, "  Ada@Customer.TEST ")
        assert sent["type"] == "email_code_sent" and sent["address"] == ADA
        code = await code_in(rig, 1, ADA)
        assert await email_owner(gw, ADA) is None  # nothing linked by asking
        wrong = await confirm(visitor, other(code))
        assert wrong["code"] == "wrong_code" and wrong["attempts_left"] == MAX_ATTEMPTS - 1
        assert await email_owner(gw, ADA) is None
        linked = await confirm(visitor, f"{code[:3]} {code[3:]}")
        assert linked == {"type": "email_linked", "address": ADA,
                          "message": linked["message"]} and ADA in linked["message"]
        assert await email_owner(gw, ADA) == web.contact_id
        again = await confirm(visitor, code)  # used up
        assert again["code"] == "no_code"

        # a new mail from the verified address, to us alone: the same conversation
        await rig.connector.take_in(bytes(mail(ADA, "Any news on my order?", name="Ada")))
        await gw.settle()
        mailed = await gw.store.find_by_external_id("email", str(
            (await gw.store.messages.find_one({"channel": "email"}) or {})["external_id"]))
        assert mailed is not None and mailed.conversation_id == web.id
        assert await gw.store.conversations.count_documents({}) == 1
        now = await gw.store.get_conversation(web.id)
        assert now is not None and now.reply_channel == "email" and "email" in now.routes
        # the bot's answer went by mail, threaded under the customer's mail
        reply = (await rig.sent(2))[1]
        assert reply["To"].addresses[0].addr_spec == ADA
        assert reply["Auto-Submitted"] == "auto-replied"
        assert reply["In-Reply-To"] == mailed.channel_data["message_id"]

        _, alice = await gw.agent("Alice")
        status, out = await call(gw, "GET", f"/conversations/{web.id}", alice)
        assert status == 200 and out["reply_channel"] == "email"
        assert out["routes"] == {"email": now.routes["email"]}
        status, page = await call(gw, "GET", f"/contacts/{web.contact_id}/timeline", alice)
        assert status == 200
        assert {"webchat", "email"} <= {i["channel"] for i in page["items"]}
        assert [(e["channel"], e["external_id"]) for e in out["contact"]["identities"]
                if e["channel"] == "email"] == [("email", ADA)]

        # a mail that copies someone else is not one-to-one: its own conversation
        await rig.connector.take_in(bytes(mail(ADA, "cc'd", Cc="boss@customer.test")))
        await gw.settle()
        assert await gw.store.conversations.count_documents({}) == 2
    finally:
        await visitor.close()


async def test_wrong_expired_and_too_many_attempts_link_nothing(rig: MailRig) -> None:
    gw = rig.gw
    visitor = Visitor(gw)
    try:
        await visitor.connect()
        assert (await confirm(visitor, "123456"))["code"] == "no_code"  # nothing asked

        await ask(visitor, ADA)
        code = await code_in(rig, 1, ADA)
        for left in range(MAX_ATTEMPTS - 1, 0, -1):
            refused = await confirm(visitor, other(code))
            assert refused["code"] == "wrong_code" and refused["attempts_left"] == left
        assert (await confirm(visitor, other(code)))["code"] == "too_many_attempts"
        assert (await confirm(visitor, code))["code"] == "too_many_attempts"  # even right
        assert await email_owner(gw, ADA) is None

        await ask(visitor, ADA)  # a new code starts again; then it expires
        code = await code_in(rig, 2, ADA)
        await gw.store.db["email_codes"].update_many(
            {}, {"$set": {"expires_at": (await gw.store.db["email_codes"].find_one({}) or {})[
                "created_at"]}})
        expired = await confirm(visitor, code)
        assert expired["code"] == "code_expired" and "expired" in expired["message"]
        assert await email_owner(gw, ADA) is None

        bad = await confirm(visitor, "12ab56")  # not a code at all: a bad frame
        assert bad["code"] == "bad_frame"
    finally:
        await visitor.close()


async def test_addresses_checked_rate_limited_and_mail_failures_reported(
    rig: MailRig,
) -> None:
    gw = rig.gw
    first, second = Visitor(gw), Visitor(gw)
    try:
        await first.connect()
        await second.connect()
        for bad in ("not an address", "a@b", OURS, "x@y.test\r\nBcc: z@w.test"):
            refused = await ask(first, bad)
            assert refused["code"] in ("invalid_address", "bad_frame"), (bad, refused)
        assert rig.sink.sink.messages == []
        for _ in range(PER_ADDRESS_PER_HOUR):
            assert (await ask(first, ADA))["type"] == "email_code_sent"
        await rig.sent(PER_ADDRESS_PER_HOUR)
        limited = await ask(second, ADA)  # another visitor, the same address
        assert limited["code"] == "rate_limited" and "address" in limited["message"]
        for n in range(PER_REQUESTER_PER_HOUR - 1):  # second: one counted already
            assert (await ask(second, f"v{n}@customer.test"))["type"] == "email_code_sent"
        limited = await ask(second, "late@customer.test")
        assert limited["code"] == "rate_limited" and "asked" in limited["message"]
        assert len(rig.sink.sink.messages) == PER_ADDRESS_PER_HOUR + PER_REQUESTER_PER_HOUR - 1

        rig.sink.sink.refuse["gone@customer.test"] = "550 no such user"
        failed = await ask(first, "gone@customer.test")
        assert failed["code"] == "link_unavailable" and "could not be mailed" in failed["message"]
    finally:
        await first.close()
        await second.close()


async def test_an_address_of_another_customer_is_not_merged_silently(rig: MailRig) -> None:
    gw = rig.gw
    await rig.connector.take_in(bytes(mail("carol@customer.test", "I wrote before")))
    await gw.settle()
    carol = await email_owner(gw, "carol@customer.test")
    bare = await gw.store.resolve_identity("email", "dave@customer.test")  # no history
    visitor = Visitor(gw)
    try:
        await visitor.connect()
        await visitor.say("hello")
        await gw.settle()
        mine = (await gw.store.resolve_identity("webchat", str(
            (await gw.store.conversations.find_one({"channel": "webchat"}) or {})[
                "thread_key"]))).contact_id

        await ask(visitor, "carol@customer.test")
        code = await code_in(rig, 1, "carol@customer.test")
        refused = await confirm(visitor, code)
        assert refused["code"] == "already_linked" and "agent" in refused["message"]
        assert await email_owner(gw, "carol@customer.test") == carol != mine

        await ask(visitor, "dave@customer.test")
        code = await code_in(rig, 2, "dave@customer.test")
        assert (await confirm(visitor, code))["type"] == "email_linked"
        assert await email_owner(gw, "dave@customer.test") == mine != bare.contact_id
    finally:
        await visitor.close()


async def test_email_not_configured_is_a_clear_error(gateway: Gateway, visitor: Visitor) -> None:
    await visitor.connect()
    refused = await ask(visitor, ADA)
    assert refused["code"] == "link_unavailable" and "not configured" in refused["message"]
    assert await gateway.store.db["email_codes"].count_documents({}) == 0
