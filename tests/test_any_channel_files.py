"""Files both ways on every channel, in ONE conversation that moves across them.

Ada starts in the web chat and asks for a human; Alice claims the conversation. Ada then
moves web chat -> Telegram -> Slack -> email, each time by the link or code the channel
she is on offers (the helpers of tests/test_any_channel.py). On each of the four channels,
once she is there:

1. Ada sends a real PNG photo and a PDF the way that channel sends files (the widget's
   upload endpoint; a Telegram photo and a document, downloaded with getFile; a Slack DM
   with files, downloaded from ``url_private_download``; a mail with both attached);
2. the stored item is in THE conversation, with that channel, and Alice reads both files
   through ``GET /api/v1/attachments/{id}`` byte for byte;
3. Alice replies with a PNG and a PDF (multipart, the agent API); the reply goes to the
   channel Ada is on, and Ada gets both files there byte for byte (the web chat's signed
   links; the Bot API's sendPhoto/sendDocument uploads; Slack's external upload; the
   mail's attachments).

Every file is distinct (per channel, per direction), so a file from an earlier leg cannot
pass for a later one. At the end there is still one conversation, and its history lists
Ada's files and Alice's with their channels, in order.
"""

from __future__ import annotations

from typing import Any

from gateway.model import Activity, AttachmentState, Conversation, Role
from gateway.store.mongo import from_doc
from tests import test_any_channel, test_slack_files, test_telegram_files
from tests.fakes.slack_api import FakeSlack, dm
from tests.fakes.telegram_api import FakeTelegram, People
from tests.mailservers import MailRig, mail
from tests.mailservers import inbound as email_inbound
from tests.test_any_channel import ADA_DM, ADA_MAIL, ADA_SLACK, Customer, begin
from tests.test_attachments import PDF, png
from tests.test_email_files import attachments_of
from tests.test_telegram_files import delivered, reply
from tests.test_telegram_files import download as agent_reads
from tests.test_webchat_files import fetch as visitor_opens
from tests.test_webchat_files import upload

# the rig of tests/test_any_channel.py: one gateway with all four channels
rig, telegram, slack, sink = (test_any_channel.rig, test_any_channel.telegram,
                              test_any_channel.slack, test_any_channel.sink)

JOURNEY = ["webchat", "telegram", "slack", "email"]
PNG_TYPE, PDF_TYPE = "image/png", "application/pdf"


def pdf(tag: str) -> bytes:
    """A small PDF of its own (a comment line after the header tells them apart)."""
    return PDF.replace(b"\n", f"\n% {tag}\n".encode(), 1)


def files_for(channel: str, who: str) -> tuple[bytes, bytes]:
    """A photo and a PDF no other leg or direction sends."""
    n = JOURNEY.index(channel) * 2 + (who == "agent")
    return png(3 + n, 2 + n), pdf(f"{who} on {channel}")


# ------------------------------------------------------------ the customer sends


async def customer_sends(ada: Customer, channel: str, photo: bytes, document: bytes
                         ) -> list[tuple[Activity, list[tuple[str, bytes]]]]:
    """Ada sends ``photo`` and ``document`` on ``channel``; returns each stored item (in
    order) once its files are stored, with (attachment id, the bytes sent) of each."""
    gw = ada.gw
    if channel == "webchat":
        visitor = ada.visitor
        assert visitor is not None
        status, ack = await upload(gw, visitor.token, ("client_id", "files-webchat", None),
                                   ("text", "my photo and the form", None),
                                   ("file", photo, "photo.png"),
                                   ("file", document, "form.pdf"))
        assert status == 200, ack
        frame = await visitor.until(lambda f: f.get("id") == ack["id"])
        assert [a["state"] for a in frame["attachments"]] == ["stored", "stored"]
        items = [ack["id"]]
    elif channel == "telegram":
        ann = ada.ann()
        ada.telegram.add_file("ada-photo", content=photo, path="photos/ada.png")
        ada.telegram.add_file("ada-form", content=document, path="documents/form.pdf")
        updates = [
            ada.people.message(ann.user, caption="my photo", photo=[
                {"file_id": "ada-photo", "file_unique_id": "ap", "width": 9, "height": 8,
                 "file_size": len(photo)}]),
            ada.people.message(ann.user, document={
                "file_id": "ada-form", "file_unique_id": "af", "file_name": "form.pdf",
                "mime_type": PDF_TYPE, "file_size": len(document)})]
        for update in updates:
            await ann.post(update)
        # stored by reference, downloaded in the background (getFile + the file)
        items = [(await test_telegram_files.fetched(gw, u)).id for u in updates]
        assert sorted(ada.telegram.downloads) == ["documents/form.pdf", "photos/ada.png"]
    elif channel == "slack":
        shared = [ada.slack.add_download("photo.png", photo, PNG_TYPE),
                  ada.slack.add_download("form.pdf", document, PDF_TYPE)]
        status, _ = await ada.slack_in.event(dm(
            ADA_SLACK, "my photo and the form", channel=ADA_DM, subtype="file_share",
            files=shared))
        assert status == 200
        [*_, last] = await test_slack_files.inbound(gw)
        assert last["text"] == "my photo and the form"
        await test_slack_files.fetched(gw, last["_id"])  # downloaded in the background
        assert sorted(d.params["path"].rsplit("/", 1)[-1] for d in ada.slack.downloads) == [
            "form.pdf", "photo.png"]
        items = [last["_id"]]
    else:
        sent = mail(ADA_MAIL, "my photo and the form", subject="Re: Continue my conversation",
                    name="Ada", in_reply_to=ada.last_mail_id)
        sent.add_attachment(photo, maintype="image", subtype="png", filename="photo.png")
        sent.add_attachment(document, maintype="application", subtype="pdf",
                            filename="form.pdf")
        await ada.rig.connector.take_in(bytes(sent))
        [*_, last] = await email_inbound(gw.store)
        assert last.text is not None and last.text.startswith("my photo and the form")
        items = [last.id]
    await gw.settle()
    kept = []
    expected = iter((photo, document))
    for item_id in items:
        item = await gw.store.get_message(item_id)
        assert item is not None
        assert all(a.state is AttachmentState.STORED and a.id for a in item.attachments), (
            item.attachments)
        kept.append((item, [(str(a.id), next(expected)) for a in item.attachments]))
    assert next(expected, None) is None  # both files, no more
    return kept


# ------------------------------------------------------------ the customer receives


async def customer_receives(ada: Customer, channel: str, sent: dict[str, Any]
                            ) -> list[tuple[str | None, bytes]]:
    """What reached Ada on ``channel`` for Alice's reply ``sent``: (file name, bytes) of
    each file, in order."""
    gw = ada.gw
    if channel == "webchat":  # store-backed: the item frame on her socket is the delivery
        assert ada.visitor is not None
        frame = await ada.visitor.until(lambda f: f.get("id") == sent["id"])
        received = []
        for attachment in frame["attachments"]:  # opened by their signed links
            status, body, _ = await visitor_opens(gw, attachment["url"])
            assert status == 200
            received.append((attachment["name"], body))
        return received
    await delivered(gw, sent["id"])  # the channel accepted it
    if channel == "telegram":
        uploads = ada.telegram.sent_files(ada.ann().id)
        assert [u.method for u in uploads[-2:]] == ["sendPhoto", "sendDocument"]
        assert uploads[-2].caption == "Alice: a photo and a PDF for you"
        return [(u.filename, u.content) for u in uploads[-2:]]
    if channel == "slack":
        share = ada.slack.shares[-1]
        assert (share.channel, share.thread_ts) == (ADA_DM, None)
        assert share.initial_comment == "*Alice:* a photo and a PDF for you"
        return [(f.name, f.data) for f in share.files]
    ada.mails_seen += 1
    [*_, answer] = await ada.rig.sent(ada.mails_seen)
    assert answer["To"].addresses[0].addr_spec == ADA_MAIL
    return [(name, data) for name, _, data in attachments_of(answer)]


# ------------------------------------------------------------ the journey


async def test_photo_and_pdf_both_ways_on_every_channel_in_one_moving_conversation(
    rig: MailRig, telegram: FakeTelegram, slack: FakeSlack
) -> None:
    gw = rig.gw
    ada = Customer(rig, telegram, slack, People(telegram))
    try:
        conversation = await begin(ada, "webchat")
        for hop, channel in enumerate(JOURNEY):
            if hop:
                token = await ada.offers(JOURNEY[hop - 1], channel)
                await ada.arrive(channel, token, hop)

            # 1-2. Ada's photo and PDF: in THE conversation, on this channel, and Alice
            # reads the very bytes Ada sent
            photo, document = files_for(channel, "customer")
            stored = await customer_sends(ada, channel, photo, document)
            for item, _ in stored:
                assert (item.conversation_id, item.channel) == (conversation.id, channel)
            shown = [file for _, files in stored for file in files]
            for (attachment_id, data), kind in zip(shown, (PNG_TYPE, PDF_TYPE), strict=True):
                assert await agent_reads(gw, ada.alice, attachment_id) == (200, data, kind), (
                    channel, kind)

            # 3. Alice's photo and PDF: sent where Ada is, and she gets the very bytes
            label, invoice = files_for(channel, "agent")
            sent = await reply(gw, ada.alice, conversation.id, "a photo and a PDF for you",
                               (label, "label.png"), (invoice, "invoice.pdf"))
            assert sent["channel"] == channel, (channel, sent)
            assert await customer_receives(ada, channel, sent) == [
                ("label.png", label), ("invoice.pdf", invoice)], channel
            await gw.settle()

        # still ONE conversation, with every file where it was sent, in order
        docs = [from_doc(Conversation, d) async for d in gw.store.conversations.find()]
        assert [c.id for c in docs] == [conversation.id]
        items, _ = await gw.store.history(conversation.id, limit=500)
        with_files = [(i.sender.role, i.channel, [(a.content_type, a.size) for a in
                                                  i.attachments])
                      for i in reversed(items) if i.attachments]
        expected: list[tuple[Role, str, list[tuple[str | None, int | None]]]] = []
        for channel in JOURNEY:
            photo, document = files_for(channel, "customer")
            if channel == "telegram":  # a photo and a document: two messages
                expected += [(Role.CUSTOMER, channel, [(PNG_TYPE, len(photo))]),
                             (Role.CUSTOMER, channel, [(PDF_TYPE, len(document))])]
            else:
                expected.append((Role.CUSTOMER, channel, [(PNG_TYPE, len(photo)),
                                                          (PDF_TYPE, len(document))]))
            label, invoice = files_for(channel, "agent")
            expected.append((Role.AGENT, channel, [(PNG_TYPE, len(label)),
                                                   (PDF_TYPE, len(invoice))]))
        assert with_files == expected
    finally:
        for visitor in ada.visitors:
            await visitor.close()
